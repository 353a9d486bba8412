//! The relay: moves stored events to Kafka.
//!
//! Delivery guarantee: **at least once**. A row is marked published only after the broker
//! acknowledged it; a relay that dies between the acknowledgement and the mark leaves the row
//! leased, and when the lease ends another relay publishes it again (consumers apply events once
//! in effect, so the duplicate has no second effect). Any number of relays can run: claims are
//! leased, so two relays never publish the same row at once, and a key's rows go out in order.
//!
//! Per-key order through failures: a claim takes a run of a key's oldest rows, and when one of
//! them fails to publish, no later row of its key goes before it. The producer is not handed
//! the key's later rows of the batch after it refuses one, and those, like later rows that
//! failed behind it, are given back to pending without counting an attempt; the failed row,
//! waiting for its retry, holds them back until it is published or dead. A row no retry can
//! deliver (larger than `message.max.bytes`) goes dead at once, `message_too_large`, and frees
//! its key. One case is the producer's, not ours: librdkafka may time a sent record out and
//! still deliver later records of its partition (its documented gap); the relay then marks
//! those published and counts them in `outbox_key_order_gaps_total`.
//!
//! While a backlog fills its batches, a relay publishes each batch while it claims the next,
//! so that the database claims while the broker acknowledges (not on SQLite, where the claim
//! would wait for the mark's write lock). The next claim passes over the relay's own batch in
//! flight and takes the rows behind it, of its keys too, so that a hot key drains as fast as
//! many keys; it reads at most two batches' worth of open rows. That batch is published only
//! after the one in flight is acknowledged, and a key with a row in flight that was not (a
//! failed publish, a row held back behind one) has its rows of the next batch given back
//! uncounted before anything is sent: they wait behind the failed row as they would have in
//! one batch. Another relay's leases stop a key, as before.
//!
//! A service relayed from PostgreSQL's write-ahead log
//! ([`OutboxBuilder::wal`](crate::store::OutboxBuilder::wal)) is read from its replication slot
//! instead: one relay holds the slot at a time (the others stand by), publishes in commit order,
//! and advances the slot past what the broker acknowledged, at least once.
//!
//! A relay wakes at once on new rows (PostgreSQL `LISTEN`; an in-process signal for writers in
//! the same process) and polls as a fallback. On shutdown it stops claiming, finishes the
//! batches in hand, and returns.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Pool;
use tokio_util::sync::CancellationToken;

use outbox_contract::envelope::{self, VersionFormat};

use crate::bus::{Outgoing, Publish, Sent, permanent_failure};
use crate::error::Error;
use crate::store::{Backend, Outbox, OutboxRow, Transition};
use crate::trace;

mod wal;

/// How often a relay measures its backlog for the `outbox_backlog` gauge.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// A signal to stop, shared by relays and consumers: a [`CancellationToken`] underneath, so a
/// service that already has one for its own tasks can hand a child of it over.
#[derive(Debug, Clone)]
pub struct Shutdown(CancellationToken);

/// Sends the [`Shutdown`] signal; dropping it sends it too, so that tasks stop (at the end of
/// their round) when their owner goes.
#[derive(Debug)]
pub struct ShutdownTrigger(CancellationToken);

impl Shutdown {
    /// A signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let token = CancellationToken::new();
        (ShutdownTrigger(token.clone()), Shutdown(token))
    }

    /// A signal sent when `token` is cancelled.
    pub fn from_token(token: CancellationToken) -> Shutdown {
        Shutdown(token)
    }

    /// True once triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when triggered.
    pub async fn wait(&mut self) {
        self.0.cancelled().await;
    }

    /// A signal of its own, sent when this one is, or by its trigger alone.
    pub(crate) fn child(&self) -> (ShutdownTrigger, Shutdown) {
        let token = self.0.child_token();
        (ShutdownTrigger(token.clone()), Shutdown(token))
    }
}

