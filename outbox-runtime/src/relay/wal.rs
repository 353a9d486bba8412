//! The relay of a service that relays from the write-ahead log (PostgreSQL; see
//! [`OutboxBuilder::wal`](crate::store::OutboxBuilder::wal)).
//!
//! One relay holds the service's replication slot at a time: a session advisory lock on the
//! connection that reads the slot, so that the lock goes with the connection (a relay that
//! dies or loses its connection gives the slot up, and a standby, looking at the poll
//! interval, takes it over). Each round reads the slot's next messages without consuming them,
//! publishes them in commit order, and advances the slot past what the broker acknowledged:
//! at least once, and a relay killed before it advanced leaves the messages for the next.
//!
//! Per-key order through failures: the slot is one ordered log, so when a message fails to
//! publish the slot is advanced only up to the transaction before it, and everything from it
//! on is read and published again after a backoff (later messages the broker did take are
//! published twice; consumers apply each event once). A message no retry can deliver (larger
//! than the broker takes), one that is not an event, or one that failed its last attempt goes
//! to the service's table as a dead row (`outbox dead list|replay`) and no longer holds the
//! log back. Attempts are counted by the relay holding the slot; a new holder counts afresh.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::bus::{Publish, Sent, permanent_failure};
use crate::error::Error;
#[cfg(not(feature = "postgres"))]
use crate::store::WalBatch;
use crate::store::{Backend, Lsn, ReplicationTarget, SlotState, WalItem};

use super::{Relay, WalRead, outgoing_of};

#[cfg(feature = "postgres")]
use crate::store::WalStream;

/// Without PostgreSQL there is no slot to stream (and no service relayed from the log).
#[cfg(not(feature = "postgres"))]
#[derive(Debug)]
enum WalStream {}

#[cfg(not(feature = "postgres"))]
impl WalStream {
    async fn open(
        _: &ReplicationTarget,
        service: &str,
        slot: &str,
        _: String,
        _: Lsn,
        _: Duration,
        _: usize,
    ) -> Result<WalStream, Error> {
        Err(Error::WalStream {
            service: service.to_owned(),
            slot: slot.to_owned(),
            reason: "this build has no PostgreSQL (feature `postgres`)".into(),
        })
    }
    async fn read(&mut self, _: usize) -> Result<WalBatch, Error> {
        match *self {}
    }
    fn has_more(&self) -> bool {
        match *self {}
    }
    async fn wait(&mut self) -> Result<(), Error> {
        match *self {}
    }
    fn put_back(&mut self, _: Vec<(WalItem, Lsn)>) {
        match *self {}
    }
    fn confirm(&self, _: Lsn) {
        match *self {}
    }
    async fn close(self) {
        match self {}
    }
}

/// The WAL an idle slot may hold back (bytes) before its relay writes a heartbeat.
const HEARTBEAT_AFTER: i64 = 1 << 20;

/// How long a relay waits after a read of its slot that did not fill a batch.
const WAL_LINGER: Duration = Duration::from_millis(50);

/// How long a streaming relay waits after a round that did not fill its batch: the next round
/// takes what committed meanwhile, in fewer, larger requests to the broker (and fewer consumer
/// transactions downstream).
const STREAM_LINGER: Duration = Duration::from_millis(10);

/// How often the slot is advanced past what was published (each advance decodes the log as a
/// read does): published events not yet confirmed are skipped by this relay's next reads, and
/// published again by the next holder of the slot when this one dies first.
const CONFIRM_EVERY: Duration = Duration::from_millis(500);

