//! Typed consumers: one Kafka consumer group per service, built from that service's handler.
//!
//! Delivery guarantee: **exactly once in effect**. Kafka delivers at least once; each handler
//! runs inside a database transaction that also marks the event consumed (its outbox row, or
//! an inbox record when the row lives in another database), so a redelivered event is skipped.
//! An offset is stored for commit only after that transaction committed.
//!
//! A message the service must not process (not an envelope, unknown event type, unsupported
//! version, undecodable or invalid payload) goes dead with its reason, and to `<topic>.dlq` when
//! configured; its offset is committed and the partition moves on. So does a message of the
//! service whose event has no row in its table (relayed by another system, or its row deleted):
//! it is dead-lettered in the consumer's database (`no_outbox_row`), never skipped silently. A
//! handler error, or a handler panic, sends the event back through the outbox with backoff (the
//! relay publishes it again), then dead; in a consumer with its own database
//! ([`Dedupe::Inbox`]) the message is kept there (`outbox_inbox_retry`) and tried again with
//! backoff by the consumer, then dead there. Either way its partition moves on meanwhile.
//! Partitions are processed in parallel, each in order, so one key's events are applied in
//! order (an event that is retried comes after the later events of its key).
//!
//! # Two kinds of handler
//!
//! - **In the transaction** ([`Consumer::new`], `Engine::consumer`): the handler gets a
//!   [`Context`] whose transaction also marks the event done. Its database effects happen
//!   **exactly once**; batches of messages share one transaction, whose locks are held at most
//!   [`ConsumerConfig::batch_time`].
//! - **Outside any transaction** ([`Consumer::calling`], `Engine::call_consumer`), for a handler
//!   that calls an HTTP or RPC service: the consumer claims the call (a lease in
//!   `outbox_calls`, committed at once), calls the handler with a [`Call`] and no transaction
//!   open, then marks the event done. A crash between the claim and the mark leaves the lease;
//!   the event's redelivery waits for it to run out and calls again. The guarantee is **at
//!   least once, with a stable idempotency key** ([`Call::idempotency_key`], the event id, the
//!   same on every attempt): the remote service must treat a second call with the same key as
//!   the first. A call runs at most its lease ([`ConsumerConfig::call_lease`]); past it, it is
//!   cancelled and counts as a failed attempt, so two calls of one event do not overlap. Every
//!   claim counts as an attempt, a crash's too: an event whose calls keep killing the process
//!   goes dead with `max_attempts` instead of crashing it for ever.

use std::collections::HashSet;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Pool;
use tokio::sync::mpsc;

use outbox_contract::envelope::{self, Envelope};
use outbox_contract::route::ServiceRoute;
use outbox_contract::service::{Dispatch, HandlerError, OutboxService, Rejection};

use crate::bus::{Bus, Outgoing, Position, Receive, Received};
use crate::error::Error;
use crate::relay::{Crew, Shutdown};
use crate::store::{Backend, CallClaim, InboxDead, InboxRetry, Outbox, OutboxRow, Transition};
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

/// What a handler that runs outside any transaction gets besides its event (see the
/// [module documentation](self#two-kinds-of-handler)): no transaction, the key to make its
/// remote call idempotent with, and its lease.
#[derive(Debug, Clone)]
pub struct Call {
    meta: Meta,
    attempt: u32,
    deadline: tokio::time::Instant,
}

impl Call {
    /// The message's metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The key to send with the remote call (an `Idempotency-Key` header, a request id): the
    /// event id, the same on every attempt of this event.
    pub fn idempotency_key(&self) -> &str {
        &self.meta.event_id
    }

    /// This attempt, 1 for the first. Every claim counts, one that crashed too.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the lease ends: the call is cancelled then and counts as a failed attempt. Give the
    /// remote call a timeout inside it.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
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

/// Consumer settings: start from [`ConsumerConfig::default`] and change what you need.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub(crate) workers: usize,
    pub(crate) dlq: bool,
    pub(crate) dedupe: Dedupe,
    pub(crate) batch: usize,
    pub(crate) batch_time: Duration,
    pub(crate) inbox_attempts: u32,
    pub(crate) call_lease: Duration,
    pub(crate) rejoin_after: Duration,
    pub(crate) allow_foreign_members: bool,
}

impl ConsumerConfig {
    /// Whether the consumer joins a group that has members of another system (the Go
    /// consumers of the same group name, say) (false). A consumer beside them would take part
    /// of their partitions, and each side would mishandle the other's messages: by default it
    /// describes the group first and refuses to start ([`Error::ForeignMembers`]).
    pub fn allow_foreign_members(mut self, allow: bool) -> Self {
        self.allow_foreign_members = allow;
        self
    }

    /// Partitions handled at once (4).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Also send dead-lettered messages to `<topic>.dlq` (off).
    pub fn dlq(mut self, dlq: bool) -> Self {
        self.dlq = dlq;
        self
    }

    /// How long a batch's transaction may hold its locks (1 s): a batch whose handlers take
    /// longer commits what it applied when the time is up, and the rest of it goes into the
    /// next batch (a handler already running is not interrupted). Zero makes each message a
    /// transaction of its own.
    pub fn batch_time(mut self, bound: Duration) -> Self {
        self.batch_time = bound;
        self
    }

    /// With [`Dedupe::Inbox`], how many attempts of a handler that fails with a retryable
    /// error fail before its event goes dead (`max_attempts`, stored in the consumer's
    /// database) (10). There is no outbox row there to schedule a retry: the message is kept in
    /// the consumer's database (`outbox_inbox_retry`) and the consumer tries it again after
    /// the store's backoff ([`StoreConfig`](crate::store::StoreConfig)), while its partition
    /// moves on. (A handler outside any transaction keeps its attempts in its call instead,
    /// and tries them in place.)
    pub fn inbox_attempts(mut self, attempts: u32) -> Self {
        self.inbox_attempts = attempts.max(1);
        self
    }

    /// For a handler that runs outside any transaction ([`Consumer::calling`]), how long one
    /// call may take (30 s): its lease. A call still running then is cancelled and counts as a
    /// failed attempt; after a crash, the event is called again once its lease has run out.
    pub fn call_lease(mut self, lease: Duration) -> Self {
        self.call_lease = lease.max(Duration::from_millis(1));
        self
    }

    /// When a partition of the consumer's topics has messages to read and its group's
    /// committed offset has not moved for this long (2 min), the consumer leaves its group and
    /// joins it again with a new client, on a new connection, once per such offset: a group
    /// coordinator that gave a member's partitions to nobody (tansu 0.6 keeps a formed group
    /// when a member's session runs out), or that stopped answering a member's connection, is
    /// made to form a new generation. A row left `published` is the symptom in the database.
    /// Each rejoin is logged and counted in `outbox_consumer_rejoins_total`.
    pub fn rejoin_after(mut self, after: Duration) -> Self {
        self.rejoin_after = after.max(Duration::from_secs(1));
        self
    }

    /// Where applied events are recorded ([`Dedupe::OutboxRow`]).
    pub fn dedupe(mut self, dedupe: Dedupe) -> Self {
        self.dedupe = dedupe;
        self
    }

    /// At most this many messages already received for a worker's partitions are applied in
    /// one transaction (100). A handler that fails costs its own message only: the batch rolls
    /// back (to its last savepoint, which batches take every ten handlers for a minute after a
    /// failure) and goes on without it, and its failure is recorded after that commit (it is
    /// retried or dead-lettered on its own, and applied alone when it comes back). Handlers
    /// before it in the batch may run twice, so a handler's effects outside the database may
    /// happen twice (they are at least once anyway). 1 turns batching off.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            dlq: false,
            dedupe: Dedupe::OutboxRow,
            batch: 100,
            batch_time: Duration::from_secs(1),
            inbox_attempts: 10,
            call_lease: Duration::from_secs(30),
            rejoin_after: Duration::from_secs(120),
            allow_foreign_members: false,
        }
    }
}

/// The consumer of one service: `S` its events, `H` its handler, on bus `B`.
pub struct Consumer<DB: Backend, S, H, B: Bus> {
    inner: Arc<Inner<DB, H, B>>,
    _s: PhantomData<fn() -> S>,
}

impl<DB: Backend, S, H, B: Bus> std::fmt::Debug for Consumer<DB, S, H, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("route", &self.inner.route)
            .finish_non_exhaustive()
    }
}

struct Inner<DB: Backend, H, B: Bus> {
    outbox: Outbox<DB>,
    pool: Pool<DB>,
    handler: H,
    route: ServiceRoute,
    config: ConsumerConfig,
    bus: Arc<B>,
    /// Events whose handler failed in a batch: applied on their own when they come back.
    suspects: Suspects,
    /// Until when batches take savepoints: for a while after a handler failed in one.
    savepoints_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// How the handler runs.
    kind: Kind<DB, H, B>,
    /// This consumer's name as a lease owner (calls outside a transaction).
    owner: String,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Applies one message (its envelope decoded).
type ApplyFn<DB, H, B> = for<'a> fn(
    &'a Inner<DB, H, B>,
    &'a Received,
    &'a Envelope,
    Option<TraceParent>,
    &'a Shutdown,
) -> BoxFuture<'a, Result<Outcome, Error>>;