/// The tasks of a `run` future: dropping the future (a `select!` whose other branch won, an
/// aborted task) asks them to stop and lets each finish the round or batch in hand in the
/// background, as a [`Shutdown`] does, instead of aborting them. A task cut off inside a
/// statement could hand its pooled connection back inside a transaction nobody ends: sqlx 0.8
/// returns a connection whose `BEGIN` was cancelled to the pool as it is.
#[derive(Debug)]
pub(crate) struct Crew<T: 'static> {
    pub(crate) tasks: tokio::task::JoinSet<T>,
    /// Stops the tasks: triggered when the crew is dropped.
    pub(crate) stop: ShutdownTrigger,
}

impl<T: 'static> Crew<T> {
    /// No task yet, and the signal they are to watch: `shutdown`, or this crew's drop.
    pub(crate) fn new(shutdown: &Shutdown) -> (Self, Shutdown) {
        Self::with(shutdown.child())
    }

    /// No task yet, and a signal of their own: this crew's trigger, or its drop.
    pub(crate) fn root() -> (Self, Shutdown) {
        Self::with(Shutdown::new())
    }

    fn with((stop, watched): (ShutdownTrigger, Shutdown)) -> (Self, Shutdown) {
        let crew = Crew {
            tasks: tokio::task::JoinSet::new(),
            stop,
        };
        (crew, watched)
    }
}

impl<T: 'static> Drop for Crew<T> {
    fn drop(&mut self) {
        // `stop`, dropped after this, triggers their signal.
        self.tasks.detach_all();
    }
}

impl ShutdownTrigger {
    /// Asks every holder of the signal to stop.
    pub fn trigger(&self) {
        self.0.cancel();
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// How long a woken relay waits before it claims, so that one claim takes what a burst of
/// writers committed.
const LINGER: Duration = Duration::from_millis(5);

/// How many batches' worth of open rows a claim made while a batch is in flight reads at most
/// (see [`Relay::table_rounds`]): the batch in flight, and as much again past it.
const PIPELINED_READ: usize = 2;

/// How long a relay waits after a claim that did not fill its batch.
const TABLE_LINGER: Duration = Duration::from_millis(20);

/// How soon a relay looks again when a writer that did not notify has yet to commit.
const BUSY_RECHECK: Duration = Duration::from_millis(20);

/// The longest a relay waits after rounds that failed (see [`after_failures`]).
const FAILED_WAIT_MAX: Duration = Duration::from_secs(5);

/// How long a relay waits after `failures` rounds in a row failed: the poll interval, doubled
/// with each further failure, at most [`FAILED_WAIT_MAX`]. A database that is down, or a
/// replication stream the server refuses (each attempt a connection, and for a password a
/// SCRAM exchange that costs both sides CPU on purpose), is not retried in a tight loop.
fn after_failures(poll_interval: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    poll_interval
        .saturating_mul(1 << doublings)
        .min(FAILED_WAIT_MAX.max(poll_interval))
}

/// Relay settings: start from [`RelayConfig::default`] and change what you need.
#[derive(Clone)]
pub struct RelayConfig {
    pub(crate) owner: String,
    pub(crate) batch: usize,
    pub(crate) lease: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) version_format: VersionFormat,
    pub(crate) version_formats: std::collections::BTreeMap<String, VersionFormat>,
    pub(crate) wal_batch: usize,
    pub(crate) wal_read: WalRead,
    pub(crate) replication_url: Option<String>,
}

/// How a relay reads the replication slots of services relayed from the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WalRead {
    /// The streaming replication protocol (the default): one replication connection per
    /// slot, the log decoded once by the server as it is written, events handed to the relay
    /// as their transactions commit, and the slot advanced by the relay's acknowledgements.
    /// The user needs the `REPLICATION` attribute, and the connection the password
    /// ([`RelayConfig::replication_url`], `PGPASSWORD`, or the password file); no TLS.
    #[default]
    Stream,
    /// The SQL interface (`pg_logical_slot_peek_binary_changes`, `pg_replication_slot_advance`)
    /// on an ordinary pooled connection: each read decodes the log again from the slot's
    /// restart point (which PostgreSQL moves every 15 s), so it costs the server more and
    /// adds the wait between reads to each event's latency. For a server the relay cannot
    /// open a replication connection to (TLS, no password at hand). [`Relay::relay_once`]
    /// always reads this way.
    Sql,
}

