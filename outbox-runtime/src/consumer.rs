//! Typed consumers: one Kafka consumer group per service, built from that service's handler.
//!
//! Delivery guarantee: **exactly once in effect**. Kafka delivers at least once; each handler
//! runs inside a database transaction that also marks the event consumed (its outbox row, or
//! an inbox record when the row lives in another database), so a redelivered event is skipped.
//! An offset is stored for commit only after that transaction committed.
//!
//! A message the service must not process (not an envelope, unknown event type, unsupported
//! version, undecodable or invalid payload) goes dead with its reason, and to `<topic>.dlq` when
//! configured; its offset is committed and the partition moves on. A handler error sends the
//! event back through the outbox with backoff (the relay publishes it again), then dead.
//! Partitions are processed in parallel, each in order, so one key's events are applied in
//! order.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use sqlx::Pool;
use tokio::sync::mpsc;

use crate::bus::{KafkaBus, KafkaConfig, Outgoing};
use crate::envelope::{self, Envelope};
use crate::error::Error;
use crate::relay::Shutdown;
use crate::route::ServiceRoute;
use crate::service::{Dispatch, OutboxService};
use crate::store::{Backend, Outbox, Transition};
use crate::trace::TraceParent;

/// Counts consumers that have their partitions.
#[derive(Debug, Default)]
pub struct Ready {
    count: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Ready {
    fn arrive(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until `n` consumers have their partitions.
    pub async fn wait_for(&self, n: usize) {
        loop {
            let changed = self.changed.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            changed.await;
        }
    }
}

/// What a handler gets besides its event: the transaction that will also mark the event
/// consumed, and the message's metadata.
#[derive(Debug)]
pub struct Context<DB: Backend> {
    tx: sqlx::Transaction<'static, DB>,
    meta: Meta,
}

impl<DB: Backend> Context<DB> {
    /// The transaction: write the event's effects here, and they commit together with the
    /// consumed mark (or not at all).
    pub fn tx(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    /// The message's metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }
}

/// The metadata of a consumed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The event id.
    pub event_id: String,
    /// The row id in the service's table.
    pub outbox_id: i64,
    /// The event type.
    pub event_type: String,
    /// The version.
    pub version: u32,
    /// Publish attempts so far.
    pub attempts: i32,
    /// The trace context the producer's trace continues in.
    pub trace: Option<TraceParent>,
}

/// Where a consumer records that it applied an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dedupe {
    /// The event's own outbox row (the consumer's database holds the service's table).
    #[default]
    OutboxRow,
    /// The inbox table, keyed by consumer group and event id.
    Inbox,
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Partitions handled at once.
    pub workers: usize,
    /// Also send dead-lettered messages to `<topic>.dlq`.
    pub dlq: bool,
    /// Where applied events are recorded.
    pub dedupe: Dedupe,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            dlq: false,
            dedupe: Dedupe::OutboxRow,
        }
    }
}

/// The consumer of one service: `S` its events, `H` its handler.
pub struct Consumer<DB: Backend, S, H> {
    inner: Arc<Inner<DB, H>>,
    kafka: KafkaConfig,
    _s: PhantomData<fn() -> S>,
}

impl<DB: Backend, S, H> std::fmt::Debug for Consumer<DB, S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("route", &self.inner.route)
            .finish_non_exhaustive()
    }
}

