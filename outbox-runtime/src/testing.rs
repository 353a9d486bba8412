//! A test harness for your handlers (the `testing` feature): the whole runtime (store, relay,
//! consumers) on in-memory SQLite (or a pool you pass) and the in-memory bus, in a plain
//! `#[tokio::test]`, with no broker and no sleeps.
//!
//! ```
//! # use outbox_runtime::{HandlerError, OutboxEvent, OutboxService, Context};
//! # use outbox_runtime::sqlx::Sqlite;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
//! # #[outbox(event_type = "task.urgency.promote.requested", version = 1, service = "task", key = user_id)]
//! # pub struct UrgencyPromoteRequested { pub user_id: u64 }
//! # #[derive(OutboxService)]
//! # #[outbox(service = "task")]
//! # pub enum TaskEvents { UrgencyPromoteRequested(UrgencyPromoteRequested) }
//! # struct Promoter;
//! # impl TaskEventsHandler<Context<Sqlite>> for Promoter {
//! #     async fn urgency_promote_requested(&self, _: &mut Context<Sqlite>, e: UrgencyPromoteRequested) -> Result<(), HandlerError> {
//! #         if e.user_id == 0 { return Err(HandlerError::permanent("no user 0")); }
//! #         Ok(())
//! #     }
//! # }
//! use outbox_runtime::testing::Harness;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let mut h = Harness::builder().consumer::<TaskEvents, _>(Promoter).start().await?;
//! h.enqueue(&UrgencyPromoteRequested { user_id: 7 }).await?;
//! h.enqueue(&UrgencyPromoteRequested { user_id: 0 }).await?;
//! h.run_until_idle().await?;
//!
//! assert_eq!(h.published("task").await.len(), 2);
//! assert_eq!(h.applied("task").await?.len(), 1);
//! let dead = h.dead("task").await?;
//! assert_eq!(dead[0].reason, "handler_rejected");
//! assert_eq!(dead[0].error, "no user 0");
//! h.shutdown().await?;
//! # Ok::<(), outbox_runtime::Error>(())
//! # }).unwrap();
//! ```

use std::time::Duration;

use sqlx::Pool;
use sqlx::sqlite::{Sqlite, SqlitePoolOptions};

use outbox_contract::envelope::{self, Envelope};
use outbox_contract::event::{Listed, OutboxEvent};
use outbox_contract::route::RouteConfig;
use outbox_contract::service::{Dispatch, OutboxService};

use crate::bus::{MemoryBus, Outgoing, Publish, Received};
use crate::consumer::{Call, ConsumerConfig, Context};
use crate::engine::{Engine, EngineBuilder, Running};
use crate::error::Error;
use crate::relay::RelayConfig;
use crate::store::{Arg, Backend, COLUMNS, Enqueued, Outbox, OutboxRow, Status, StoreConfig};

/// Builds a [`Harness`].
#[derive(Debug)]
pub struct HarnessBuilder<DB: Backend> {
    engine: EngineBuilder<DB, MemoryBus>,
    pool: Pool<DB>,
    bus: MemoryBus,
    consumers: Vec<&'static str>,
    store: StoreConfig,
    skip_backoff: bool,
    timeout: Duration,
}

/// The runtime of some services on the in-memory bus, to drive and inspect from a test. See
/// the [module documentation](self).
#[derive(Debug)]
pub struct Harness<DB: Backend> {
    running: Running<DB, MemoryBus>,
    pool: Pool<DB>,
    bus: MemoryBus,
    consumers: Vec<&'static str>,
    skip_backoff: bool,
    timeout: Duration,
}

/// A dead row: its event, its reason and its last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    /// The event id.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Why it is dead: `handler_rejected`, `max_attempts`, `invalid_payload`,
    /// `unsupported_version`, `message_too_large`, ...
    pub reason: String,
    /// The last error (a handler's message, a validation's violations).
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
}