/// How often a replication stream tells the server what the broker acknowledged (which
/// advances the slot): cheap, unlike an advance through the SQL interface.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// How long a relay that stops waits for its last acknowledgement to reach the server before
/// it closes the stream (what it does not wait for is published again by the next holder).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The slot a WAL loop reads, and what it keeps between rounds.
pub(super) struct WalSlot<DB: Backend> {
    /// The connection holding the slot's lock (and reading it); `None` after an error.
    conn: Option<DB::Connection>,
    held: bool,
    /// How far this relay advanced the slot.
    confirmed: Option<Lsn>,
    /// How far the broker acknowledged every event (a commit position at or after
    /// `confirmed`); the slot is advanced there every [`CONFIRM_EVERY`].
    published: Option<Lsn>,
    confirmed_at: Instant,
    /// Whether the last read returned as many changes as it asked for.
    full: bool,
    /// Failed attempts of the message that holds the log back, by event id.
    attempts: HashMap<String, i32>,
    retry_at: Option<Instant>,
    /// Whether the last read found no event of the service.
    idle: bool,
    /// Whether this relay read the slot since it took it: until then it cannot tell the age.
    read: bool,
    /// When the oldest event read and not yet published was written (ms); `None` when every
    /// event read was published.
    oldest_unpublished: Option<i64>,
    /// Where the replication stream connects; `None`: the slot is read through the SQL
    /// interface.
    target: Option<ReplicationTarget>,
    /// The stream, while this relay holds the slot and reads it by streaming.
    stream: Option<WalStream>,
    /// When a streaming relay last looked at the table (rows replayed from the dead letters).
    table_at: Option<Instant>,
}

impl<DB: Backend> WalSlot<DB> {
    /// Whether this relay holds the slot.
    pub(super) fn held(&self) -> bool {
        self.held
    }

    /// When a message that failed is due again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the last read filled its batch (more is waiting).
    pub(super) fn was_full(&self) -> bool {
        self.full
    }

    /// Whether this relay reads the slot by streaming (and holds the stream).
    pub(super) fn streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// How long to wait after a round that did not fill its batch: a stream hands events over
    /// as they commit, a read through the SQL interface decodes the log again each time.
    pub(super) fn linger(&self) -> Duration {
        if self.streaming() {
            STREAM_LINGER
        } else {
            WAL_LINGER
        }
    }

    /// Waits until the stream delivers something; at once without a stream. An error drops
    /// the stream (and the slot: the next round takes it again).
    pub(super) async fn wait_stream(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if let Err(e) = stream.wait().await {
            tracing::warn!(error = %e, "replication stream broke");
            self.drop_slot();
        }
    }

    /// Forgets the slot after an error: the connection may be gone, and with it the lock.
    fn drop_slot(&mut self) {
        self.conn = None;
        self.held = false;
        self.stream = None;
    }
}

impl<DB: Backend, B: Publish> Relay<DB, B> {
    /// Checks the server can decode its log (`wal_level`), before the loop starts; `stream`:
    /// whether to read the slot by streaming, as [`RelayConfig::wal_read`] says.
    ///
    /// [`RelayConfig::wal_read`]: super::RelayConfig::wal_read
    pub(super) async fn wal_start(
        &self,
        service: &str,
        stream: bool,
    ) -> Result<WalSlot<DB>, Error> {
        let mut conn = self.pool.acquire().await?;
        self.outbox.check_wal_level(&mut conn, service).await?;
        let target = if stream && self.config.wal_read == WalRead::Stream {
            DB::replication_target(&self.pool, self.config.replication_url.as_deref())?
        } else {
            None
        };
        Ok(WalSlot {
            conn: None,
            held: false,
            confirmed: None,
            published: None,
            confirmed_at: Instant::now(),
            full: false,
            attempts: HashMap::new(),
            retry_at: None,
            idle: false,
            read: false,
            oldest_unpublished: None,
            target,
            stream: None,
            table_at: None,
        })
    }

    /// Confirms what was published and gives the slot up (closing its connection would too).
    pub(super) async fn wal_stop(&self, service: &str, mut slot: WalSlot<DB>) {
        if let Some(stream) = slot.stream.take() {
            if let Some(to) = slot.published {
                stream.confirm(to);
                // The status update goes out within STATUS_EVERY: wait until the server has it.
                self.wal_wait(service, &mut slot, |s| s.confirmed.is_none_or(|c| c >= to))
                    .await;
            }
            stream.close().await;
            // The server lets the slot go a moment after the stream ends; this relay still holds
            // the lock, so no one else streams it meanwhile: once it is free, it is free for
            // the next holder (and for `outbox status`).
            self.wal_wait(service, &mut slot, |s| !s.streamed).await;
        }
        if slot.held
            && let Err(e) = self.wal_confirm(service, &mut slot, None, true).await
        {
            tracing::debug!(service, error = %e, "the slot keeps events published twice");
        }
        if let Some(conn) = slot.conn.as_mut()
            && slot.held
            && let Err(e) = self.outbox.wal_release(conn, service).await
        {
            tracing::debug!(service, error = %e, "slot not released; its connection closes");
        }
    }