struct Inner<DB: Backend, H> {
    outbox: Outbox<DB>,
    pool: Pool<DB>,
    handler: H,
    route: ServiceRoute,
    config: ConsumerConfig,
    bus: Arc<KafkaBus>,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Applied,
    Skipped,
    Dead(&'static str),
    Retrying,
    RetryInPlace,
}

impl<DB, S, H> Consumer<DB, S, H>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Context<DB>>,
    H: Send + Sync + 'static,
{
    /// A consumer of service `S`; the outbox's catalog gives its topic and group.
    pub fn new(
        outbox: Outbox<DB>,
        pool: Pool<DB>,
        bus: Arc<KafkaBus>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Self, Error> {
        let route = outbox
            .catalog()
            .service(S::SERVICE)
            .cloned()
            .ok_or_else(|| Error::UnknownService {
                service: S::SERVICE.to_owned(),
            })?;
        let kafka = bus.config().clone();
        Ok(Self {
            inner: Arc::new(Inner {
                outbox,
                pool,
                handler,
                route,
                config,
                bus,
            }),
            kafka,
            _s: PhantomData,
        })
    }

    /// The topics this consumer reads and writes.
    pub fn topics(&self) -> Vec<String> {
        let mut t = vec![self.inner.route.topic.clone()];
        if self.inner.config.dlq {
            t.push(format!("{}.dlq", self.inner.route.topic));
        }
        t
    }

    /// Consumes until `shutdown`, then finishes the messages in hand and commits their offsets.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        self.run_signalling(shutdown, None).await
    }

    /// [`Consumer::run`], signalling `ready` once the group gave this member its partitions.
    pub async fn run_signalling(
        self,
        mut shutdown: Shutdown,
        ready: Option<Arc<Ready>>,
    ) -> Result<(), Error> {
        let consumer: Arc<StreamConsumer> = Arc::new(
            self.kafka
                .client(&[
                    ("group.id", &self.inner.route.group),
                    ("enable.auto.commit", "true"),
                    ("auto.commit.interval.ms", "500"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                    // An outbox consumer favours latency: some Kafka-protocol brokers (tansu)
                    // hold a fetch for the whole wait even when data is there.
                    ("fetch.wait.max.ms", "100"),
                ])
                .create()?,
        );
        consumer.subscribe(&[&self.inner.route.topic])?;
        if let Some(ready) = ready {
            let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
            tokio::spawn(async move {
                // Joining a group takes a rebalance; poll until partitions arrive (or the
                // consumer stops first).
                while !shutdown.is_triggered() {
                    if consumer.assignment().is_ok_and(|a| a.count() > 0) {
                        ready.arrive();
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        let workers = self.inner.config.workers.max(1);
        let mut senders = Vec::with_capacity(workers);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (tx, mut rx) = mpsc::channel::<OwnedMessage>(64);
            senders.push(tx);
            let (inner, consumer, shutdown) =
                (self.inner.clone(), consumer.clone(), shutdown.clone());
            tasks.spawn(async move {
                // Partitions with a message left unsettled (the consumer stopped while the
                // database was failing): no later offset of theirs may be stored, or the commit
                // would skip that message.
                let mut unsettled = std::collections::HashSet::new();
                while let Some(msg) = rx.recv().await {
                    let partition = (msg.topic().to_owned(), msg.partition());
                    if unsettled.contains(&partition) {
                        continue;
                    }
                    if !Inner::<DB, H>::handle::<S>(&inner, &msg, &shutdown).await {
                        unsettled.insert(partition);
                        continue;
                    }
                    if let Err(e) =
                        consumer.store_offset(msg.topic(), msg.partition(), msg.offset())
                    {
                        // After a rebalance the partition may be another member's now; it will
                        // see the message again and skip it.
                        tracing::debug!(error = %e, "offset not stored");
                    }
                }
            });
        }
        loop {
            tokio::select! {
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        let worker = usize::try_from(m.partition()).unwrap_or(0) % workers;
                        if senders[worker].send(m.detach()).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka receive failed");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                },
                _ = shutdown.wait() => break,
            }
        }
        drop(senders);
        while tasks.join_next().await.is_some() {}
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit");
        }
        Ok(())
    }
}

impl<DB: Backend, H: Send + Sync + 'static> Inner<DB, H> {
    /// Handles one message; false when it was left unsettled (its offset must not be stored).
    async fn handle<S>(self: &Arc<Self>, msg: &OwnedMessage, shutdown: &Shutdown) -> bool
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let service = S::SERVICE;
        let Some(value) = msg.payload() else {
            self.dead_letter(msg, "undecodable_envelope", "the message has no value")
                .await;
            return true;
        };
        let env = match envelope::decode(value) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(service, error = %e, "dead-lettering a message that is not an envelope");
                self.dead_letter(msg, "undecodable_envelope", &e.to_string())
                    .await;
                return true;
            }
        };
        // Another service's event on this topic: not ours to touch (the Go system's service
        // isolation).
        let owner = env.service.clone().or_else(|| {
            self.outbox
                .catalog()
                .service_of(&env.event_type)
                .map(|r| r.service.clone())
        });
        if owner.as_deref().is_some_and(|o| o != service) {
            tracing::debug!(service, event_type = %env.event_type, "skipping another service's event");
            return true;
        }
        let trace = trace_of(msg);
        let span = tracing::info_span!(
            "outbox.consume",
            service,
            event_id = %env.event_id,
            event_type = %env.event_type,
            outbox_id = env.outbox_id,
            trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        );
        let mut delay = Duration::from_millis(100);
        loop {
            let handled =
                tracing::Instrument::instrument(self.apply::<S>(&env, trace), span.clone()).await;
            match handled {
                Ok(outcome) => {
                    let labels = [("service", service.to_owned())];
                    match outcome {
                        Outcome::Applied => {
                            metrics::counter!("outbox_consumed_total", &labels).increment(1)
                        }
                        Outcome::Retrying => {
                            metrics::counter!("outbox_retried_total", &labels).increment(1)
                        }
                        Outcome::Dead(reason) => {
                            metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => reason).increment(1);
                            self.dead_letter(msg, reason, "").await;
                        }
                        Outcome::Skipped => {}
                        // Nothing in this database can schedule a retry (inbox mode): try again
                        // here, keeping the offset.
                        Outcome::RetryInPlace => {
                            if shutdown.is_triggered() {
                                return false;
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                    return true;
                }
                // The database failed: try again, keeping the offset, until it works or the
                // consumer stops (then Kafka redelivers the message later).
                Err(e) => {
                    tracing::warn!(service, event_id = %env.event_id, error = %e, "consume failed; retrying");
                    if shutdown.is_triggered() {
                        return false;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn apply<S>(&self, env: &Envelope, trace: Option<TraceParent>) -> Result<Outcome, Error>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let service = S::SERVICE;
        let event = match S::decode(&env.event_type, env.version, &env.payload) {
            Ok(event) => event,
            Err(rejection) => {
                let reason = rejection.reason();
                tracing::warn!(service, event_id = %env.event_id, %rejection, "dead-lettering a rejected event");
                let mut conn = self.pool.acquire().await?;
                self.outbox
                    .reject(
                        &mut conn,
                        service,
                        &env.event_id,
                        reason,
                        &rejection.to_string(),
                    )
                    .await?;
                return Ok(Outcome::Dead(reason));
            }
        };
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let mut attempts = 0;
        let mut locked: Option<(i64, i64)> = None;
        match self.config.dedupe {
            Dedupe::OutboxRow => {
                let Some(row) = self
                    .outbox
                    .lock_row(&mut tx, service, &env.event_id)
                    .await?
                else {
                    tx.rollback().await?;
                    tracing::warn!(service, event_id = %env.event_id, "no outbox row for this event; skipping");
                    return Ok(Outcome::Skipped);
                };
                // Settled, not final: a row dead only because its lease ran out on the last
                // attempt may have been published, and this is its message.
                if row.is_settled() {
                    tx.rollback().await?;
                    return Ok(Outcome::Skipped);
                }
                attempts = row.attempts;
                locked = Some((row.id, row.created_at));
            }
            Dedupe::Inbox => {
                if !self
                    .outbox
                    .record_inbox(&mut tx, &self.route.group, &env.event_id)
                    .await?
                {
                    tx.rollback().await?;
                    return Ok(Outcome::Skipped);
                }
            }
        }
        let meta = Meta {
            event_id: env.event_id.clone(),
            outbox_id: env.outbox_id,
            event_type: env.event_type.clone(),
            version: env.version,
            attempts,
            trace,
        };
        let mut ctx = Context { tx, meta };
        let ran = match trace {
            Some(t) => {
                t.child()
                    .scope(event.dispatch(&self.handler, &mut ctx))
                    .await
            }
            None => event.dispatch(&self.handler, &mut ctx).await,
        };
        match ran {
            Ok(()) => {
                let Context { mut tx, .. } = ctx;
                if let Some((id, _)) = locked {
                    self.outbox.mark_consumed(&mut tx, service, id).await?;
                }
                tx.commit().await?;
                if let Some((_, created)) = locked {
                    let secs = (self.outbox.now_ms() - created).max(0) as f64 / 1000.0;
                    metrics::histogram!("outbox_latency_seconds", "service" => service.to_owned())
                        .record(secs);
                }
                Ok(Outcome::Applied)
            }
            Err(e) => {
                drop(ctx);
                let error = e.to_string();
                let mut conn = self.pool.acquire().await?;
                if e.is_permanent() {
                    self.outbox
                        .reject(
                            &mut conn,
                            service,
                            &env.event_id,
                            "handler_rejected",
                            &error,
                        )
                        .await?;
                    return Ok(Outcome::Dead("handler_rejected"));
                }
                tracing::warn!(service, event_id = %env.event_id, %error, "handler failed");
                if self.config.dedupe == Dedupe::Inbox {
                    return Ok(Outcome::RetryInPlace);
                }
                match self
                    .outbox
                    .consume_failed(&mut conn, service, &env.event_id, &error)
                    .await?
                {
                    Transition::Dead => Ok(Outcome::Dead("max_attempts")),
                    Transition::Retrying { .. } => Ok(Outcome::Retrying),
                    Transition::Unchanged => Ok(Outcome::Skipped),
                }
            }
        }
    }

    /// Sends a dead message to `<topic>.dlq` with the reason, when configured.
    async fn dead_letter(&self, msg: &OwnedMessage, reason: &str, detail: &str) {
        if !self.config.dlq {
            return;
        }
        let mut headers = vec![("x-outbox-dead-reason", reason.to_owned())];
        if !detail.is_empty() {
            headers.push(("x-outbox-dead-detail", detail.to_owned()));
        }
        let record = Outgoing {
            topic: format!("{}.dlq", msg.topic()),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: msg.payload().unwrap_or_default().to_vec(),
            headers,
        };
        if let Err(e) = self.bus.send(&record).await {
            tracing::warn!(error = %e, "dead-letter topic publish failed");
        }
    }
}

fn trace_of(msg: &OwnedMessage) -> Option<TraceParent> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| std::str::from_utf8(h.value?).ok())
        .and_then(|v| v.parse().ok())
}
