//! The producers: each event is written in a transaction with a business row, and its fate
//! goes in the ledger. Poison that `enqueue` would refuse (it validates) is inserted with SQL,
//! as a buggy or foreign producer would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_runtime::Outbox;
use outbox_runtime::sqlx::{Connection as _, Pool};
use outbox_runtime::store::{Arg, Backend};

use crate::contract::{SERVICE, TickRecorded};
use crate::ledger::{Entry, Fate, Poison};
use crate::world::{self, Names};

/// What each write is: chosen from the seed and the sequence number alone, so a seed gives the
/// same poison and rollbacks whatever the interleaving of writers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    pub(crate) seed: u64,
    /// One event in this many is poison (the kinds in turn); 0 for none.
    pub(crate) poison_every: u64,
    /// The chance that a transaction is rolled back.
    pub(crate) rollback: f64,
}

impl Mix {
    fn poison(&self, seq: u64) -> Option<Poison> {
        if self.poison_every == 0 || seq % self.poison_every != self.poison_every / 2 {
            return None;
        }
        let n = Poison::ALL.len() as u64;
        let turn = (seq / self.poison_every + self.seed) % n;
        Some(Poison::ALL[usize::try_from(turn).unwrap_or(0)])
    }

    fn rolls_back(&self, seq: u64) -> bool {
        self.rollback > 0.0
            && fastrand::Rng::with_seed(self.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)).f64()
                < self.rollback
    }
}

/// Sixteen keys: per-key order is exercised, and every partition gets events.
pub(crate) fn key(seq: u64) -> String {
    format!("k{}", seq % 16)
}

pub(crate) struct Writer<DB: Backend> {
    pub(crate) pool: Pool<DB>,
    /// Healthy events.
    pub(crate) outbox: Outbox<DB>,
    /// Events whose handler always fails: few attempts, so they go dead quickly.
    pub(crate) failing: Outbox<DB>,
    pub(crate) names: Names,
    pub(crate) topic: String,
    pub(crate) mix: Mix,
    /// The service is relayed from the write-ahead log: poison is emitted there.
    pub(crate) wal: bool,
}