    /// Reads the slot's state until `done` says so, for at most [`CLOSE_WAIT`] (or until it
    /// cannot be read).
    async fn wal_wait(
        &self,
        service: &str,
        slot: &mut WalSlot<DB>,
        done: impl Fn(SlotState) -> bool,
    ) {
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match self.outbox.wal_slot_state(conn, service).await {
                Ok(Some(state)) if !done(state) && Instant::now() < deadline => {
                    tokio::time::sleep(STATUS_EVERY / 4).await;
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(service, error = %e, "slot state not read");
                    return;
                }
            }
        }
    }

    /// One round: takes the slot when free, publishes what it holds, and runs a table round
    /// for rows replayed from the dead letters. Returns how many events it handled.
    pub(super) async fn wal_round(
        &self,
        service: &str,
        slot: &mut WalSlot<DB>,
    ) -> Result<usize, Error> {
        if slot.retry_at.is_some_and(|at| at > Instant::now()) {
            return Ok(0);
        }
        slot.retry_at = None;
        let result = self.wal_once(service, slot).await;
        if result.is_err() {
            // The connection may be gone, and with it the lock: start again from a new one.
            slot.drop_slot();
        }
        let n = result?;
        if n == 0 && slot.held {
            // A stream's rounds come as events commit: the table (replayed rows, rare) is
            // looked at once per poll interval.
            if slot.streaming()
                && slot
                    .table_at
                    .is_some_and(|at| at.elapsed() < self.config.poll_interval)
            {
                return Ok(0);
            }
            slot.table_at = Some(Instant::now());
            return self.table_once(service).await;
        }
        Ok(n)
    }

    async fn wal_once(&self, service: &str, slot: &mut WalSlot<DB>) -> Result<usize, Error> {
        if slot.conn.is_none() {
            slot.conn = Some(self.pool.acquire().await?.detach());
            slot.held = false;
        }
        let Some(conn) = slot.conn.as_mut() else {
            return Ok(0);
        };
        if !slot.held {
            slot.held = self.outbox.wal_acquire(conn, service).await?;
            if !slot.held {
                return Ok(0);
            }
            slot.confirmed = None;
            slot.published = None;
            slot.read = false;
            slot.attempts.clear();
            let name = self.outbox.wal_slot(service)?;
            let state = self.outbox.wal_slot_state(conn, service).await?;
            let lost = state.is_some_and(|s| s.lost);
            metrics::gauge!("outbox_wal_slot_lost", "service" => service.to_owned())
                .set(f64::from(u8::from(lost)));
            if lost {
                return Err(Error::WalSlotLost {
                    service: service.to_owned(),
                    slot: name,
                });
            }
            if let Some(target) = &slot.target {
                let from = state
                    .and_then(|s| s.confirmed)
                    .ok_or(Error::WalSlotMissing {
                        service: service.to_owned(),
                        slot: name.clone(),
                    })?;
                let prefix = self.outbox.wal_prefix(service)?;
                let batch = self.config.wal_batch;
                let stream =
                    WalStream::open(target, service, &name, prefix, from, STATUS_EVERY, batch);
                slot.stream = Some(stream.await?);
            }
            tracing::info!(
                service,
                streaming = slot.stream.is_some(),
                "this relay holds the service's replication slot"
            );
        }
        let mut batch = match slot.stream.as_mut() {
            Some(stream) => {
                let batch = stream.read(self.config.wal_batch).await?;
                slot.full = stream.has_more();
                batch
            }
            None => {
                // Three changes per event: its transaction's begin, the message, the commit.
                let limit = self.config.wal_batch.saturating_mul(3);
                let batch = self.outbox.wal_peek(conn, service, limit).await?;
                slot.full = batch.changes >= limit;
                batch
            }
        };
        slot.read = true;
        // What this relay published since it last advanced the slot is read again: skipped.
        if let Some(done) = slot.published {
            batch.items.retain(|(_, commit)| *commit > done);
        }
        if batch.items.is_empty() {
            slot.oldest_unpublished = None;
            slot.idle = !slot.full;
            self.wal_confirm(service, slot, batch.end, false).await?;
            // A full read of events this relay had published (more than a batch since it last
            // advanced) advanced the slot past them: the next read has new ones.
            return Ok(usize::from(slot.full));
        }
        slot.idle = false;
        let version_format = self.config.version_format_of(service);
        let mut outgoing = Vec::with_capacity(batch.items.len());
        let mut spans = Vec::with_capacity(batch.items.len());
        // Index in `batch.items` of each record sent.
        let mut sent_items = Vec::with_capacity(batch.items.len());
        for (i, (item, _)) in batch.items.iter().enumerate() {
            let encoded = match item {
                WalItem::Event(row) => outgoing_of(service, row, version_format),
                WalItem::Malformed { error, .. } => Err(error.clone()),
            };
            match encoded {
                Ok((record, span)) => {
                    outgoing.push(record);
                    spans.push(span);
                    sent_items.push(i);
                }
                Err(reason) => {
                    self.wal_dead(service, slot, item, "malformed_payload", &reason)
                        .await?
                }
            }
        }
        let results = self.bus.send_all(&outgoing).await;
        // The first message that neither reached the broker nor went dead: the log is
        // confirmed only up to the transaction before it.
        let mut stop: Option<usize> = None;
        let mut published = 0_u64;
        for (&i, result) in sent_items.iter().zip(results) {
            let item = &batch.items[i].0;
            match result {
                Sent::Acked { .. } => {
                    published += 1;
                    if stop.is_some() && same_key(item, &batch.items[stop.unwrap_or(i)].0) {
                        metrics::counter!("outbox_key_order_gaps_total", "service" => service.to_owned()).increment(1);
                    }
                }
                Sent::Failed(e) if permanent_failure(&e).is_some() && stop.is_none() => {
                    let reason = permanent_failure(&e).unwrap_or("message_too_large");
                    let error = format!("publish to Kafka failed: {e}");
                    self.wal_dead(service, slot, item, reason, &error).await?;
                }
                Sent::Failed(e) if stop.is_none() => {
                    let error = format!("publish to Kafka failed: {e}");
                    if self.wal_failed(service, slot, item, &error).await? {
                        stop = Some(i);
                    }
                }
                // Behind the message that holds the log back: published again after it.
                Sent::Failed(_) | Sent::HeldBack => {
                    stop.get_or_insert(i);
                }
            }
        }
        metrics::counter!("outbox_published_total", "service" => service.to_owned())
            .increment(published);
        let to = match stop {
            None => {
                slot.attempts.clear();
                slot.oldest_unpublished = None;
                batch.end
            }
            Some(i) => {
                let (item, commit) = &batch.items[i];
                slot.oldest_unpublished = match item {
                    WalItem::Event(row) => Some(row.created_at),
                    WalItem::Malformed { .. } => None,
                };
                batch.items[..i]
                    .iter()
                    .map(|(_, c)| *c)
                    .filter(|c| c < commit)
                    .max()
            }
        };
        let read = batch.items.len();
        if let (Some(i), Some(stream)) = (stop, slot.stream.as_mut()) {
            // The events from the failed one's transaction on are handed out again (a read
            // through the SQL interface reads them again from the slot).
            let failed = batch.items[i].1;
            stream.put_back(
                batch
                    .items
                    .into_iter()
                    .filter(|(_, commit)| *commit >= failed)
                    .collect(),
            );
        }
        // Held back by a failure: confirmed now, so that the retry reads from there.
        let now = stop.is_some();
        self.wal_confirm(service, slot, to, now).await?;
        drop(spans);
        Ok(read)
    }

    /// Records that everything up to `to` was published, and advances the slot there when
    /// `now`, when a read filled its batch, or every [`CONFIRM_EVERY`].
    async fn wal_confirm(
        &self,
        service: &str,
        slot: &mut WalSlot<DB>,
        to: Option<Lsn>,
        now: bool,
    ) -> Result<(), Error> {
        if let Some(to) = to
            && slot.published.is_none_or(|p| p < to)
        {
            slot.published = Some(to);
        }
        let Some(to) = slot.published else {
            return Ok(());
        };
        if slot.confirmed.is_some_and(|c| c >= to) {
            return Ok(());
        }
        if let Some(stream) = slot.stream.as_ref() {
            stream.confirm(to);
            slot.confirmed = Some(to);
            slot.confirmed_at = Instant::now();
            return Ok(());
        }
        if !(now || slot.full || slot.confirmed_at.elapsed() >= CONFIRM_EVERY) {
            return Ok(());
        }
        let Some(conn) = slot.conn.as_mut() else {
            return Ok(());
        };
        self.outbox.wal_advance(conn, service, to).await?;
        slot.confirmed = Some(to);
        slot.confirmed_at = Instant::now();
        Ok(())
    }

    /// A message that failed to publish: true when it holds the log back for a retry, false
    /// when that was its last attempt and it went dead.
    async fn wal_failed(
        &self,
        service: &str,
        slot: &mut WalSlot<DB>,
        item: &WalItem,
        error: &str,
    ) -> Result<bool, Error> {
        let WalItem::Event(row) = item else {
            return Ok(true);
        };
        tracing::warn!(service, event_id = %row.event_id, %error, "publish failed");
        let attempts = {
            let n = slot.attempts.entry(row.event_id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if attempts >= row.max_attempts.max(1) {
            slot.attempts.remove(&row.event_id);
            self.wal_dead(service, slot, item, "max_attempts", error)
                .await?;
            return Ok(false);
        }
        metrics::counter!("outbox_retried_total", "service" => service.to_owned()).increment(1);
        let backoff: Duration = self.outbox.config().backoff(attempts);
        slot.retry_at = Some(Instant::now() + backoff);
        Ok(true)
    }

    /// Keeps a message the relay must not (or could not) publish as a dead row of the
    /// service's table.
    async fn wal_dead(
        &self,
        service: &str,
        slot: &mut WalSlot<DB>,
        item: &WalItem,
        reason: &str,
        error: &str,
    ) -> Result<(), Error> {
        let attempts = match item {
            WalItem::Event(row) => slot.attempts.get(&row.event_id).copied().unwrap_or(1),
            WalItem::Malformed { .. } => 0,
        };
        let Some(conn) = slot.conn.as_mut() else {
            return Ok(());
        };
        tracing::warn!(service, reason, %error, "an event of the write-ahead log went dead");
        if self
            .outbox
            .wal_dead(conn, service, item, attempts, reason, error)
            .await?
        {
            metrics::counter!("outbox_dead_total", "service" => service.to_owned(), "reason" => reason.to_owned()).increment(1);
        }
        Ok(())
    }

    /// Publishes `outbox_wal_lag_bytes` and `outbox_wal_lag_seconds` for the slot this relay
    /// holds, and records the age for `outbox status`.
    pub(super) async fn gauge_wal(&self, service: &str, slot: &mut WalSlot<DB>) {
        if !slot.held || !slot.read {
            return;
        }
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        let oldest = slot.oldest_unpublished;
        let measured = async {
            let bytes = self
                .outbox
                .wal_held(conn, &self.outbox.wal_slot(service)?)
                .await?
                .map(|(bytes, _)| bytes);
            self.outbox.wal_seen(conn, service, oldest).await?;
            // An idle slot on a busy database: other writers' WAL is decoded but gives the
            // slot no position to advance to; a heartbeat does.
            if slot.idle && bytes.is_some_and(|b| b > HEARTBEAT_AFTER) {
                self.outbox.wal_heartbeat(conn).await?;
            }
            Ok::<_, Error>(bytes)
        };
        match measured.await {
            Ok(bytes) => {
                metrics::gauge!("outbox_wal_lag_bytes", "service" => service.to_owned())
                    .set(bytes.unwrap_or(0) as f64);
                let age = oldest.map_or(0, |t| self.outbox.now_ms().saturating_sub(t).max(0));
                metrics::gauge!("outbox_wal_lag_seconds", "service" => service.to_owned())
                    .set(age as f64 / 1000.0);
            }
            Err(e) => tracing::debug!(service, error = %e, "slot lag not measured"),
        }
    }
}

fn same_key(a: &WalItem, b: &WalItem) -> bool {
    match (a, b) {
        (WalItem::Event(a), WalItem::Event(b)) => {
            a.topic == b.topic && a.message_key.is_some() && a.message_key == b.message_key
        }
        _ => false,
    }
}