impl RelayConfig {
    /// This relay's name in leases; unique per instance (default: `relay-<pid>-<random>`).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Rows claimed and published together (500).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Events read from a replication slot and published together, for services relayed from
    /// the write-ahead log (10,000): at most this many from a stream (fewer when fewer are
    /// waiting); through the SQL interface each read decodes the log from the slot's restart
    /// point, so fewer, larger reads drain a backlog faster.
    pub fn wal_batch(mut self, batch: usize) -> Self {
        self.wal_batch = batch.max(1);
        self
    }

    /// How services relayed from the write-ahead log are read ([`WalRead::Stream`]).
    pub fn wal_read(mut self, read: WalRead) -> Self {
        self.wal_read = read;
        self
    }

    /// The connection URL (`postgres://user:password@host:port/database`) of the replication
    /// stream of services relayed from the write-ahead log: another user than the pool's (one
    /// with the `REPLICATION` attribute), or the password the pool does not tell. Without it
    /// the stream connects as the pool does, with the password in `PGPASSWORD` or the password
    /// file (`PGPASSFILE`, else `~/.pgpass`).
    pub fn replication_url(mut self, url: impl Into<String>) -> Self {
        self.replication_url = Some(url.into());
        self
    }

    /// How long a claim holds its rows (30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often to look for due rows without a wake-up (1 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// How `event_version` is written (a number, `"1"`), for every service without a
    /// spelling of its own.
    pub fn version_format(mut self, format: VersionFormat) -> Self {
        self.version_format = format;
        self
    }

    /// How `event_version` is written for `service`: the spelling its consumers accept (the
    /// Go forum and credit handlers took `"v1"` only, notification and the scheduler `"1"`).
    pub fn service_version_format(
        mut self,
        service: impl Into<String>,
        format: VersionFormat,
    ) -> Self {
        self.version_formats.insert(service.into(), format);
        self
    }

    /// How `event_version` is written for `service`.
    pub fn version_format_of(&self, service: &str) -> VersionFormat {
        self.version_formats
            .get(service)
            .copied()
            .unwrap_or(self.version_format)
    }

    /// This relay's name in leases.
    pub fn owner_name(&self) -> &str {
        &self.owner
    }
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("owner", &self.owner)
            .field("batch", &self.batch)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("version_format", &self.version_format)
            .field("version_formats", &self.version_formats)
            .field("wal_batch", &self.wal_batch)
            .field("wal_read", &self.wal_read)
            // It may hold a password.
            .field(
                "replication_url",
                &self.replication_url.as_ref().map(|_| "…"),
            )
            .finish()
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            owner: format!("relay-{}-{:08x}", std::process::id(), fastrand::u32(..)),
            batch: 500,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            version_format: VersionFormat::Number,
            version_formats: std::collections::BTreeMap::new(),
            wal_batch: 10_000,
            wal_read: WalRead::Stream,
            replication_url: None,
        }
    }
}

/// Publishes the due rows of some services on bus `B`.
#[derive(Debug)]
pub struct Relay<DB: Backend, B> {
    outbox: Outbox<DB>,
    pool: Pool<DB>,
    bus: Arc<B>,
    config: RelayConfig,
    services: Vec<String>,
}

impl<DB: Backend, B: Publish> Relay<DB, B> {
    /// A relay for every service of the outbox's catalog.
    pub fn new(outbox: Outbox<DB>, pool: Pool<DB>, bus: Arc<B>, config: RelayConfig) -> Self {
        let services = outbox
            .catalog()
            .services()
            .map(|r| r.service.clone())
            .collect();
        Self {
            outbox,
            pool,
            bus,
            config,
            services,
        }
    }

    /// Relays only these services.
    pub fn services(mut self, services: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.services = services.into_iter().map(Into::into).collect();
        self
    }