/// Applies a worker's batch.
type BatchFn<DB, H, B> = for<'a> fn(
    &'a Arc<Inner<DB, H, B>>,
    Vec<Received>,
    &'a Shutdown,
    &'a mut HashSet<(String, i32)>,
    &'a <B as Bus>::Receiver,
) -> BoxFuture<'a, ()>;

/// How a consumer runs its handler: in the transaction that marks the event done (in
/// batches), or outside any transaction (one message at a time). Chosen by the constructor,
/// which knows the handler's context type.
struct Kind<DB: Backend, H, B: Bus> {
    apply: ApplyFn<DB, H, B>,
    /// `None`: one message at a time.
    batch: Option<BatchFn<DB, H, B>>,
}

fn apply_in_tx<'a, DB, S, H, B>(
    inner: &'a Inner<DB, H, B>,
    msg: &'a Received,
    env: &'a Envelope,
    trace: Option<TraceParent>,
    _shutdown: &'a Shutdown,
) -> BoxFuture<'a, Result<Outcome, Error>>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Context<DB>>,
    H: Send + Sync + 'static,
    B: Bus,
{
    Box::pin(inner.apply::<S>(msg, env, trace))
}

fn batch_in_tx<'a, DB, S, H, B>(
    inner: &'a Arc<Inner<DB, H, B>>,
    batch: Vec<Received>,
    shutdown: &'a Shutdown,
    unsettled: &'a mut HashSet<(String, i32)>,
    receiver: &'a B::Receiver,
) -> BoxFuture<'a, ()>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Context<DB>>,
    H: Send + Sync + 'static,
    B: Bus,
{
    Box::pin(inner.handle_batch::<S>(batch, shutdown, unsettled, receiver))
}

fn apply_call<'a, DB, S, H, B>(
    inner: &'a Inner<DB, H, B>,
    msg: &'a Received,
    env: &'a Envelope,
    trace: Option<TraceParent>,
    shutdown: &'a Shutdown,
) -> BoxFuture<'a, Result<Outcome, Error>>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Call>,
    H: Send + Sync + 'static,
    B: Bus,
{
    Box::pin(inner.call::<S>(msg, env, trace, shutdown))
}

/// While handlers fail, a batch takes a savepoint before every this many handlers, and after
/// each failure, so that a failure costs fewer than this many handlers another run.
const SAVEPOINT_EVERY: usize = 10;

/// How long after a handler failed in a batch the batches take savepoints. A consumer whose
/// handlers do not fail pays no statement for them.
const SAVEPOINTS_FOR: Duration = Duration::from_secs(60);

/// The savepoint of a batch (the same name each time: a new one replaces the last).
const SAVEPOINT: &str = "SAVEPOINT outbox_batch";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT outbox_batch";

/// How long a consumer may try a kept retry (inbox mode) before another may take it.
const RETRY_LEASE: Duration = Duration::from_secs(60);

/// What became of a batch.
enum Batch {
    /// Committed: the messages before index `upto` (the rest did not fit in the batch's time
    /// bound).
    Applied {
        upto: usize,
        /// Indexes of messages whose event has no row: settled on their own.
        orphans: Vec<usize>,
        /// Indexes of messages whose event went dead, rejected, with the reason.
        rejected: Vec<(usize, &'static str)>,
        /// Messages whose handler failed, rolled back to a savepoint and left out, in order
        /// (some may lie past `upto`).
        failed: Vec<(usize, Envelope, HandlerError)>,
    },
    /// The handler of the message at index `at` failed with `error`, and the handlers of the
    /// messages before it ran too: nothing of the batch was applied.
    RolledBack {
        at: usize,
        env: Envelope,
        error: HandlerError,
    },
}

/// Events whose handler failed in a batch of this consumer, so that a batch does not roll
/// back for them again: when one comes back (a retry through the outbox, a redelivery) it is
/// applied on its own. The most recent [`Suspects::CAPACITY`] are kept.
#[derive(Debug, Default)]
struct Suspects(std::sync::Mutex<(HashSet<String>, std::collections::VecDeque<String>)>);

impl Suspects {
    const CAPACITY: usize = 4096;

    fn add(&self, event_id: &str) {
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (set, order) = &mut *guard;
        if set.insert(event_id.to_owned()) {
            order.push_back(event_id.to_owned());
            if order.len() > Self::CAPACITY
                && let Some(oldest) = order.pop_front()
            {
                set.remove(&oldest);
            }
        }
    }