/// A message a consumer sent to `<topic>.dlq`, with the reason it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `x-outbox-dead-reason`.
    pub reason: String,
    /// `x-outbox-dead-detail`, when there was one.
    pub detail: Option<String>,
    /// The message as it arrived.
    pub message: Received,
}

impl Harness<Sqlite> {
    /// A harness on a new in-memory SQLite database (one connection, so that every part of
    /// the runtime sees the same database).
    pub fn builder() -> HarnessBuilder<Sqlite> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy("sqlite::memory:")
            .expect("`sqlite::memory:` is a valid URL");
        Self::on(pool)
    }
}

impl<DB: Backend> Harness<DB> {
    /// A harness on `pool` (a test database of yours, PostgreSQL or MySQL too).
    pub fn on(pool: Pool<DB>) -> HarnessBuilder<DB> {
        let bus = MemoryBus::new();
        HarnessBuilder {
            engine: Engine::builder(pool.clone(), bus.clone()),
            pool,
            bus,
            consumers: Vec::new(),
            store: StoreConfig::default(),
            skip_backoff: true,
            timeout: Duration::from_secs(30),
        }
    }
}

impl<DB: Backend> HarnessBuilder<DB> {
    /// Adds service `S` (its events are relayed; nothing consumes them here).
    pub fn service<S: OutboxService>(mut self) -> Self {
        self.engine = self.engine.service::<S>();
        self
    }

    /// Runs a consumer of `S` with `handler`, sending what it dead-letters to `<topic>.dlq`
    /// (see [`Harness::dead_letters`]).
    pub fn consumer<S, H>(self, handler: H) -> Self
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
        H: Send + Sync + 'static,
    {
        self.consumer_with::<S, H>(handler, ConsumerConfig::default().dlq(true))
    }

    /// [`HarnessBuilder::consumer`] with settings.
    pub fn consumer_with<S, H>(mut self, handler: H, config: ConsumerConfig) -> Self
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
        H: Send + Sync + 'static,
    {
        self.engine = self.engine.consumer_with::<S, H>(handler, config);
        self.consumers.push(S::SERVICE);
        self
    }

    /// Runs a consumer of `S` whose `handler` runs outside any transaction (see
    /// [`crate::Engine`]'s `call_consumer`), sending what it dead-letters to `<topic>.dlq`.
    pub fn call_consumer<S, H>(self, handler: H) -> Self
    where
        S: OutboxService + Dispatch<H, Call>,
        H: Send + Sync + 'static,
    {
        self.call_consumer_with::<S, H>(handler, ConsumerConfig::default().dlq(true))
    }

    /// [`HarnessBuilder::call_consumer`] with settings.
    pub fn call_consumer_with<S, H>(mut self, handler: H, config: ConsumerConfig) -> Self
    where
        S: OutboxService + Dispatch<H, Call>,
        H: Send + Sync + 'static,
    {
        self.engine = self.engine.call_consumer_with::<S, H>(handler, config);
        self.consumers.push(S::SERVICE);
        self
    }

    /// The harness's database, to create your own tables in before [`HarnessBuilder::start`].
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Route settings (a prefix, overrides).
    pub fn routes(mut self, routes: RouteConfig) -> Self {
        self.engine = self.engine.routes(routes);
        self
    }

    /// Store settings: attempts before a row goes dead (20), backoff.
    pub fn store_config(mut self, config: StoreConfig) -> Self {
        self.store = config;
        self
    }

    /// Whether [`Harness::run_until_idle`] makes a row waiting for its retry due at once
    /// (true), so that retries run to their end without waiting out the backoff.
    pub fn skip_backoff(mut self, skip: bool) -> Self {
        self.skip_backoff = skip;
        self
    }