    /// Runs until `shutdown`, one loop per service. Dropping the future stops the loops as
    /// `shutdown` does: each finishes its round in the background.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        // Its LISTEN loop holds a connection and no transaction: it goes with this future.
        let _listener = DB::spawn_listener(&self.pool, self.outbox.wakeups())
            .map(tokio_util::task::AbortOnDropHandle::new);
        let this = Arc::new(self);
        // Stops every loop when `shutdown` comes, when one loop fails, or when this future is
        // dropped.
        let (mut crew, stop) = Crew::new(&shutdown);
        for service in this.services.clone() {
            let (this, shutdown) = (this.clone(), stop.clone());
            crew.tasks
                .spawn(async move { this.run_service(&service, shutdown).await });
        }
        let mut failed = None;
        while let Some(done) = crew.tasks.join_next().await {
            let error = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => Error::Task(format!("a relay loop panicked: {e}")),
            };
            tracing::error!(error = %error, "a relay loop stopped");
            failed.get_or_insert(error);
            // The others stop too: a relay that relays only some services hides the rest. Each
            // ends its round first: a loop aborted between its `BEGIN` and sqlx's note of it
            // gave its pooled connection back inside a transaction that nothing ended, and
            // the application's next statements on it were never committed.
            crew.stop.trigger();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Relays `service` until `shutdown`; stops with an error only when its table is gone or
    /// is not an outbox table (a database that fails is tried again).
    async fn run_service(&self, service: &str, mut shutdown: Shutdown) -> Result<(), Error> {
        let mut wal = if self.outbox.is_wal(service) {
            Some(self.wal_start(service, true).await?)
        } else {
            None
        };
        let wake = self.outbox.wakeups();
        // After a wake-up that found nothing (the writer had not committed yet), look again
        // shortly before falling back to the poll interval.
        let mut rechecks: &[u64] = &[];
        let mut gauged = tokio::time::Instant::now() - BACKLOG_EVERY;
        // The connection that holds the wake lock while this loop rests (PostgreSQL), kept
        // from one rest to the next; dropping it (closing it) gives the lock back.
        let mut rest_conn: Option<DB::Connection> = None;
        let mut resting = false;
        let mut failures = 0_u32;
        while !shutdown.is_triggered() {
            // Registered before this round looks at the table: an enqueue during the round
            // wakes the wait below instead of being missed.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if resting {
                resting = false;
                self.stop_resting(&mut rest_conn, service).await;
            }
            if gauged.elapsed() >= BACKLOG_EVERY {
                gauged = tokio::time::Instant::now();
                match wal.as_mut() {
                    Some(slot) => self.gauge_wal(service, slot).await,
                    None => self.gauge_backlog(service).await,
                }
            }
            let round = match wal.as_mut() {
                Some(slot) => match self.wal_round(service, slot).await {
                    Err(e @ (Error::WalSlotMissing { .. } | Error::WalSlotLost { .. })) => {
                        return Err(e);
                    }
                    round => round.map(|n| (n, slot.was_full())),
                },
                None => self.table_rounds(service, &shutdown).await,
            };
            let (claimed, full) = match round {
                Ok(round) => {
                    failures = 0;
                    round
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = after_failures(self.config.poll_interval, failures);
                    tracing::warn!(service, error = %e, failures, retry_in = ?wait, "relay round failed");
                    if wal.is_none() {
                        self.check_table(service).await?;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => break,
                    }
                    continue;
                }
            };
            // Claim again at once until a round finds nothing: a published run of a key lets
            // its next rows go.
            if claimed > 0 {
                rechecks = &[];
                // A round that did not fill its batch waits a moment, so that the next takes
                // more for the same cost: each claim reads the open rows from the oldest,
                // through the index entries of rows drained since the table was last vacuumed,
                // each read of a slot through the SQL interface decodes the log from the slot's
                // restart point (up to 15 s of it, until PostgreSQL logs its next snapshot of
                // running transactions), and a stream's next round takes what committed
                // meanwhile in fewer, larger requests to the broker.
                let pause = match &wal {
                    Some(slot) => slot.linger(),
                    None => TABLE_LINGER,
                };
                if !full {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.wait() => break,
                    }
                }
                continue;
            }
            let mut wait = match rechecks.split_first() {
                Some((ms, rest)) => {
                    rechecks = rest;
                    Duration::from_millis(*ms)
                }
                None => self.config.poll_interval,
            };
            if let Some(slot) = &wal {
                // A standby (another relay holds the slot) looks again at the poll interval,
                // without resting: a rest would make every writer notify.
                if !slot.held() {
                    wait = self.config.poll_interval;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => break,
                    }
                    continue;
                }
                if let Some(at) = slot.retry_at() {
                    wait = wait.min(at.saturating_duration_since(tokio::time::Instant::now()));
                }
            }
            // A stream wakes its relay as events commit (no wake lock, no notification): it
            // waits for the stream, or for the retry of a failed event.
            if let Some(slot) = wal.as_mut().filter(|s| s.streaming()) {
                let retrying = slot.retry_at().is_some();
                tokio::select! {
                    _ = slot.wait_stream(), if !retrying => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => break,
                }
                continue;
            }
            if wait == self.config.poll_interval {
                match self.rest(&mut rest_conn, service).await {
                    Some(true) => {
                        resting = true;
                        // Rows committed between the last claim and the lock notified no one:
                        // look once more.
                        let again = match wal.as_mut() {
                            Some(slot) => self.wal_round(service, slot).await,
                            None => self.table_once(service).await,
                        };
                        if again.is_ok_and(|n| n > 0) {
                            continue;
                        }
                    }
                    // A writer that did not notify is about to commit.
                    Some(false) => wait = BUSY_RECHECK.min(wait),
                    None => {}
                }
            }
            tokio::select! {
                _ = &mut woken => {
                    rechecks = &[2, 10, 50, 200];
                    // Writers commit in bursts: a moment's wait lets one claim take several.
                    tokio::time::sleep(LINGER).await;
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => break,
            }
        }
        if resting {
            self.stop_resting(&mut rest_conn, service).await;
        }
        if let Some(slot) = wal {
            self.wal_stop(service, slot).await;
        }
        Ok(())
    }

    /// After a failed round: an error when the service's table is missing or not an outbox
    /// table, nothing when the database could not tell (it is down: the next round tries
    /// again).
    async fn check_table(&self, service: &str) -> Result<(), Error> {
        let Ok(mut conn) = self.pool.acquire().await else {
            return Ok(());
        };
        match self.outbox.check_table(&mut conn, service).await {
            Err(
                e @ (Error::TableMissing { .. }
                | Error::TableMismatch { .. }
                | Error::TableOutdated { .. }),
            ) => Err(e),
            _ => Ok(()),
        }
    }

    /// Takes the wake lock before sleeping; `None` where the database has no wake-up protocol
    /// or the lock could not be asked for.
    async fn rest(&self, conn: &mut Option<DB::Connection>, service: &str) -> Option<bool> {
        if !self.outbox.can_rest(service) {
            return None;
        }
        if conn.is_none() {
            match self.pool.acquire().await {
                Ok(c) => *conn = Some(c.detach()),
                Err(e) => {
                    tracing::debug!(service, error = %e, "no connection to rest on");
                    return None;
                }
            }
        }
        let c = conn.as_mut()?;
        match self.outbox.rest(c, service).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(service, error = %e, "could not rest");
                *conn = None;
                None
            }
        }
    }

    async fn stop_resting(&self, conn: &mut Option<DB::Connection>, service: &str) {
        if let Some(c) = conn.as_mut()
            && let Err(e) = self.outbox.stop_resting(c, service).await
        {
            // Closing the connection gives the lock back.
            tracing::debug!(service, error = %e, "could not stop resting");
            *conn = None;
        }
    }

    /// Publishes the `outbox_backlog` gauge (rows of `service` not yet on the broker) and
    /// `outbox_oldest_published_seconds` (how long its oldest published row has waited for a
    /// consumer; 0 when none waits).
    async fn gauge_backlog(&self, service: &str) {
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(service, error = %e, "backlog not measured");
                return;
            }
        };
        match self.outbox.backlog(&mut conn, service).await {
            Ok(n) => {
                metrics::gauge!("outbox_backlog", "service" => service.to_owned()).set(n as f64)
            }
            Err(e) => tracing::debug!(service, error = %e, "backlog not measured"),
        }
        match self.outbox.oldest_published_age(&mut conn, service).await {
            Ok(age) => {
                metrics::gauge!("outbox_oldest_published_seconds", "service" => service.to_owned())
                    .set(age.unwrap_or(0) as f64 / 1000.0)
            }
            Err(e) => tracing::debug!(service, error = %e, "oldest published row not measured"),
        }
    }

    /// One round: claim a batch, publish it, record the outcome. Returns how many rows it
    /// claimed. For a service relayed from the write-ahead log: take the slot (0 when another
    /// relay holds it), publish what it holds, advance it, give it back; returns how many
    /// events it read.
    pub async fn relay_once(&self, service: &str) -> Result<usize, Error> {
        if !self.outbox.is_wal(service) {
            return self.table_once(service).await;
        }
        let mut slot = self.wal_start(service, false).await?;
        let n = self.wal_round(service, &mut slot).await;
        self.wal_stop(service, slot).await;
        n
    }

    /// [`Relay::relay_once`] of a service relayed from its table.
    async fn table_once(&self, service: &str) -> Result<usize, Error> {
        let rows = self.claim_batch(service, usize::MAX, &[]).await?;
        self.send_batch(service, &rows).await?;
        Ok(rows.len())
    }

    /// Rounds of a service relayed from its table, from one claim for as long as a backlog fills
    /// them: each full batch is published while the next is claimed, so the database claims
    /// while the broker acknowledges (one after the other, each waits on the other, and half
    /// of two cores stays idle). The next claim passes over the batch in flight and takes the
    /// rows behind it, of its keys too, reading at most [`PIPELINED_READ`] batches' worth of
    /// open rows. Before that batch is sent, the rows of each key that has a row in flight not
    /// acknowledged are given back uncounted, so a key's later rows never pass a failed one: as
    /// within one batch, they wait for its retry. Returns how many rows it claimed, and
    /// whether its last claim that read without bound filled its batch (the caller claims again
    /// at once). Stops claiming once `shutdown` is triggered, and publishes what it holds. With
    /// one writer at a time (SQLite) it runs one round: there the claim would wait for the mark
    /// beside it (a 100,000-row drain on 1,000 keys ran at 17,000–20,000 rows/s so, against
    /// 22,000–27,000 on few keys, one round at a time).
    async fn table_rounds(
        &self,
        service: &str,
        shutdown: &Shutdown,
    ) -> Result<(usize, bool), Error> {
        let batch = self.config.batch;
        let mut rows = self.claim_batch(service, usize::MAX, &[]).await?;
        let mut claimed = rows.len();
        if rows.len() < batch || DB::ONE_WRITER {
            self.send_batch(service, &rows).await?;
            return Ok((claimed, claimed >= batch));
        }
        loop {
            if shutdown.is_triggered() {
                self.send_batch(service, &rows).await?;
                return Ok((claimed, true));
            }
            let max_read = batch.saturating_mul(PIPELINED_READ);
            let in_flight: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let (sent, next) = tokio::join!(
                self.send_batch(service, &rows),
                self.claim_batch(service, max_read, &in_flight)
            );
            match (sent, next) {
                (Ok(unsent), Ok(next)) => {
                    let (held, go): (Vec<OutboxRow>, Vec<OutboxRow>) =
                        next.into_iter().partition(|r| {
                            r.message_key.as_deref().is_some_and(|k| unsent.contains(k))
                        });
                    // Left leased if the database refuses, they stop their keys until the
                    // leases run out: the next claim passes over only the batch it is given.
                    self.give_back(service, &held).await;
                    claimed += go.len();
                    rows = go;
                }
                (Err(e), Ok(next)) => {
                    self.give_back(service, &next).await;
                    return Err(e);
                }
                (sent, Err(e)) => {
                    // The round reports the claim's error; the batch's would be lost with it.
                    if let Err(failed) = sent {
                        tracing::warn!(service, error = %failed, rows = rows.len(), "a batch's outcome was not recorded while the next claim failed; its leases will run out");
                    }
                    return Err(e);
                }
            }
            if rows.len() < batch {
                self.send_batch(service, &rows).await?;
                return Ok((claimed, true));
            }
        }
    }

    /// Claims a batch, reading at most `max_read` open rows to plan it, passing over the
    /// relay's batch `in_flight`.
    async fn claim_batch(
        &self,
        service: &str,
        max_read: usize,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, Error> {
        let mut conn = self.pool.acquire().await?;
        self.outbox
            .claim_reading(
                &mut conn,
                service,
                &self.config.owner,
                self.config.batch,
                self.config.lease,
                max_read,
                in_flight,
            )
            .await
    }

    /// Claimed rows never sent (the batch before them failed to record its outcome, or a row
    /// of their key in it was not acknowledged): back to pending at once, uncounted, if the
    /// database lets us; else their leases run out.
    async fn give_back(&self, service: &str, rows: &[OutboxRow]) {
        if rows.is_empty() {
            return;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let released = match self.pool.acquire().await {
            Ok(mut conn) => {
                self.outbox
                    .release_leased(&mut conn, service, &self.config.owner, &ids)
                    .await
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = released {
            tracing::warn!(service, error = %e, rows = ids.len(), "claimed rows not given back; their leases will run out");
        }
    }

    /// Publishes a claimed batch and records each row's outcome. Returns the keys of the rows
    /// the broker did not acknowledge (failed, or held back behind a failure), whose later
    /// rows must wait.
    async fn send_batch(
        &self,
        service: &str,
        rows: &[OutboxRow],
    ) -> Result<HashSet<String>, Error> {
        if rows.is_empty() {
            return Ok(HashSet::new());
        }
        let owner = &self.config.owner;
        let version_format = self.config.version_format_of(service);
        let mut sendable: Vec<&OutboxRow> = Vec::with_capacity(rows.len());
        // One span per row, continuing the trace the row was enqueued in, open until its
        // outcome is recorded; on the wire, its context is the consumer's parent.
        let mut spans = Vec::with_capacity(rows.len());
        let mut outgoing = Vec::with_capacity(rows.len());
        let mut conn = self.pool.acquire().await?;
        for row in rows {
            match outgoing_of(service, row, version_format) {
                Ok((record, span)) => {
                    spans.push(span);
                    outgoing.push(record);
                    sendable.push(row);
                }
                Err(reason) => {
                    self.outbox
                        .dead_leased(&mut conn, row, owner, "malformed_payload", &reason)
                        .await?;
                    metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => "malformed_payload").increment(1);
                }
            }
        }
        drop(conn);
        let results = self.bus.send_all(&outgoing).await;
        let mut published = Vec::with_capacity(results.len());
        // Rows behind a failed row of their key: never sent (or failed behind it), so given
        // back uncounted, to go after it.
        let mut released = Vec::new();
        // Keys with a row the broker did not acknowledge.
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut conn = self.pool.acquire().await?;
        for (row, result) in sendable.iter().zip(results) {
            let key = row.message_key.as_deref();
            let behind_failure = key.is_some_and(|k| failed_keys.contains(k));
            match result {
                Sent::Acked { .. } => {
                    published.push(row.id);
                    if behind_failure {
                        // The producer timed an earlier record of this key out after sending
                        // this one (librdkafka's documented gap): the broker has it first.
                        metrics::counter!("outbox_key_order_gaps_total", "service" => service.to_owned()).increment(1);
                        tracing::warn!(
                            service,
                            outbox_id = row.id,
                            key,
                            "a row reached the broker before an earlier row of its key that failed"
                        );
                    }
                }
                Sent::HeldBack => {
                    // Held back behind a refused record of its key, which put the key here
                    // already; a bus that holds records back on its own is counted too.
                    failed_keys.extend(key);
                    released.push(row.id);
                }
                Sent::Failed(_) if behind_failure => released.push(row.id),
                Sent::Failed(e) => {
                    if let Some(k) = key {
                        failed_keys.insert(k);
                    }
                    self.publish_failed(&mut conn, service, row, &e).await?;
                }
            }
        }
        if !released.is_empty() {
            self.outbox
                .release_leased(&mut conn, service, owner, &released)
                .await?;
        }
        let marked = self
            .outbox
            .mark_published(&mut conn, service, owner, &published)
            .await?;
        metrics::counter!("outbox_published_total", "service" => service.to_owned())
            .increment(marked);
        drop(spans);
        Ok(failed_keys.into_iter().map(str::to_owned).collect())
    }

    /// Records a failed publish: dead at once when no retry can deliver it (too large), else
    /// back to pending with backoff, or dead when its attempts are used up.
    async fn publish_failed(
        &self,
        conn: &mut DB::Connection,
        service: &str,
        row: &OutboxRow,
        e: &Error,
    ) -> Result<(), Error> {
        let owner = &self.config.owner;
        let error = format!("publish to Kafka failed: {e}");
        tracing::warn!(service, outbox_id = row.id, event_id = %row.event_id, %error, "publish failed");
        if let Some(reason) = permanent_failure(e) {
            if self
                .outbox
                .dead_leased(conn, row, owner, reason, &error)
                .await?
            {
                metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => reason).increment(1);
            }
            return Ok(());
        }
        match self.outbox.publish_failed(conn, row, owner, &error).await? {
            Transition::Dead => {
                metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => "max_attempts").increment(1);
            }
            Transition::Retrying { .. } => {
                metrics::counter!("outbox_retried_total", "service" => service.to_owned())
                    .increment(1);
            }
            Transition::Unchanged => {}
        }
        Ok(())
    }
}