impl<DB: Backend> Writer<DB> {
    /// Writes sequence numbers from `next` up to `total`, `rate` per second in all (0: as fast
    /// as possible), appending to `ledger`.
    pub(crate) async fn run(
        self: Arc<Self>,
        next: Arc<AtomicU64>,
        total: u64,
        rate: f64,
        start: tokio::time::Instant,
        ledger: Arc<Mutex<Vec<Entry>>>,
    ) {
        loop {
            let seq = next.fetch_add(1, Ordering::SeqCst) + 1;
            if seq > total {
                return;
            }
            if rate > 0.0 {
                let at = start + Duration::from_secs_f64((seq - 1) as f64 / rate);
                tokio::time::sleep_until(at).await;
            }
            let entry = self.write(seq).await;
            let failed = matches!(entry.fate, Fate::Failed | Fate::InDoubt);
            ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(entry);
            if failed {
                // The database is away: do not burn through the sequence meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn write(&self, seq: u64) -> Entry {
        let poison = self.mix.poison(seq);
        let mut entry = Entry {
            seq,
            event_id: None,
            poison,
            fate: Fate::Failed,
        };
        let Ok(mut conn) = self.pool.acquire().await else {
            return entry;
        };
        let Ok(mut tx) = conn.begin().await else {
            return entry;
        };
        let business = DB::dialect_sql(&format!(
            "INSERT INTO {} (seq, note) VALUES ($1, $2)",
            self.names.business
        ))
        .into_owned();
        let args = vec![
            Arg::I64(i64::try_from(seq).unwrap_or(i64::MAX)),
            Arg::Str(format!("tick {seq}")),
        ];
        if DB::execute(&mut *tx, &business, args).await.is_err() {
            return entry;
        }
        let stored = match poison {
            None | Some(Poison::AlwaysFails) => {
                let event = TickRecorded {
                    seq,
                    key: key(seq),
                    always_fail: poison.is_some(),
                };
                let outbox = if poison.is_some() {
                    &self.failing
                } else {
                    &self.outbox
                };
                outbox
                    .enqueue(&mut *tx, &event)
                    .await
                    .map(|e| e.event_id)
                    .ok()
            }
            Some(p) => self.insert_raw(&mut *tx, seq, p).await,
        };
        let Some(event_id) = stored else {
            return entry;
        };
        entry.event_id = Some(event_id);
        entry.fate = if self.mix.rolls_back(seq) {
            // Dropped or rolled back, it never commits.
            let _ = tx.rollback().await;
            Fate::RolledBack
        } else {
            match tx.commit().await {
                Ok(()) => Fate::Committed,
                Err(_) => Fate::InDoubt,
            }
        };
        entry
    }

    /// A row `enqueue` would refuse, written as a producer that skips validation would.
    async fn insert_raw(&self, conn: &mut DB::Connection, seq: u64, p: Poison) -> Option<String> {
        let (version, payload) = match p {
            Poison::MalformedJson => (1, format!(r#"{{"seq": {seq}, "key": "k"#)),
            Poison::UnknownVersion => (9, format!(r#"{{"seq":{seq},"key":"{}"}}"#, key(seq))),
            Poison::InvalidPayload => (1, r#"{"seq":0,"key":" "}"#.to_owned()),
            Poison::Undecodable => (1, format!(r#"{{"seq":"{seq}th","key":["k"]}}"#)),
            Poison::AlwaysFails => return None,
        };
        let event_id = uuid::Uuid::now_v7().to_string();
        let now = world::now_ms();
        if self.wal {
            return self
                .emit_raw(conn, &event_id, seq, p, version, &payload, now)
                .await
                .then_some(event_id);
        }
        let sql = DB::dialect_sql(&format!(
            "INSERT INTO {} (event_id, event_type, event_version, service_name, topic, \
             message_key, payload, headers, status, attempts, max_attempts, next_attempt_at, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, '{{}}', 'pending', 0, $8, $9, $10, $11)",
            self.names.table
        ))
        .into_owned();
        let args = vec![
            Arg::Str(event_id.clone()),
            Arg::Str("chaos.tick.recorded".to_owned()),
            Arg::I64(version),
            Arg::Str(SERVICE.to_owned()),
            Arg::Str(self.topic.clone()),
            Arg::Str(key(seq)),
            Arg::Str(payload),
            Arg::I64(i64::from(world::HEALTHY_MAX_ATTEMPTS)),
            Arg::I64(now),
            Arg::I64(now),
            Arg::I64(now),
        ];
        DB::execute(conn, &sql, args).await.ok().map(|_| event_id)
    }

    /// The same poison as a message in the write-ahead log, where the service's relay reads
    /// it: a message that is not a readable event (no version, its payload text cut short)
    /// for malformed JSON, an event with the bad version or payload for the others.
    #[allow(clippy::too_many_arguments)]
    async fn emit_raw(
        &self,
        conn: &mut DB::Connection,
        event_id: &str,
        seq: u64,
        p: Poison,
        version: i64,
        payload: &str,
        now: i64,
    ) -> bool {
        let content = if p == Poison::MalformedJson {
            serde_json::json!({
                "event_id": event_id,
                "event_type": "chaos.tick.recorded",
                "payload": payload,
            })
        } else {
            let Ok(payload) = serde_json::from_str::<serde_json::Value>(payload) else {
                return false;
            };
            serde_json::json!({
                "event_id": event_id,
                "event_type": "chaos.tick.recorded",
                "event_version": version,
                "topic": self.topic,
                "message_key": key(seq),
                "aggregate_id": null,
                "headers": "{}",
                "created_at": now,
                "max_attempts": world::HEALTHY_MAX_ATTEMPTS,
                "payload": payload,
            })
        };
        let Ok(prefix) = self.outbox.wal_prefix(SERVICE) else {
            return false;
        };
        let args = vec![Arg::Str(prefix), Arg::Str(content.to_string())];
        DB::execute(
            conn,
            "SELECT pg_logical_emit_message(true, $1, $2)::TEXT",
            args,
        )
        .await
        .is_ok()
    }
}