    /// How long [`Harness::run_until_idle`] waits before it gives up (30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates the tables and starts the relay and the consumers.
    pub async fn start(self) -> Result<Harness<DB>, Error> {
        let running = self
            .engine
            .store_config(self.store)
            .relay(RelayConfig::default().poll_interval(Duration::from_millis(20)))
            .migrate()
            .start()
            .await?;
        Ok(Harness {
            running,
            pool: self.pool,
            bus: self.bus,
            consumers: self.consumers,
            skip_backoff: self.skip_backoff,
            timeout: self.timeout,
        })
    }
}

impl<DB: Backend> Harness<DB> {
    /// The outbox: enqueue in your own transactions with it.
    pub fn outbox(&self) -> &Outbox<DB> {
        self.running.outbox()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The bus.
    pub fn bus(&self) -> &MemoryBus {
        &self.bus
    }

    /// Stores `event` in a transaction of its own.
    pub async fn enqueue<E: OutboxEvent + Listed>(&self, event: &E) -> Result<Enqueued, Error> {
        let mut tx = self.pool.begin().await?;
        let done = self.outbox().enqueue(&mut *tx, event).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Puts `value` on `service`'s topic as a message of key `key`, as something other than
    /// the relay would (a poison message, a message of another system).
    pub async fn send_raw(
        &self,
        service: &str,
        key: Option<&str>,
        value: &[u8],
    ) -> Result<(i32, i64), Error> {
        let topic = self.topic(service)?;
        self.bus
            .send(&Outgoing {
                topic,
                key: key.map(str::to_owned),
                value: value.to_vec(),
                headers: Vec::new(),
            })
            .await
    }

    fn topic(&self, service: &str) -> Result<String, Error> {
        self.outbox()
            .catalog()
            .service(service)
            .map(|r| r.topic.clone())
            .ok_or_else(|| Error::UnknownService {
                service: service.to_owned(),
            })
    }

    /// Runs until nothing is left to do: no row waiting to be published or being published,
    /// and every consumer's group committed past the last message of its topic. A row waiting
    /// for a retry is made due at once (unless [`HarnessBuilder::skip_backoff`] said no, and
    /// then it counts as nothing to do). Fails with what was left when a task of the runtime
    /// failed, or after the timeout.
    pub async fn run_until_idle(&mut self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            // Registered before the look, so that a change during it is not missed.
            let mut changed = self.bus.changed();
            let left = self.left().await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Task(format!(
                    "not idle after {:?}: {}",
                    self.timeout,
                    left.join("; ")
                )));
            }
            // A change on the bus, or a look again shortly for the database's side (a retry
            // scheduled, a row marked).
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                failed = self.running.wait() => return failed,
            }
        }
    }

    /// What is left to do, in words; empty when idle.
    async fn left(&self) -> Result<Vec<String>, Error> {
        let mut left = Vec::new();
        let mut conn = self.pool.acquire().await?;
        let now = self.outbox().now_ms();
        for route in self.outbox().catalog().services() {
            if self.skip_backoff {
                let sql = DB::dialect_sql(&format!(
                    "UPDATE {} SET next_attempt_at = $1 WHERE status = 'pending' AND next_attempt_at > $1",
                    route.table
                ))
                .into_owned();
                if DB::execute(&mut conn, &sql, vec![Arg::I64(now)]).await? > 0 {
                    self.outbox().wakeups().notify_waiters();
                }
            }
            let due = if self.skip_backoff {
                "status IN ('pending', 'sending')".to_owned()
            } else {
                format!(
                    "(status = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= {now})) OR status = 'sending'"
                )
            };
            let sql = format!("SELECT COUNT(*) FROM {} WHERE {due}", route.table);
            let n = DB::fetch_ints(&mut conn, &sql, Vec::new())
                .await?
                .first()
                .copied()
                .flatten()
                .unwrap_or(0);
            if n > 0 {
                left.push(format!("{n} rows of `{}` to publish", route.service));
            }
        }
        drop(conn);
        for service in &self.consumers {
            let Some(route) = self.outbox().catalog().service(service) else {
                continue;
            };
            let lag = self.bus.lag(&route.group, &route.topic);
            if lag > 0 {
                left.push(format!("{lag} messages of `{}` to consume", route.topic));
            }
            // Messages a consumer with `Dedupe::Inbox` keeps for another attempt.
            let mut conn = self.pool.acquire().await?;
            if self.skip_backoff {
                let sql = DB::dialect_sql(
                    "UPDATE outbox_inbox_retry SET next_attempt_at = $1 \
                     WHERE consumer_group = $2 AND next_attempt_at > $3",
                );
                let args = vec![Arg::I64(now), Arg::Str(route.group.clone()), Arg::I64(now)];
                DB::execute(&mut conn, &sql, args).await?;
            }
            let kept = self
                .outbox()
                .next_inbox_retry_at(&mut conn, &route.group)
                .await?;
            if kept.is_some() {
                left.push(format!("retries kept by `{}`", route.group));
            }
        }
        Ok(left)
    }

    /// The envelopes on `service`'s topic, partition by partition, each in order (messages
    /// that are not envelopes left out).
    pub async fn published(&self, service: &str) -> Vec<Envelope> {
        let Ok(topic) = self.topic(service) else {
            return Vec::new();
        };
        self.bus
            .messages(&topic)
            .iter()
            .filter_map(|m| envelope::decode(m.payload.as_deref()?).ok())
            .collect()
    }

    /// Every row of `service`, in id order.
    pub async fn rows(&self, service: &str) -> Result<Vec<OutboxRow>, Error> {
        let route =
            self.outbox()
                .catalog()
                .service(service)
                .ok_or_else(|| Error::UnknownService {
                    service: service.to_owned(),
                })?;
        let sql = format!(
            "SELECT {} FROM {} ORDER BY id",
            COLUMNS.join(", "),
            route.table
        );
        let mut conn = self.pool.acquire().await?;
        Ok(DB::fetch_rows(&mut conn, &sql, Vec::new()).await?)
    }

    /// The rows of `service` its consumer applied.
    pub async fn applied(&self, service: &str) -> Result<Vec<OutboxRow>, Error> {
        Ok(self
            .rows(service)
            .await?
            .into_iter()
            .filter(|r| r.status == Status::Consumed)
            .collect())
    }

    /// The rows of `service` that failed at least once (a handler error or a failed publish)
    /// and are not dead: published again (more than one attempt), or waiting for their retry
    /// (with the last error).
    pub async fn retried(&self, service: &str) -> Result<Vec<OutboxRow>, Error> {
        Ok(self
            .rows(service)
            .await?
            .into_iter()
            .filter(|r| r.status != Status::Dead && (r.attempts > 1 || r.last_error.is_some()))
            .collect())
    }

    /// The dead rows of `service`, with their reasons.
    pub async fn dead(&self, service: &str) -> Result<Vec<Dead>, Error> {
        Ok(self
            .rows(service)
            .await?
            .into_iter()
            .filter(|r| r.status == Status::Dead)
            .map(|r| Dead {
                event_id: r.event_id,
                event_type: r.event_type,
                reason: r.dead_reason.unwrap_or_default(),
                error: r.last_error.unwrap_or_default(),
                attempts: r.attempts,
            })
            .collect())
    }

    /// What `service`'s consumer sent to its dead-letter topic (every message it must not
    /// process, including those with no row, such as a value that is not an envelope).
    pub async fn dead_letters(&self, service: &str) -> Vec<DeadLetter> {
        let Ok(topic) = self.topic(service) else {
            return Vec::new();
        };
        self.bus
            .messages(&format!("{topic}.dlq"))
            .into_iter()
            .map(|m| DeadLetter {
                reason: m
                    .header("x-outbox-dead-reason")
                    .unwrap_or_default()
                    .to_owned(),
                detail: m.header("x-outbox-dead-detail").map(str::to_owned),
                message: m,
            })
            .collect()
    }

    /// Stops the runtime, letting the work in hand finish.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.running.shutdown().await
    }
}