    fn contains(&self, event_id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .contains(event_id)
    }
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Applied,
    Skipped,
    Dead(&'static str),
    Retrying,
    /// Not now (another consumer holds the event's call, or a failed call waits for its next
    /// attempt, counted in the database): why, to try again in place after a pause.
    Wait(String),
}

impl<DB, S, H, B> Consumer<DB, S, H, B>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Context<DB>>,
    H: Send + Sync + 'static,
    B: Bus,
{
    /// A consumer of service `S` whose handler runs in the transaction that marks each event
    /// done; the outbox's catalog gives its topic and group.
    ///
    /// Refused when the catalog lists another enum for `S`'s service: this consumer would
    /// dead-letter that enum's events as unknown ([`outbox_contract::Error::ServiceClaimedTwice`]).
    pub fn new(
        outbox: Outbox<DB>,
        pool: Pool<DB>,
        bus: Arc<B>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Self, Error> {
        let kind = Kind {
            apply: apply_in_tx::<DB, S, H, B>,
            batch: Some(batch_in_tx::<DB, S, H, B>),
        };
        Self::build(outbox, pool, bus, handler, config, kind)
    }
}

impl<DB, S, H, B> Consumer<DB, S, H, B>
where
    DB: Backend,
    S: OutboxService + Dispatch<H, Call>,
    H: Send + Sync + 'static,
    B: Bus,
{
    /// A consumer of service `S` whose handler runs outside any transaction, for effects
    /// outside the database (claim, commit, call, mark: see the
    /// [module documentation](self#two-kinds-of-handler)). The tables it needs come with
    /// [`Outbox::migrate`].
    pub fn calling(
        outbox: Outbox<DB>,
        pool: Pool<DB>,
        bus: Arc<B>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Self, Error> {
        let kind = Kind {
            apply: apply_call::<DB, S, H, B>,
            batch: None,
        };
        Self::build(outbox, pool, bus, handler, config, kind)
    }
}

impl<DB, S, H, B> Consumer<DB, S, H, B>
where
    DB: Backend,
    S: OutboxService,
    H: Send + Sync + 'static,
    B: Bus,
{
    fn build(
        outbox: Outbox<DB>,
        pool: Pool<DB>,
        bus: Arc<B>,
        handler: H,
        config: ConsumerConfig,
        kind: Kind<DB, H, B>,
    ) -> Result<Self, Error> {
        outbox.catalog().check_enum::<S>()?;
        let route = outbox
            .catalog()
            .service(S::SERVICE)
            .cloned()
            .ok_or_else(|| Error::UnknownService {
                service: S::SERVICE.to_owned(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                outbox,
                pool,
                handler,
                route,
                config,
                bus,
                suspects: Suspects::default(),
                savepoints_until: std::sync::Mutex::new(None),
                kind,
                owner: format!(
                    "consumer-{}-{}",
                    std::process::id(),
                    uuid::Uuid::now_v7().simple()
                ),
            }),
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
    /// Dropping the future stops it too: the messages in hand are finished in the background
    /// and their offsets stored (committed with the group's next automatic commit, or as the
    /// client closes).
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        self.run_signalling(shutdown, None).await
    }

    /// [`Consumer::run`], signalling `ready` once the group gave this member its partitions.
    pub async fn run_signalling(
        self,
        mut shutdown: Shutdown,
        ready: Option<Arc<Ready>>,
    ) -> Result<(), Error> {
        let group = &self.inner.route.group;
        if self.inner.config.dedupe == Dedupe::OutboxRow
            && self.inner.outbox.is_wal(&self.inner.route.service)
        {
            return Err(Error::WalNeedsInbox {
                service: self.inner.route.service.clone(),
            });
        }
        if !self.inner.config.allow_foreign_members {
            match self.inner.bus.foreign_members(group).await {
                Ok(members) if !members.is_empty() => {
                    return Err(Error::ForeignMembers {
                        group: group.clone(),
                        members,
                    });
                }
                Ok(_) => {}
                // A broker that cannot describe groups does not stop the consumer.
                Err(e) => {
                    tracing::warn!(%group, error = %e, "could not describe the group; joining it")
                }
            }
        }
        let receiver = Arc::new(
            self.inner
                .bus
                .receiver(group, std::slice::from_ref(&self.inner.route.topic))?,
        );
        // The workers' signal: `shutdown`, or this future dropped (they finish the messages in
        // hand then, rather than being cut off inside a transaction).
        let (mut crew, stop) = Crew::new(&shutdown);
        if let Some(ready) = ready {
            let (receiver, shutdown) = (receiver.clone(), stop.clone());
            tokio::spawn(async move {
                // Joining a group takes a rebalance; poll until partitions arrive (or the
                // consumer stops first).
                while !shutdown.is_triggered() {
                    if receiver.assigned() > 0 {
                        ready.arrive();
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        let workers = self.inner.config.workers.max(1);
        let mut senders = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, mut rx) = mpsc::channel::<Received>(64);
            senders.push(tx);
            let (inner, receiver, shutdown) = (self.inner.clone(), receiver.clone(), stop.clone());
            crew.tasks.spawn(async move {
                // Partitions with a message left unsettled (the consumer stopped while the
                // database was failing): no later offset of theirs may be stored, or the commit
                // would skip that message.
                let mut unsettled = HashSet::new();
                let mut batch = Vec::new();
                while let Some(first) = rx.recv().await {
                    // Whatever else is already waiting goes into the same batch.
                    batch.push(first);
                    while batch.len() < inner.config.batch.max(1) {
                        match rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    let batch = std::mem::take(&mut batch);
                    match inner.kind.batch {
                        Some(apply) => {
                            apply(&inner, batch, &shutdown, &mut unsettled, &*receiver).await
                        }
                        None => {
                            for msg in &batch {
                                inner
                                    .settle::<S>(msg, &shutdown, &mut unsettled, &*receiver)
                                    .await;
                            }
                        }
                    }
                }
            });
        }
        // Retries kept in the consumer's database (inbox mode, handlers in a transaction: a
        // call keeps its retries in its lease).
        let (stop_retries, retries_stop) = Shutdown::new();
        if self.inner.config.dedupe == Dedupe::Inbox && self.inner.kind.batch.is_some() {
            crew.tasks.spawn(
                self.inner
                    .clone()
                    .retry_kept::<S>(stop.clone(), retries_stop),
            );
        }
        let mut failed = None;
        // A look at the group's positions, a few times per `rejoin_after`.
        let mut watch = tokio::time::interval(self.inner.config.rejoin_after / 4);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stalls = Stalls::default();
        loop {
            tokio::select! {
                // Once asked to stop, take no new message, even one that is already there.
                biased;
                _ = shutdown.wait() => break,
                _ = watch.tick() => {
                    let service = &self.inner.route.service;
                    match receiver.positions().await {
                        Ok(positions) => {
                            let stuck = stalls.look(positions, self.inner.config.rejoin_after);
                            if let Some(p) = stuck {
                                tracing::warn!(
                                    service = %service,
                                    topic = %p.topic,
                                    partition = p.partition,
                                    committed = p.committed,
                                    end = p.end,
                                    "a partition has messages and its group's offset has not moved: leaving the group and joining again"
                                );
                                metrics::counter!("outbox_consumer_rejoins_total", "service" => service.clone())
                                    .increment(1);
                                if let Err(e) = receiver.rejoin().await {
                                    tracing::warn!(service = %service, error = %e, "rejoin failed");
                                }
                            }
                        }
                        Err(e) => tracing::debug!(service = %service, error = %e, "group positions not read"),
                    }
                }
                msg = receiver.recv() => match msg {
                    Ok(m) => {
                        let worker = usize::try_from(m.partition).unwrap_or(0) % workers;
                        if senders[worker].send(m).await.is_err() {
                            // The worker is gone: it panicked outside a handler.
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "receive failed");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                },
                Some(done) = crew.tasks.join_next() => {
                    // A worker ends only when its channel closes, which has not happened yet.
                    let why = match done {
                        Err(e) => e.to_string(),
                        Ok(()) => "it returned".to_owned(),
                    };
                    failed = Some(Error::Task(format!(
                        "a worker of the `{}` consumer stopped: {why}",
                        self.inner.route.service
                    )));
                    break;
                }
            }
        }
        drop(senders);
        drop(stop_retries);
        while let Some(done) = crew.tasks.join_next().await {
            if let Err(e) = done {
                failed.get_or_insert(Error::Task(format!(
                    "a worker of the `{}` consumer panicked: {e}",
                    self.inner.route.service
                )));
            }
        }
        if let Err(e) = receiver.commit().await {
            tracing::debug!(error = %e, "final offset commit");
        }
        failed.map_or(Ok(()), Err)
    }
}

impl<DB: Backend, H: Send + Sync + 'static, B: Bus> Inner<DB, H, B> {
    /// Handles a worker's batch in order: runs of messages that decode to this service's events
    /// are applied together in one transaction, the rest (and a run whose transaction failed)
    /// one at a time. Stores each settled message's offset.
    async fn handle_batch<S>(
        self: &Arc<Self>,
        batch: Vec<Received>,
        shutdown: &Shutdown,
        unsettled: &mut HashSet<(String, i32)>,
        receiver: &B::Receiver,
    ) where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let mut run: Vec<(Received, Decoded<S>)> = Vec::new();
        for msg in batch {
            if unsettled.contains(&(msg.topic.clone(), msg.partition)) {
                continue;
            }
            match self.decoded::<S>(&msg) {
                Some(decoded) if !self.suspects.contains(&decoded.env.event_id) => {
                    run.push((msg, decoded));
                }
                _ => {
                    self.flush::<S>(std::mem::take(&mut run), shutdown, unsettled, receiver)
                        .await;
                    self.settle::<S>(&msg, shutdown, unsettled, receiver).await;
                }
            }
        }
        self.flush::<S>(run, shutdown, unsettled, receiver).await;
    }

    /// The envelope and event (or the event's rejection) of a message of this service; `None`
    /// for anything that takes the one-at-a-time path (not an envelope, another service's).
    fn decode<S: OutboxService>(&self, msg: &Received) -> Option<(Envelope, Result<S, Rejection>)> {
        if from_go(msg) {
            return None;
        }
        let env = envelope::decode(msg.payload.as_deref()?).ok()?;
        if env.service.as_deref().is_some_and(|o| o != S::SERVICE) {
            return None;
        }
        let event = S::decode(&env.event_type, env.version, &env.payload);
        Some((env, event))
    }

    /// Applies a run of decoded messages in one transaction. A handler that fails costs its
    /// own message, not its batch: its failure is recorded after the batch committed without
    /// it (a retry through the outbox, a retry kept in the consumer's database, a dead
    /// letter), before the offsets after it are stored. While no handler fails, the batch
    /// pays no statement for the chance: a failure rolls the transaction back and the batch
    /// runs again without that message, so it costs the handlers before it one more run
    /// (where a savepoint per message would cost every message two statements). From then
    /// on, for [`SAVEPOINTS_FOR`], batches take a savepoint every [`SAVEPOINT_EVERY`]
    /// handlers and after each failure, and a failure rolls back to the last one: a stream
    /// where some handlers always fail keeps its batches. An event that failed here is
    /// applied on its own when it comes back ([`Suspects`]). After a database failure the
    /// rest of the run goes one message at a time.
    async fn flush<S>(
        self: &Arc<Self>,
        run: Vec<(Received, Decoded<S>)>,
        shutdown: &Shutdown,
        unsettled: &mut HashSet<(String, i32)>,
        receiver: &B::Receiver,
    ) where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let (mut msgs, first): (Vec<Received>, Vec<Decoded<S>>) = run.into_iter().unzip();
        let mut first = Some(first);
        // Messages whose handler failed in a batch that rolled back, by index in `msgs`, in
        // order: left out of the batch, their failure recorded at their place.
        let mut failed: Vec<(usize, Envelope, HandlerError)> = Vec::new();
        // One message is applied on its own, without the batch's bookkeeping.
        while msgs.len() > 1 || !failed.is_empty() {
            let run = match first.take() {
                Some(run) => run,
                // Again: the events decode as they did.
                None => {
                    let again: Vec<Decoded<S>> =
                        msgs.iter().filter_map(|m| self.decoded::<S>(m)).collect();
                    if again.len() != msgs.len() {
                        break;
                    }
                    again
                }
            };
            let skip: Vec<usize> = failed.iter().map(|(at, ..)| *at).collect();
            if skip.len() == msgs.len() {
                break;
            }
            match self.apply_batch::<S>(&msgs, run, &skip).await {
                // A batch that reached its time bound commits what it applied; the rest is
                // the next batch.
                Ok(Batch::Applied {
                    upto,
                    orphans,
                    rejected,
                    failed: more,
                }) => {
                    for (at, env, error) in more {
                        let place = failed.partition_point(|(f, ..)| *f < at);
                        failed.insert(place, (at, env, error));
                    }
                    for (i, reason) in rejected {
                        self.record::<S>(&msgs[i], Outcome::Dead(reason)).await;
                    }
                    let later = failed.iter().position(|(at, ..)| *at >= upto);
                    let mut rest = later.map_or_else(Vec::new, |k| failed.split_off(k));
                    let mut failures = failed.drain(..).peekable();
                    for (i, msg) in msgs[..upto].iter().enumerate() {
                        if let Some((_, env, error)) = failures.next_if(|(at, ..)| *at == i) {
                            self.settle_failed::<S>(
                                msg, &env, error, shutdown, unsettled, receiver,
                            )
                            .await;
                        } else if orphans.contains(&i) {
                            self.settle::<S>(msg, shutdown, unsettled, receiver).await;
                        } else if !unsettled.contains(&(msg.topic.clone(), msg.partition)) {
                            store_offset(receiver, msg);
                        }
                    }
                    drop(failures);
                    msgs.drain(..upto);
                    for (at, ..) in &mut rest {
                        *at -= upto;
                    }
                    failed = rest;
                }
                Ok(Batch::RolledBack { at, env, error }) => {
                    let place = failed.partition_point(|(f, ..)| *f < at);
                    failed.insert(place, (at, env, error));
                }
                Err(e) => {
                    tracing::debug!(service = S::SERVICE, error = %e, "batch failed; applying one at a time");
                    break;
                }
            }
        }
        let mut failures = failed.into_iter().peekable();
        for (i, msg) in msgs.iter().enumerate() {
            match failures.next_if(|(at, ..)| *at == i) {
                Some((_, env, error)) => {
                    self.settle_failed::<S>(msg, &env, error, shutdown, unsettled, receiver)
                        .await;
                }
                None => self.settle::<S>(msg, shutdown, unsettled, receiver).await,
            }
        }
    }

    /// Records the failure of a message whose handler failed in a batch that rolled back, and
    /// stores its offset once that is done; when the record fails, the message takes the
    /// one-message path (its handler runs again). Nothing, when its partition has a message
    /// left unsettled before it.
    async fn settle_failed<S>(
        self: &Arc<Self>,
        msg: &Received,
        env: &Envelope,
        error: HandlerError,
        shutdown: &Shutdown,
        unsettled: &mut HashSet<(String, i32)>,
        receiver: &B::Receiver,
    ) where
        S: OutboxService,
    {
        if unsettled.contains(&(msg.topic.clone(), msg.partition)) {
            return;
        }
        match self.failed::<S>(msg, env, error).await {
            Ok(outcome) => {
                self.record::<S>(msg, outcome).await;
                store_offset(receiver, msg);
            }
            Err(e) => {
                tracing::debug!(service = S::SERVICE, event_id = %env.event_id, error = %e, "failure not recorded; applying on its own");
                self.settle::<S>(msg, shutdown, unsettled, receiver).await;
            }
        }
    }

    /// A message decoded for a batch.
    fn decoded<S: OutboxService>(&self, msg: &Received) -> Option<Decoded<S>> {
        let (env, event) = self.decode::<S>(msg)?;
        Some(Decoded {
            env,
            event,
            trace: trace_of(msg),
            tracestate: msg.header(crate::trace::TRACESTATE).map(str::to_owned),
        })
    }

    /// One message on its own; stores its offset once it is settled. Nothing, when its
    /// partition has a message left unsettled before it.
    async fn settle<S>(
        self: &Arc<Self>,
        msg: &Received,
        shutdown: &Shutdown,
        unsettled: &mut HashSet<(String, i32)>,
        receiver: &B::Receiver,
    ) where
        S: OutboxService,
    {
        if unsettled.contains(&(msg.topic.clone(), msg.partition)) {
            return;
        }
        if self.handle::<S>(msg, shutdown).await {
            store_offset(receiver, msg);
        } else {
            unsettled.insert((msg.topic.clone(), msg.partition));
        }
    }

    /// Applies every message of `run` (decoded from `msgs`) but those at the indexes `skip` in
    /// one transaction. An event the service must not process goes dead in that transaction
    /// too, with its reason. A handler that fails rolls the transaction back to the batch's
    /// last savepoint and the batch goes on without that message; with no savepoint (no
    /// handler failed lately), the whole transaction ([`Batch::RolledBack`]).
    async fn apply_batch<S>(
        &self,
        msgs: &[Received],
        run: Vec<Decoded<S>>,
        skip: &[usize],
    ) -> Result<Batch, Error>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let service = S::SERVICE;
        let guarded = self.savepoints();
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let mut rows = std::collections::HashMap::new();
        if self.config.dedupe == Dedupe::OutboxRow {
            let ids: Vec<&str> = run
                .iter()
                .enumerate()
                .filter(|(i, _)| !skip.contains(i))
                .map(|(_, d)| d.env.event_id.as_str())
                .collect();
            for row in self.outbox.lock_rows(&mut tx, service, &ids).await? {
                rows.insert(row.event_id.clone(), row);
            }
        }
        // The inbox records of the whole batch in one statement where the database tells which
        // it inserted; not with savepoints, since a rollback to one would keep the record of
        // the event whose handler failed.
        let fresh = if self.config.dedupe == Dedupe::Inbox && !guarded {
            let mut ids: Vec<&str> = run
                .iter()
                .enumerate()
                .filter(|(i, d)| !skip.contains(i) && d.event.is_ok())
                .map(|(_, d)| d.env.event_id.as_str())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            self.outbox
                .record_inbox_many(&mut tx, &self.route.group, &ids)
                .await?
        } else {
            None
        };
        let mut run: Vec<Option<Decoded<S>>> = run.into_iter().map(Some).collect();
        let mut skip = skip.to_vec();
        let mut failed = Vec::new();
        let mut done = Done::default();
        // Where the last savepoint was taken, and what was done before it.
        let mut mark: Option<(usize, Done)> = None;
        let mut since_mark = 0;
        // After a failure, a new savepoint once past it: the handlers before it run again
        // once, not once per later failure.
        let mut failed_at: Option<usize> = None;
        // The batch's locks are held until it commits: past its time bound, it commits what
        // it applied, and the rest goes into the next batch.
        let deadline = tokio::time::Instant::now() + self.config.batch_time;
        let mut upto = run.len();
        let mut i = 0;
        while i < run.len() {
            if i > 0 && tokio::time::Instant::now() >= deadline {
                upto = i;
                break;
            }
            let at = i;
            i += 1;
            // The same event twice in one batch (published again after a lease ran out).
            if skip.contains(&at) {
                continue;
            }
            let Some(d) = run[at].take() else {
                continue;
            };
            if !done.seen.insert(d.env.event_id.clone()) {
                continue;
            }
            if guarded
                && (mark.is_none()
                    || since_mark >= SAVEPOINT_EVERY
                    || failed_at.is_some_and(|f| at > f))
            {
                DB::execute_text(&mut tx, SAVEPOINT).await?;
                failed_at = None;
                // `seen` is the one part that already holds this message.
                let mut before = done.clone();
                before.seen.remove(&d.env.event_id);
                mark = Some((at, before));
                since_mark = 0;
            }
            let mut attempts = 0;
            let mut row_of = None;
            if self.config.dedupe == Dedupe::OutboxRow {
                let Some(row) = rows.get(&d.env.event_id) else {
                    // Dead-lettered on its own after the batch.
                    done.orphans.push(at);
                    continue;
                };
                if row.is_settled() {
                    continue;
                }
                attempts = row.attempts;
                row_of = Some((row.id, row.created_at));
            }
            let event = match d.event {
                Ok(event) => event,
                Err(rejection) => {
                    let reason = rejection.reason();
                    let error = rejection.to_string();
                    tracing::warn!(service, event_id = %d.env.event_id, %rejection, "dead-lettering a rejected event");
                    match row_of {
                        Some((id, _)) => {
                            self.outbox
                                .dead_locked(&mut tx, service, id, reason, &error)
                                .await?;
                        }
                        // In the inbox: recorded with its dead letter, unless it was already.
                        None => {
                            if !self
                                .keep_dead::<S>(&mut tx, &msgs[at], &d.env, reason, &error, 1)
                                .await?
                            {
                                continue;
                            }
                        }
                    }
                    done.rejected.push((at, reason));
                    continue;
                }
            };
            if self.config.dedupe == Dedupe::Inbox {
                let new = match &fresh {
                    Some(fresh) => fresh.contains(&d.env.event_id),
                    None => {
                        self.outbox
                            .record_inbox(&mut tx, &self.route.group, &d.env.event_id)
                            .await?
                    }
                };
                if !new {
                    continue;
                }
            }
            let mut ctx = Context {
                tx,
                meta: meta(&d.env, attempts, d.trace),
            };
            let span = consume_span(service, &d.env, d.trace);
            crate::trace::continue_from(
                &span,
                d.trace.map(|t| t.to_string()).as_deref(),
                d.tracestate.as_deref(),
            );
            let ran =
                tracing::Instrument::instrument(self.run_handler(event, &mut ctx, d.trace), span)
                    .await;
            tx = ctx.tx;
            match ran {
                Ok(()) => {
                    done.applied.extend(row_of);
                    done.handled += 1;
                    since_mark += 1;
                }
                Err(error) => {
                    self.suspects.add(&d.env.event_id);
                    self.failing();
                    let Some((from, before)) = &mark else {
                        tx.rollback().await?;
                        return Ok(Batch::RolledBack {
                            at,
                            env: d.env,
                            error,
                        });
                    };
                    // Back to the savepoint (which stays), and on from there without this
                    // message: the ones between run again.
                    DB::execute_text(&mut tx, ROLLBACK_TO_SAVEPOINT).await?;
                    for j in *from..at {
                        if run[j].is_none() {
                            run[j] = self.decoded::<S>(&msgs[j]);
                        }
                    }
                    done = before.clone();
                    since_mark = 0;
                    failed_at = Some(at);
                    skip.push(at);
                    failed.push((at, d.env, error));
                    i = *from;
                }
            }
        }
        if let Some(fresh) = &fresh {
            // Recorded up front, left for the next batch by the time bound: not applied yet.
            let left: Vec<&str> = run[upto..]
                .iter()
                .flatten()
                .map(|d| d.env.event_id.as_str())
                // (One that came twice and was applied before the bound stays.)
                .filter(|id| fresh.contains(*id) && !done.seen.contains(*id))
                .collect();
            if !left.is_empty() {
                self.outbox
                    .forget_inbox_many(&mut tx, &self.route.group, &left)
                    .await?;
            }
        }
        let ids: Vec<i64> = done.applied.iter().map(|(id, _)| *id).collect();
        self.outbox
            .mark_many_consumed(&mut tx, service, &ids)
            .await?;
        tx.commit().await?;
        let now = self.outbox.now_ms();
        let latency =
            metrics::histogram!("outbox_latency_seconds", "service" => service.to_owned());
        for (_, created) in &done.applied {
            latency.record((now - created).max(0) as f64 / 1000.0);
        }
        metrics::counter!("outbox_consumed_total", "service" => service.to_owned())
            .increment(done.handled);
        failed.sort_by_key(|(at, ..)| *at);
        Ok(Batch::Applied {
            upto,
            orphans: done.orphans,
            rejected: done.rejected,
            failed,
        })
    }

    /// Runs the handler of `event` in `ctx`, in its message's trace; a panic is its failure.
    async fn run_handler<S>(
        &self,
        event: S,
        ctx: &mut Context<DB>,
        trace: Option<TraceParent>,
    ) -> Result<(), HandlerError>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let dispatched = unwound(event.dispatch(&self.handler, ctx));
        match trace {
            Some(t) => t.child().scope(dispatched).await,
            None => dispatched.await,
        }
    }

    /// Whether batches take savepoints now: a handler failed in one lately.
    fn savepoints(&self) -> bool {
        self.savepoints_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// A handler failed in a batch: the batches take savepoints for a while.
    fn failing(&self) {
        *self
            .savepoints_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(tokio::time::Instant::now() + SAVEPOINTS_FOR);
    }

    /// Handles one message; false when it was left unsettled (its offset must not be stored).
    async fn handle<S>(self: &Arc<Self>, msg: &Received, shutdown: &Shutdown) -> bool
    where
        S: OutboxService,
    {
        let service = S::SERVICE;
        let Some(value) = msg.payload.as_deref() else {
            self.dead_letter(msg, "undecodable_envelope", "the message has no value")
                .await;
            return true;
        };
        let env = match envelope::decode(value) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(service, error = %e, "dead-lettering a message that is not an envelope");
                // A message that names its event (a row whose stored fields broke the envelope)
                // takes its row to dead, not leaves it published for good.
                if let Some(event_id) = envelope::event_id_of(value)
                    && self.config.dedupe == Dedupe::OutboxRow
                {
                    let rejected = match self.pool.acquire().await {
                        Ok(mut conn) => self
                            .outbox
                            .reject(
                                &mut conn,
                                service,
                                &event_id,
                                "undecodable_envelope",
                                &e.to_string(),
                            )
                            .await
                            .map(drop),
                        Err(db) => Err(db.into()),
                    };
                    if let Err(db) = rejected {
                        tracing::warn!(service, %event_id, error = %db, "row of an undecodable message not marked dead");
                    }
                }
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
        let env = if from_go(msg) {
            self.go_envelope(env)
        } else {
            env
        };
        let trace = trace_of(msg);
        let span = consume_span(service, &env, trace);
        crate::trace::continue_from(
            &span,
            msg.header(crate::trace::TRACEPARENT),
            msg.header(crate::trace::TRACESTATE),
        );
        let mut delay = Duration::from_millis(100);
        loop {
            let handled = tracing::Instrument::instrument(
                (self.kind.apply)(self, msg, &env, trace, shutdown),
                span.clone(),
            )
            .await;
            match handled {
                Ok(Outcome::Wait(why)) => {
                    tracing::debug!(service, event_id = %env.event_id, %why, "waiting");
                    if shutdown.is_triggered() {
                        return false;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Ok(outcome) => {
                    self.record::<S>(msg, outcome).await;
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

    async fn apply<S>(
        &self,
        msg: &Received,
        env: &Envelope,
        trace: Option<TraceParent>,
    ) -> Result<Outcome, Error>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let service = S::SERVICE;
        if self.go_bound::<S>(msg, env).await? {
            return self.apply_go::<S>(msg, env, trace).await;
        }
        let event = match self.accept::<S>(msg, env).await? {
            Ok(event) => event,
            Err(dead) => return Ok(dead),
        };
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let mut attempts = 0;
        let mut locked: Option<(i64, i64)> = None;
        match self.config.dedupe {
            Dedupe::OutboxRow => {
                let row;
                (tx, row) = match self.open_row::<S>(tx, msg, env).await? {
                    Ok(open) => open,
                    Err(settled) => return Ok(settled),
                };
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
        let meta = meta(env, attempts, trace);
        let mut ctx = Context { tx, meta };
        let ran = self.run_handler(event, &mut ctx, trace).await;
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
                self.failed::<S>(msg, env, e).await
            }
        }
    }

    /// A message the Go relay published, with its event id as every part of this outbox
    /// knows the Go row ([`crate::store::GoRoute::event_id`]): the Go default (the decimal row
    /// id, which rows of other Go tables share) becomes one derived from the table and id; an
    /// id the Go producer gave is kept, as the Go handlers' idempotency records hold it.
    fn go_envelope(&self, mut env: Envelope) -> Envelope {
        let table = self.outbox.go_route(&self.route.service).map_or_else(
            || crate::store::GoRoute::convention(&self.route.service),
            |r| r.table.clone(),
        );
        env.event_id = crate::store::GoRoute::event_id(&table, env.outbox_id, Some(&env.event_id));
        env
    }

    /// Whether a message is applied against its Go row: the service has a Go route, the
    /// message came from the Go relay, and no row of this outbox has its event id.
    async fn go_bound<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
    ) -> Result<bool, Error> {
        if self.config.dedupe != Dedupe::OutboxRow
            || !from_go(msg)
            || self.outbox.go_route(S::SERVICE).is_none()
        {
            return Ok(false);
        }
        let mut conn = self.pool.acquire().await?;
        Ok(self
            .outbox
            .get_by_event_id(&mut conn, S::SERVICE, &env.event_id)
            .await?
            .is_none())
    }

    /// Applies a message the Go relay published against its row in the service's Go table, by
    /// the Go rules (spec §3, §5.4), in one transaction: the row locked, skipped when consumed
    /// or dead, the handler run, the row marked consumed. A handler failure puts the row back to
    /// pending with the Go backoff (dead at its `max_retry`), for the Go relay to publish again;
    /// an event the service must not process, or a handler's refusal, marks it dead with the
    /// reason; a message whose row is not there is dead-lettered here (`no_go_row`).
    async fn apply_go<S>(
        &self,
        msg: &Received,
        env: &Envelope,
        trace: Option<TraceParent>,
    ) -> Result<Outcome, Error>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
    {
        let service = S::SERVICE;
        let id = env.outbox_id;
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let Some((status, retries)) = self.outbox.go_lock(&mut tx, service, id).await? else {
            tx.rollback().await?;
            let table = self
                .outbox
                .go_route(service)
                .map(|r| r.table.clone())
                .unwrap_or_default();
            let error = format!("no row {id} in the Go table `{table}`");
            return self.inbox_dead::<S>(msg, env, "no_go_row", &error, 1).await;
        };
        if status != "pending" && status != "published" {
            tx.rollback().await?;
            return Ok(Outcome::Skipped);
        }
        let event = match S::decode(&env.event_type, env.version, &env.payload) {
            Ok(event) => event,
            Err(rejection) => {
                let reason = rejection.reason();
                tracing::warn!(service, event_id = %env.event_id, %rejection, "Go row dead: rejected event");
                self.outbox
                    .go_dead(&mut tx, service, id, &format!("{reason}: {rejection}"))
                    .await?;
                tx.commit().await?;
                return Ok(Outcome::Dead(reason));
            }
        };
        let attempts = i32::try_from(retries).unwrap_or(i32::MAX);
        let mut ctx = Context {
            tx,
            meta: meta(env, attempts, trace),
        };
        let ran = self.run_handler(event, &mut ctx, trace).await;
        let error = match ran {
            Ok(()) => {
                let Context { mut tx, .. } = ctx;
                self.outbox.go_consumed(&mut tx, service, id).await?;
                tx.commit().await?;
                return Ok(Outcome::Applied);
            }
            Err(e) => e,
        };
        drop(ctx);
        let mut conn = self.pool.acquire().await?;
        if error.is_permanent() {
            let reason = format!("handler_rejected: {error}");
            self.outbox.go_dead(&mut conn, service, id, &reason).await?;
            return Ok(Outcome::Dead("handler_rejected"));
        }
        tracing::warn!(service, event_id = %env.event_id, %error, "handler failed; the Go row waits for the Go relay");
        let reason = format!("consume failed: {error}");
        Ok(
            match self
                .outbox
                .go_retry(&mut conn, service, id, &reason)
                .await?
            {
                crate::store::GoRetry::Pending => Outcome::Retrying,
                crate::store::GoRetry::Dead => Outcome::Dead("max_attempts"),
                crate::store::GoRetry::Settled => Outcome::Skipped,
            },
        )
    }

    /// The event of `env`, or the outcome of its rejection: dead with its reason (in the
    /// consumer's database in inbox mode, else on its outbox row).
    async fn accept<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
    ) -> Result<Result<S, Outcome>, Error> {
        let service = S::SERVICE;
        let rejection = match S::decode(&env.event_type, env.version, &env.payload) {
            Ok(event) => return Ok(Ok(event)),
            Err(rejection) => rejection,
        };
        let reason = rejection.reason();
        tracing::warn!(service, event_id = %env.event_id, %rejection, "dead-lettering a rejected event");
        if self.config.dedupe == Dedupe::Inbox {
            // The producer's row is in another database: the dead letter is kept here.
            return Ok(Err(self
                .inbox_dead::<S>(msg, env, reason, &rejection.to_string(), 1)
                .await?));
        }
        let mut conn = self.pool.acquire().await?;
        let changed = self
            .outbox
            .reject(
                &mut conn,
                service,
                &env.event_id,
                reason,
                &rejection.to_string(),
            )
            .await?;
        if !changed
            && self
                .outbox
                .get_by_event_id(&mut conn, service, &env.event_id)
                .await?
                .is_none()
        {
            // No row to take dead (relayed by another system, or deleted): never dropped
            // silently, the dead letter is kept here.
            drop(conn);
            let error = format!("{rejection}; no row of the event in this service's table");
            return Ok(Err(self
                .inbox_dead::<S>(msg, env, reason, &error, 1)
                .await?));
        }
        Ok(Err(Outcome::Dead(reason)))
    }

    /// The event's row, locked in `tx`, when it is still to be applied; else what became of
    /// the message (`tx` rolled back): skipped when the row is settled (a row dead only because
    /// its lease ran out on the last attempt may have been published, and this is its message:
    /// it is applied), dead-lettered when there is none.
    async fn open_row<S: OutboxService>(
        &self,
        mut tx: sqlx::Transaction<'static, DB>,
        msg: &Received,
        env: &Envelope,
    ) -> Result<Result<(sqlx::Transaction<'static, DB>, OutboxRow), Outcome>, Error> {
        match self
            .outbox
            .lock_row(&mut tx, S::SERVICE, &env.event_id)
            .await?
        {
            Some(row) if !row.is_settled() => Ok(Ok((tx, row))),
            Some(_) => {
                tx.rollback().await?;
                Ok(Err(Outcome::Skipped))
            }
            None => {
                tx.rollback().await?;
                Ok(Err(self.orphan::<S>(msg, env).await?))
            }
        }
    }

    /// A message of this service whose event has no row in its table (relayed by another
    /// system, or its row deleted): never skipped silently, it is dead-lettered in this database
    /// (`outbox_inbox_dead`, reason `no_outbox_row`) and counted, and the partition moves on.
    async fn orphan<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
    ) -> Result<Outcome, Error> {
        let table = self
            .outbox
            .catalog()
            .service(S::SERVICE)
            .map(|r| r.table.clone())
            .unwrap_or_default();
        let mut error = format!("no row of event `{}` in `{table}`", env.event_id);
        if from_go(msg) {
            let what = if self.outbox.go_route(S::SERVICE).is_none() {
                format!(
                    "declare service `{}`'s Go route to apply it against its Go row",
                    S::SERVICE
                )
            } else {
                "a handler outside any transaction does not apply Go rows".to_owned()
            };
            error.push_str(&format!(
                "; the Go relay published it (outbox_id {}): {what}",
                env.outbox_id
            ));
        }
        self.inbox_dead::<S>(msg, env, "no_outbox_row", &error, 1)
            .await
    }

    /// Applies one message with a handler that runs outside any transaction: claims its call
    /// (a lease, committed at once), calls the handler with no transaction open, then records
    /// the outcome. See the [module documentation](self#two-kinds-of-handler).
    async fn call<S>(
        &self,
        msg: &Received,
        env: &Envelope,
        trace: Option<TraceParent>,
        shutdown: &Shutdown,
    ) -> Result<Outcome, Error>
    where
        S: OutboxService + Dispatch<H, Call>,
    {
        let service = S::SERVICE;
        let event = match self.accept::<S>(msg, env).await? {
            Ok(event) => event,
            Err(dead) => return Ok(dead),
        };
        let group = self.route.group.as_str();
        let lease = self.config.call_lease;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let lease_until = self.outbox.now_ms().saturating_add(lease_ms);

        // 1. The claim.
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let (insert, row, cap) = match self.config.dedupe {
            Dedupe::OutboxRow => {
                let row;
                (tx, row) = match self.open_row::<S>(tx, msg, env).await? {
                    Ok(open) => open,
                    Err(settled) => return Ok(settled),
                };
                let cap = u32::try_from(row.max_attempts).unwrap_or(1).max(1);
                (true, Some(row), cap)
            }
            // The inbox record is made with the claim: with a call open it means "claimed",
            // without one "done" (or dead).
            Dedupe::Inbox => {
                let fresh = self
                    .outbox
                    .record_inbox(&mut tx, group, &env.event_id)
                    .await?;
                (fresh, None, self.config.inbox_attempts)
            }
        };
        let claim = self
            .outbox
            .claim_call(
                &mut tx,
                group,
                &env.event_id,
                &self.owner,
                lease_until,
                insert,
            )
            .await?;
        let attempt = match claim {
            CallClaim::None => {
                tx.rollback().await?;
                return Ok(Outcome::Skipped);
            }
            CallClaim::Held { owner, until } => {
                tx.rollback().await?;
                return Ok(Outcome::Wait(format!(
                    "its call is held by `{owner}` until {until}"
                )));
            }
            // Claimed more often than it may be tried, and no call ever returned: the process
            // died in it, again and again.
            CallClaim::Claimed {
                attempts,
                last_error,
            } if attempts > cap => {
                let tried = attempts - 1;
                let error = last_error.unwrap_or_else(|| {
                    format!("{tried} calls were claimed and none returned (the process stopped in the handler)")
                });
                return self
                    .call_dead::<S>(tx, msg, env, "max_attempts", &error, tried)
                    .await;
            }
            CallClaim::Claimed { attempts, .. } => attempts,
        };
        tx.commit().await?;

        // 2. The call: no transaction is open, and it may take at most its lease.
        let mut call = Call {
            meta: meta(env, row.as_ref().map_or(0, |r| r.attempts), trace),
            attempt,
            deadline: tokio::time::Instant::now() + lease,
        };
        let dispatched =
            tokio::time::timeout(lease, unwound(event.dispatch(&self.handler, &mut call)));
        let ran = match trace {
            Some(t) => t.child().scope(dispatched).await,
            None => dispatched.await,
        }
        .unwrap_or_else(|_| {
            Err(HandlerError::retry(format!(
                "the handler ran past its lease of {lease:?} and was cancelled"
            )))
        });

        // 3. The outcome, recorded until that works (never calling again), or until shutdown:
        // then the lease runs out and the redelivery calls again.
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .record_call::<S>(msg, env, row.as_ref(), attempt, cap, &ran)
                .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(e) => {
                    tracing::warn!(service, event_id = %env.event_id, error = %e, "the call returned, its outcome is not recorded yet; retrying");
                    if shutdown.is_triggered() {
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Records what a call outside a transaction returned: done; dead when it refused the
    /// event or its attempts are used up; else, with an outbox row, a retry through the outbox,
    /// and in the inbox the call given back for its next attempt.
    async fn record_call<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
        row: Option<&OutboxRow>,
        attempt: u32,
        cap: u32,
        ran: &Result<(), HandlerError>,
    ) -> Result<Outcome, Error> {
        let service = S::SERVICE;
        let group = self.route.group.as_str();
        let e = match ran {
            Ok(()) => {
                let mut tx = DB::begin_pool_write(&self.pool).await?;
                if let Some(row) = row {
                    self.outbox.mark_consumed(&mut tx, service, row.id).await?;
                }
                self.outbox
                    .finish_call(&mut tx, group, &env.event_id)
                    .await?;
                tx.commit().await?;
                if let Some(row) = row {
                    let secs = (self.outbox.now_ms() - row.created_at).max(0) as f64 / 1000.0;
                    metrics::histogram!("outbox_latency_seconds", "service" => service.to_owned())
                        .record(secs);
                }
                return Ok(Outcome::Applied);
            }
            Err(e) => e,
        };
        let error = e.to_string();
        let tx = DB::begin_pool_write(&self.pool).await?;
        if e.is_permanent() {
            return self
                .call_dead::<S>(tx, msg, env, "handler_rejected", &error, attempt)
                .await;
        }
        tracing::warn!(service, event_id = %env.event_id, attempt, %error, "call failed");
        let mut tx = tx;
        let now = self.outbox.now_ms();
        if row.is_some() {
            // A shared database: back through the outbox, like a failed handler in a
            // transaction; the republished message takes the call again, one attempt more.
            let transition = self
                .outbox
                .consume_failed(&mut tx, service, &env.event_id, &error)
                .await?;
            if transition == Transition::Dead {
                self.outbox
                    .finish_call(&mut tx, group, &env.event_id)
                    .await?;
            } else {
                self.outbox
                    .release_call(&mut tx, group, &env.event_id, &self.owner, now, &error)
                    .await?;
            }
            tx.commit().await?;
            return Ok(match transition {
                Transition::Dead => Outcome::Dead("max_attempts"),
                Transition::Retrying { .. } => Outcome::Retrying,
                Transition::Unchanged => Outcome::Skipped,
            });
        }
        if attempt >= cap {
            return self
                .call_dead::<S>(tx, msg, env, "max_attempts", &error, attempt)
                .await;
        }
        self.outbox
            .release_call(&mut tx, group, &env.event_id, &self.owner, now, &error)
            .await?;
        tx.commit().await?;
        Ok(Outcome::Wait(error))
    }

    /// Takes an event whose call is open to dead, in `tx` (which may hold its claim), and
    /// forgets the call.
    async fn call_dead<S: OutboxService>(
        &self,
        mut tx: sqlx::Transaction<'static, DB>,
        msg: &Received,
        env: &Envelope,
        reason: &'static str,
        error: &str,
        attempts: u32,
    ) -> Result<Outcome, Error> {
        let service = S::SERVICE;
        match self.config.dedupe {
            Dedupe::OutboxRow => {
                self.outbox
                    .reject(&mut tx, service, &env.event_id, reason, error)
                    .await?;
            }
            Dedupe::Inbox => {
                // The claim made the inbox record already.
                self.outbox
                    .record_inbox(&mut tx, &self.route.group, &env.event_id)
                    .await?;
                let dead = self.inbox_letter(msg, env, reason, error, attempts);
                self.outbox.record_inbox_dead(&mut tx, &dead).await?;
            }
        }
        self.outbox
            .finish_call(&mut tx, &self.route.group, &env.event_id)
            .await?;
        tx.commit().await?;
        tracing::warn!(service, event_id = %env.event_id, reason, error, "dead");
        Ok(Outcome::Dead(reason))
    }

    /// Records a handler's failure: dead at once when it refused the event for good, else a
    /// retry through the outbox with backoff (dead when the attempts are used up), or, in the
    /// inbox, a retry kept in the consumer's database ([`Inner::park`]).
    async fn failed<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
        e: HandlerError,
    ) -> Result<Outcome, Error> {
        let service = S::SERVICE;
        let error = e.to_string();
        if self.config.dedupe == Dedupe::Inbox {
            if e.is_permanent() {
                return self
                    .inbox_dead::<S>(msg, env, "handler_rejected", &error, 1)
                    .await;
            }
            tracing::warn!(service, event_id = %env.event_id, %error, "handler failed");
            return self.park::<S>(msg, env, &error).await;
        }
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

    /// Keeps a message whose handler failed (inbox mode) in the consumer's database, to be tried
    /// again after a backoff while its partition moves on ([`Inner::retry_kept`]); dead with
    /// `max_attempts` once [`ConsumerConfig::inbox_attempts`] attempts have failed (the dead
    /// letter and the inbox record in one transaction). A kept retry that goes dead is left
    /// for its caller to forget once the dead letter is on its topic too, so that no one who
    /// waits for the consumer's kept retries to be gone (the test harness) finds the topic
    /// without it; should the consumer stop in between, the retry comes due again, finds the
    /// event in the inbox and is forgotten.
    async fn park<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
        error: &str,
    ) -> Result<Outcome, Error> {
        let group = self.route.group.as_str();
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        let kept = self
            .outbox
            .inbox_retry(&mut tx, group, &env.event_id)
            .await?;
        let attempts = kept.as_ref().map_or(0, |k| k.attempts).saturating_add(1);
        if u32::try_from(attempts).unwrap_or(u32::MAX) >= self.config.inbox_attempts {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            let dead = self
                .keep_dead::<S>(&mut tx, msg, env, "max_attempts", error, attempts)
                .await?;
            tx.commit().await?;
            // Not dead: a redelivery of it was applied meanwhile.
            return Ok(if dead {
                Outcome::Dead("max_attempts")
            } else {
                Outcome::Skipped
            });
        }
        let backoff = self.outbox.config().backoff(attempts);
        let retry = InboxRetry {
            group: group.to_owned(),
            event_id: env.event_id.clone(),
            topic: msg.topic.clone(),
            message_key: msg.key_str(),
            envelope: String::from_utf8_lossy(msg.payload.as_deref().unwrap_or_default())
                .into_owned(),
            traceparent: msg.header(crate::trace::TRACEPARENT).map(str::to_owned),
            attempts,
            next_attempt_at: self
                .outbox
                .now_ms()
                .saturating_add(i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX)),
            last_error: error.to_owned(),
        };
        self.outbox
            .park_inbox_retry(&mut tx, &retry, kept.is_some())
            .await?;
        tx.commit().await?;
        Ok(Outcome::Retrying)
    }

    /// Tries the messages this consumer's group kept for another attempt (inbox mode) as they
    /// come due, until `shutdown` or `stop`. Each is taken under a lease first
    /// ([`RETRY_LEASE`]), so that several consumers of the group never try one at once, and a
    /// consumer that dies while trying one leaves it due again after the lease.
    async fn retry_kept<S: OutboxService>(
        self: Arc<Self>,
        mut shutdown: Shutdown,
        mut stop: Shutdown,
    ) {
        loop {
            let next = match self.retry_due::<S>(&shutdown).await {
                // Until the next one is due; at most a second, for one another consumer keeps.
                Ok(()) => match self.pool.acquire().await {
                    Ok(mut conn) => self
                        .outbox
                        .next_inbox_retry_at(&mut conn, &self.route.group)
                        .await
                        .ok()
                        .flatten(),
                    Err(_) => None,
                },
                // A second from now.
                Err(e) => {
                    tracing::warn!(service = S::SERVICE, error = %e, "kept retries not read; trying again");
                    None
                }
            };
            let wait = next.map_or(1000, |at| (at - self.outbox.now_ms()).clamp(0, 1000));
            let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(1000));
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = stop.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Tries every kept retry of this group that is due now.
    async fn retry_due<S: OutboxService>(&self, shutdown: &Shutdown) -> Result<(), Error> {
        let group = self.route.group.as_str();
        let due = {
            let mut conn = self.pool.acquire().await?;
            self.outbox.due_inbox_retries(&mut conn, group, 32).await?
        };
        for retry in due {
            if shutdown.is_triggered() {
                break;
            }
            let taken = {
                let mut conn = self.pool.acquire().await?;
                self.outbox
                    .take_inbox_retry(&mut conn, &retry, RETRY_LEASE)
                    .await?
            };
            if !taken {
                continue;
            }
            let mut headers = Vec::new();
            if let Some(t) = &retry.traceparent {
                headers.push((
                    crate::trace::TRACEPARENT.to_owned(),
                    Some(t.clone().into_bytes()),
                ));
            }
            let msg = Received {
                topic: retry.topic.clone(),
                partition: -1,
                offset: -1,
                key: retry.message_key.clone().map(String::into_bytes),
                payload: Some(retry.envelope.clone().into_bytes()),
                headers,
            };
            let outcome = match envelope::decode(retry.envelope.as_bytes()) {
                Ok(env) => {
                    let trace = trace_of(&msg);
                    let span = consume_span(S::SERVICE, &env, trace);
                    let applied = (self.kind.apply)(self, &msg, &env, trace, shutdown);
                    tracing::Instrument::instrument(applied, span).await
                }
                // It was an envelope when it was kept.
                Err(e) => {
                    let mut conn = self.pool.acquire().await?;
                    let dead = InboxDead {
                        group: group.to_owned(),
                        event_id: retry.event_id.clone(),
                        event_type: String::new(),
                        event_version: 0,
                        topic: retry.topic.clone(),
                        reason: "undecodable_envelope".to_owned(),
                        last_error: e.to_string(),
                        attempts: retry.attempts,
                        envelope: retry.envelope.clone(),
                        dead_at: self.outbox.now_ms(),
                        message_key: retry.message_key.clone(),
                    };
                    self.outbox.record_inbox_dead(&mut conn, &dead).await?;
                    Ok(Outcome::Dead("undecodable_envelope"))
                }
            };
            match outcome {
                // Kept again, one attempt more.
                Ok(Outcome::Retrying) => {}
                // Settled: its dead letter sent (when dead) before it is forgotten.
                Ok(outcome) => {
                    self.record::<S>(&msg, outcome).await;
                    let mut conn = self.pool.acquire().await?;
                    self.outbox
                        .forget_inbox_retry(&mut conn, group, &retry.event_id)
                        .await?;
                }
                // Tried again once its lease is over.
                Err(e) => {
                    tracing::warn!(service = S::SERVICE, event_id = %retry.event_id, error = %e, "kept retry failed; trying again after its lease");
                }
            }
        }
        Ok(())
    }

    /// Keeps a dead letter in the consumer's database (inbox mode), in one transaction with
    /// the event's inbox record, so that a redelivery of the event is skipped.
    async fn inbox_dead<S: OutboxService>(
        &self,
        msg: &Received,
        env: &Envelope,
        reason: &'static str,
        error: &str,
        attempts: u32,
    ) -> Result<Outcome, Error> {
        let mut tx = DB::begin_pool_write(&self.pool).await?;
        if !self
            .keep_dead::<S>(&mut tx, msg, env, reason, error, attempts)
            .await?
        {
            tx.rollback().await?;
            return Ok(Outcome::Skipped);
        }
        tx.commit().await?;
        Ok(Outcome::Dead(reason))
    }

    /// Records the event of `msg` in the inbox with its dead letter, in `tx`; false (nothing
    /// written) when the inbox has it already (applied, or dead before).
    async fn keep_dead<S: OutboxService>(
        &self,
        tx: &mut DB::Connection,
        msg: &Received,
        env: &Envelope,
        reason: &str,
        error: &str,
        attempts: u32,
    ) -> Result<bool, Error> {
        if !self
            .outbox
            .record_inbox(tx, &self.route.group, &env.event_id)
            .await?
        {
            return Ok(false);
        }
        let dead = self.inbox_letter(msg, env, reason, error, attempts);
        self.outbox.record_inbox_dead(tx, &dead).await?;
        tracing::warn!(service = S::SERVICE, event_id = %env.event_id, reason, error, "dead letter kept in the consumer's database");
        Ok(true)
    }

    /// The dead letter of a message, kept in the consumer's database (inbox mode).
    fn inbox_letter(
        &self,
        msg: &Received,
        env: &Envelope,
        reason: &str,
        error: &str,
        attempts: u32,
    ) -> InboxDead {
        InboxDead {
            group: self.route.group.clone(),
            event_id: env.event_id.clone(),
            event_type: env.event_type.clone(),
            event_version: i32::try_from(env.version).unwrap_or(i32::MAX),
            topic: msg.topic.clone(),
            reason: reason.to_owned(),
            last_error: error.to_owned(),
            attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
            envelope: String::from_utf8_lossy(msg.payload.as_deref().unwrap_or_default())
                .into_owned(),
            dead_at: self.outbox.now_ms(),
            message_key: msg.key_str(),
        }
    }

    /// Counts a settled message's outcome and dead-letters it when it is dead.
    async fn record<S: OutboxService>(&self, msg: &Received, outcome: Outcome) {
        let service = S::SERVICE;
        let labels = [("service", service.to_owned())];
        match outcome {
            Outcome::Applied => metrics::counter!("outbox_consumed_total", &labels).increment(1),
            Outcome::Retrying => metrics::counter!("outbox_retried_total", &labels).increment(1),
            Outcome::Dead(reason) => {
                metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => reason).increment(1);
                self.dead_letter(msg, reason, "").await;
            }
            Outcome::Skipped | Outcome::Wait(_) => {}
        }
    }

    /// Sends a dead message to `<topic>.dlq` with the reason, when configured.
    async fn dead_letter(&self, msg: &Received, reason: &str, detail: &str) {
        if !self.config.dlq {
            return;
        }
        let mut headers = vec![("x-outbox-dead-reason", reason.to_owned())];
        if !detail.is_empty() {
            headers.push(("x-outbox-dead-detail", detail.to_owned()));
        }
        let record = Outgoing {
            topic: format!("{}.dlq", msg.topic),
            key: msg.key_str(),
            value: msg.payload.clone().unwrap_or_default(),
            headers,
        };
        if let Err(e) = self.bus.send(&record).await {
            tracing::warn!(error = %e, "dead-letter topic publish failed");
        }
    }
}

/// Runs a handler, turning its panic into a failure to retry: the event goes back through the
/// outbox with backoff and, if it panics every time, dead with `max_attempts` and the panic's
/// message as its last error. Without this a panic would end the partition's worker, and its
/// later messages would wait for a restart. (A build with `panic = "abort"` cannot unwind: there
/// a panic still ends the process.)
async fn unwound<F>(handler: F) -> Result<(), HandlerError>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    let mut handler = std::pin::pin!(handler);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
            Ok(polled) => polled,
            // Ready, so never polled again; the caller rolls back the handler's transaction.
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string payload".to_owned());
                std::task::Poll::Ready(Err(HandlerError::retry(format!(
                    "the handler panicked: {message}"
                ))))
            }
        }
    })
    .await
}

/// Partitions whose group offset has not moved while they had messages to read: the watch that
/// makes a consumer rejoin its group.
#[derive(Debug, Default)]
struct Stalls {
    /// Per partition: the committed offset seen, since when, and whether a rejoin was made for
    /// it already.
    seen: std::collections::HashMap<(String, i32), (i64, tokio::time::Instant, bool)>,
}

impl Stalls {
    /// Takes the group's positions in; returns a partition stuck at one offset with messages
    /// behind it for `after`, once per such offset.
    fn look(&mut self, positions: Vec<Position>, after: Duration) -> Option<Position> {
        let now = tokio::time::Instant::now();
        let mut stuck = None;
        let mut keep = HashSet::new();
        for p in positions {
            let key = (p.topic.clone(), p.partition);
            if p.end <= p.committed {
                continue;
            }
            keep.insert(key.clone());
            let entry = self.seen.entry(key).or_insert((p.committed, now, false));
            if entry.0 != p.committed {
                *entry = (p.committed, now, false);
            } else if !entry.2 && now.duration_since(entry.1) >= after {
                entry.2 = true;
                stuck.get_or_insert(p);
            }
        }
        self.seen.retain(|k, _| keep.contains(k));
        stuck
    }
}

/// What a batch has done so far, to be committed (or undone to a savepoint).
#[derive(Debug, Clone, Default)]
struct Done {
    /// The rows to mark consumed: id and creation time.
    applied: Vec<(i64, i64)>,
    orphans: Vec<usize>,
    rejected: Vec<(usize, &'static str)>,
    /// Event ids met so far.
    seen: HashSet<String>,
    handled: u64,
}

/// A message of a batch, decoded.
struct Decoded<S> {
    env: Envelope,
    /// The event, or why the service must not process it.
    event: Result<S, Rejection>,
    trace: Option<TraceParent>,
    tracestate: Option<String>,
}

/// Whether the Go system's relay published a message: it carries none of the CloudEvents
/// headers this relay writes (the Go relay writes no header).
fn from_go(msg: &Received) -> bool {
    msg.header("ce_specversion").is_none()
}

fn store_offset<R: Receive>(receiver: &R, msg: &Received) {
    if let Err(e) = receiver.store_offset(&msg.topic, msg.partition, msg.offset) {
        // After a rebalance the partition may be another member's now; it will see the message
        // again and skip it.
        tracing::debug!(error = %e, "offset not stored");
    }
}

fn meta(env: &Envelope, attempts: i32, trace: Option<TraceParent>) -> Meta {
    Meta {
        event_id: env.event_id.clone(),
        outbox_id: env.outbox_id,
        event_type: env.event_type.clone(),
        version: env.version,
        attempts,
        trace,
    }
}

fn consume_span(service: &str, env: &Envelope, trace: Option<TraceParent>) -> tracing::Span {
    tracing::info_span!(
        "outbox.consume",
        service,
        event_id = %env.event_id,
        event_type = %env.event_type,
        outbox_id = env.outbox_id,
        trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
    )
}

fn trace_of(msg: &Received) -> Option<TraceParent> {
    msg.header("traceparent")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_keep_the_most_recent_ones_up_to_their_capacity() {
        let s = Suspects::default();
        for i in 0..=Suspects::CAPACITY {
            s.add(&format!("e{i}"));
        }
        // Adding one again does not make it newer, nor take a place.
        s.add("e1");
        assert!(!s.contains("e0"), "the oldest went when one more came");
        assert!(s.contains("e1"));
        assert!(s.contains(&format!("e{}", Suspects::CAPACITY)));
        s.add("another");
        assert!(!s.contains("e1"));
        assert!(s.contains("e2"));
    }

    #[tokio::test]
    async fn a_handler_panic_becomes_a_retryable_error_with_its_message() {
        let caught = unwound(async { panic!("no client for {}", "feishu") }).await;
        let e = caught.unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "the handler panicked: no client for feishu");

        let caught = unwound(async { std::panic::panic_any(7u8) }).await;
        assert_eq!(
            caught.unwrap_err().to_string(),
            "the handler panicked: a non-string payload"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_stuck_at_one_offset_is_reported_once_per_offset() {
        let after = Duration::from_secs(10);
        let at = |committed, end| Position {
            topic: "t".into(),
            partition: 1,
            committed,
            end,
        };
        let mut stalls = Stalls::default();
        assert_eq!(stalls.look(vec![at(5, 10)], after), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(stalls.look(vec![at(5, 10)], after), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(stalls.look(vec![at(5, 10)], after), Some(at(5, 10)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(stalls.look(vec![at(5, 11)], after), None, "once per offset");
        // It moved: a new wait.
        assert_eq!(stalls.look(vec![at(6, 11)], after), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(stalls.look(vec![at(6, 11)], after), Some(at(6, 11)));
        // Caught up: forgotten; a lag that comes back later waits from then.
        assert_eq!(stalls.look(vec![at(11, 11)], after), None);
        assert_eq!(stalls.look(vec![at(11, 12)], after), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(stalls.look(vec![at(11, 12)], after), None);
    }

    #[tokio::test]
    async fn a_handler_that_returns_passes_its_result_through() {
        assert!(unwound(async { Ok(()) }).await.is_ok());
        let e = unwound(async {
            tokio::task::yield_now().await;
            Err(HandlerError::permanent("refused"))
        })
        .await
        .unwrap_err();
        assert!(e.is_permanent());
        assert_eq!(e.to_string(), "refused");
    }
}