/// The record to publish for `row`, and the `outbox.publish` span that continues the trace the
/// row was enqueued in (open until its outcome is recorded; on the wire, its context is the
/// consumer's parent). Fails, with the reason, when the stored payload is not JSON.
fn outgoing_of(
    service: &str,
    row: &OutboxRow,
    version_format: VersionFormat,
) -> Result<(Outgoing, tracing::Span), String> {
    // The stored headers, parsed once: the trace context to continue and to send.
    let (traceparent, tracestate) = row.trace_headers();
    let record = row.record_traced(traceparent.as_deref());
    let value = envelope::encode(record, version_format)
        .map_err(|e| format!("the stored payload is not JSON: {e}"))?;
    let span = tracing::info_span!(
        "outbox.publish",
        service,
        event_id = %row.event_id,
        outbox_id = row.id,
        topic = %row.topic,
    );
    trace::continue_from(&span, traceparent.as_deref(), tracestate.as_deref());
    let mut headers = envelope::headers(record);
    match trace::headers_of(&span) {
        Some(context) => {
            headers.retain(|(k, _)| *k != trace::TRACEPARENT);
            headers.extend(context);
        }
        None => headers.extend(tracestate.map(|ts| (trace::TRACESTATE, ts))),
    }
    let outgoing = Outgoing {
        topic: row.topic.clone(),
        // No key: the event id, as the Go system did, spreads events evenly.
        key: Some(
            row.message_key
                .clone()
                .unwrap_or_else(|| row.event_id.clone()),
        ),
        value,
        headers,
    };
    Ok((outgoing, span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_rounds_wait_longer_each_time_up_to_a_bound() {
        let poll = Duration::from_millis(100);
        let waits: Vec<u128> = (1..=8)
            .map(|n| after_failures(poll, n).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(after_failures(poll, u32::MAX), FAILED_WAIT_MAX);
        // A poll interval longer than the bound is kept.
        let slow = Duration::from_secs(30);
        assert_eq!(after_failures(slow, 3), slow);
    }
}
