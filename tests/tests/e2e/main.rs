//! End to end: stores, relay and typed consumers against a real Kafka-protocol broker (tansu,
//! started by `./scripts/test`; `OUTBOX_TEST_BROKERS` points elsewhere) and real databases.
//! Each body runs on PostgreSQL, MySQL/MariaDB and SQLite (the backend is the test name's
//! suffix), with its own tables, topics and consumer groups.

// Shared with the store tests, which use more of it.
#[allow(dead_code)]
#[path = "../store/harness.rs"]
mod harness;

mod go;
mod wal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contracts::notification::{FeishuRequested, FeishuRequestedV2};
use contracts::task::TaskUrgencyPromoteRequested;
use contracts::token_store::{CreditChargeRequested, ForumPostImported, ForumPostLiked};
use contracts::{
    NotificationEvents, NotificationEventsHandler, TaskEvents, TaskEventsHandler, TokenStoreEvents,
    TokenStoreEventsHandler, samples,
};
use harness::{Harness, TestDb};
use outbox_runtime::bus::{KafkaBus, KafkaConfig, Outgoing, Publish};
use outbox_runtime::consumer::{Call, ConsumerConfig, Context};
use outbox_runtime::envelope::{self, VersionFormat};
use outbox_runtime::relay::RelayConfig;
use outbox_runtime::store::{Arg, Enqueued, StoreConfig};
use outbox_runtime::trace::TraceParent;
use outbox_runtime::{Engine, Running};
use outbox_runtime::{HandlerError, Status};

/// Relay settings for tests: the defaults, polling every 100 ms.
fn relay() -> RelayConfig {
    RelayConfig::default().poll_interval(Duration::from_millis(100))
}

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

macro_rules! e2e_on_every_backend {
    ($($name:ident),* $(,)?) => {
        paste::paste! {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn [<e2e_ $name _postgres>]() {
                    $name::<outbox_runtime::sqlx::Postgres>().await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn [<e2e_ $name _mysql>]() {
                    $name::<outbox_runtime::sqlx::MySql>().await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn [<e2e_ $name _sqlite>]() {
                    $name::<outbox_runtime::sqlx::Sqlite>().await;
                }
            )*
        }
    };
}

e2e_on_every_backend!(
    events_flow_from_enqueue_to_their_handler_once,
    poison_is_dead_lettered_and_does_not_hold_back_its_partition,
    a_failing_handler_is_retried_through_the_outbox_until_it_succeeds,
    a_message_delivered_twice_has_one_effect,
    two_relays_and_two_consumers_give_no_duplicate_effect,
    a_trace_started_before_enqueue_continues_in_the_handler,
    go_version_spellings_are_accepted,
    rows_written_before_the_relay_starts_go_out_at_once,
    a_handler_can_write_another_services_event_in_its_transaction,
    messages_that_are_not_this_services_leave_its_rows_alone,
    a_failing_handler_in_a_batch_leaves_the_rest_of_it_applied_once,
    a_handler_whose_statement_fails_costs_only_its_own_message,
    a_backlog_of_one_key_drains_without_waiting_for_the_poll,
    a_panicking_handler_is_retried_and_its_partition_goes_on,
    an_oversized_event_goes_dead_and_its_keys_later_rows_follow_in_order,
    a_failed_publish_holds_its_keys_later_rows_back_until_it_goes,
    a_backlog_is_claimed_while_the_batch_before_it_is_published_keys_in_order,
    a_hot_keys_next_batch_is_claimed_behind_the_one_in_flight_and_waits_for_its_failed_row,
);

// A consumer with a database of its own (the inbox), on another server than the producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_an_inbox_consumer_in_its_own_database_postgres_to_mysql() {
    an_inbox_consumer_in_its_own_database_applies_each_event_once::<
        outbox_runtime::sqlx::Postgres,
        outbox_runtime::sqlx::MySql,
    >(Kind::InTransaction)
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_an_inbox_consumer_in_its_own_database_mysql_to_postgres() {
    an_inbox_consumer_in_its_own_database_applies_each_event_once::<
        outbox_runtime::sqlx::MySql,
        outbox_runtime::sqlx::Postgres,
    >(Kind::InTransaction)
    .await;
}

// The same with a handler that runs outside any transaction (a remote call): claimed,
// called, then marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_a_call_consumer_in_its_own_database_postgres_to_mysql() {
    an_inbox_consumer_in_its_own_database_applies_each_event_once::<
        outbox_runtime::sqlx::Postgres,
        outbox_runtime::sqlx::MySql,
    >(Kind::Calls)
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_a_call_consumer_in_its_own_database_mysql_to_postgres() {
    an_inbox_consumer_in_its_own_database_applies_each_event_once::<
        outbox_runtime::sqlx::MySql,
        outbox_runtime::sqlx::Postgres,
    >(Kind::Calls)
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_an_inbox_consumer_in_its_own_database_sqlite_to_postgres() {
    an_inbox_consumer_in_its_own_database_applies_each_event_once::<
        outbox_runtime::sqlx::Sqlite,
        outbox_runtime::sqlx::Postgres,
    >(Kind::InTransaction)
    .await;
}

/// Records every handled event in the effects table, in the handler's transaction. Clones
/// share their state, so one recorder serves several consumers.
#[derive(Default, Clone)]
struct Recorder {
    effects: String,
    /// Preview ids whose handler fails this many more times.
    failures: Arc<Mutex<HashMap<String, u32>>>,
    /// Preview ids whose handler panics this many more times.
    panics: Arc<Mutex<HashMap<String, u32>>>,
    /// Preview ids whose handler runs a statement that fails in the database this many more
    /// times.
    sql_errors: Arc<Mutex<HashMap<String, u32>>>,
    /// Trace id seen by the handler, per event id.
    traces: Arc<Mutex<HashMap<String, Option<String>>>>,
}

impl Recorder {
    async fn record<DB: TestDb>(
        &self,
        ctx: &mut Context<DB>,
        kind: &str,
    ) -> Result<(), HandlerError> {
        let event_id = ctx.meta().event_id.clone();
        self.traces.lock().unwrap().insert(
            event_id.clone(),
            outbox_runtime::trace::current().map(|t| t.trace_id_hex()),
        );
        let sql = DB::sql(&format!(
            "INSERT INTO {} (event_id, kind) VALUES ($1, $2)",
            self.effects
        ));
        DB::execute(
            ctx.tx(),
            &sql,
            vec![Arg::Str(event_id), Arg::Str(kind.into())],
        )
        .await?;
        Ok(())
    }

    fn should_fail(&self, preview: &str) -> bool {
        Self::take_one(&self.failures, preview)
    }

    fn take_one(left: &Mutex<HashMap<String, u32>>, preview: &str) -> bool {
        let mut f = left.lock().unwrap();
        match f.get_mut(preview) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl<DB: TestDb> NotificationEventsHandler<Context<DB>> for Recorder {
    async fn feishu_requested(
        &self,
        ctx: &mut Context<DB>,
        e: FeishuRequested,
    ) -> Result<(), HandlerError> {
        if self.should_fail(&e.preview_id) {
            return Err(HandlerError::retry("feishu api answered 502"));
        }
        if Self::take_one(&self.panics, &e.preview_id) {
            panic!("feishu client bug on {}", e.preview_id);
        }
        if Self::take_one(&self.sql_errors, &e.preview_id) {
            let sql = format!("SELECT no_such_column FROM {}", self.effects);
            DB::execute(ctx.tx(), &sql, Vec::new()).await?;
        }
        self.record(ctx, "feishu").await
    }
    async fn feishu_requested_v2(
        &self,
        ctx: &mut Context<DB>,
        _: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        self.record(ctx, "feishu-v2").await
    }
}

/// The kind of handler a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// In the transaction that marks the event done.
    InTransaction,
    /// Outside any transaction, as a remote call.
    Calls,
}

/// A handler that runs outside any transaction: it records each call's idempotency key in the
/// effects table through the pool, as a remote service would apply it.
struct Caller<DB: TestDb> {
    recorder: Recorder,
    pool: outbox_runtime::sqlx::Pool<DB>,
}

impl<DB: TestDb> NotificationEventsHandler<Call> for Caller<DB> {
    async fn feishu_requested(
        &self,
        call: &mut Call,
        e: FeishuRequested,
    ) -> Result<(), HandlerError> {
        if self.recorder.should_fail(&e.preview_id) {
            return Err(HandlerError::retry("feishu api answered 502"));
        }
        let sql = DB::sql(&format!(
            "INSERT INTO {} (event_id, kind) VALUES ($1, $2)",
            self.recorder.effects
        ));
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))?;
        let args = vec![
            Arg::Str(call.idempotency_key().to_owned()),
            Arg::Str(format!("call-{}", call.attempt())),
        ];
        DB::execute(&mut conn, &sql, args).await?;
        Ok(())
    }
    async fn feishu_requested_v2(
        &self,
        _: &mut Call,
        _: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<DB: TestDb> TaskEventsHandler<Context<DB>> for Recorder {
    async fn task_urgency_promote_requested(
        &self,
        ctx: &mut Context<DB>,
        _: TaskUrgencyPromoteRequested,
    ) -> Result<(), HandlerError> {
        self.record(ctx, "promote").await
    }
}

impl<DB: TestDb> TokenStoreEventsHandler<Context<DB>> for Recorder {
    async fn forum_post_liked(
        &self,
        ctx: &mut Context<DB>,
        _: ForumPostLiked,
    ) -> Result<(), HandlerError> {
        self.record(ctx, "liked").await
    }
    async fn forum_post_imported(
        &self,
        ctx: &mut Context<DB>,
        _: ForumPostImported,
    ) -> Result<(), HandlerError> {
        self.record(ctx, "imported").await
    }
    async fn credit_charge_requested(
        &self,
        ctx: &mut Context<DB>,
        _: CreditChargeRequested,
    ) -> Result<(), HandlerError> {
        self.record(ctx, "charge").await
    }
}

struct World<DB: TestDb> {
    h: Harness<DB>,
    effects: String,
}

impl<DB: TestDb> World<DB> {
    async fn new() -> Self {
        let h = Harness::<DB>::live(
            StoreConfig::default()
                .backoff_base(Duration::from_millis(100))
                .jitter(false),
            |tag| format!("e2e-{tag}"),
        )
        .await;
        let effects = format!("e{}", h.tag);
        let mut conn = h.pool.acquire().await.unwrap();
        let sql = format!(
            "CREATE TABLE {effects} (event_id VARCHAR(64) NOT NULL, kind VARCHAR(32) NOT NULL)"
        );
        DB::execute(&mut conn, &sql, Vec::new()).await.unwrap();
        drop(conn);
        Self { h, effects }
    }

    fn recorder(&self) -> Recorder {
        Recorder {
            effects: self.effects.clone(),
            ..Recorder::default()
        }
    }

    /// A relay and a consumer per service, on the broker.
    async fn start(&self, recorder: Recorder, relay: RelayConfig) -> Running<DB, KafkaBus> {
        let consumers = ConsumerConfig::default().dlq(true);
        let running = Engine::builder(self.h.pool.clone(), KafkaConfig::new(brokers()))
            .outbox(self.h.outbox.clone())
            .relay(relay)
            .consumer_with::<NotificationEvents, _>(recorder.clone(), consumers.clone())
            .consumer_with::<TaskEvents, _>(recorder.clone(), consumers.clone())
            .consumer_with::<TokenStoreEvents, _>(recorder, consumers)
            .start()
            .await
            .unwrap();
        assert!(
            running.ready(Duration::from_secs(60)).await,
            "the consumers did not join their groups on the broker at {}",
            brokers()
        );
        running
    }

    /// Feishu events `range`, each in its own committed transaction.
    async fn enqueue_feishu(&self, range: std::ops::Range<u64>) -> Vec<Enqueued> {
        let mut rows = Vec::new();
        for i in range {
            let mut tx = self.h.pool.begin().await.unwrap();
            rows.push(
                self.h
                    .outbox
                    .enqueue(&mut *tx, &samples::feishu(i))
                    .await
                    .unwrap(),
            );
            tx.commit().await.unwrap();
        }
        rows
    }

    /// Waits until `n` events are consumed or dead, at most 60 s.
    async fn settle(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut conn = self.h.pool.acquire().await.unwrap();
            let stats = self.h.outbox.stats(&mut conn).await.unwrap();
            let done: i64 = stats
                .iter()
                .map(|s| s.counts[&Status::Consumed] + s.counts[&Status::Dead])
                .sum();
            if done >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {done} of {n} events settled in 60 s: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every row consumed; published once, but for those at the indexes `retried`, which
    /// failed once and were published again.
    async fn consumed_once(&self, rows: &[Enqueued], retried: &[usize]) {
        let mut conn = self.h.pool.acquire().await.unwrap();
        for (i, e) in rows.iter().enumerate() {
            let row = self
                .h
                .outbox
                .get(&mut conn, "notification", e.id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(row.status, Status::Consumed, "event {i}");
            if retried.contains(&i) {
                assert!(row.attempts > 1, "event {i} failed once and was retried");
            } else {
                assert_eq!(row.attempts, 1, "event {i} was published again");
            }
        }
    }

    /// `(effects, distinct events with an effect)`.
    async fn effects(&self) -> (i64, i64) {
        let mut conn = self.h.pool.acquire().await.unwrap();
        let all = DB::fetch_ints(
            &mut conn,
            &format!("SELECT COUNT(*) FROM {}", self.effects),
            Vec::new(),
        )
        .await
        .unwrap()[0]
            .unwrap();
        let distinct = DB::fetch_ints(
            &mut conn,
            &format!("SELECT COUNT(DISTINCT event_id) FROM {}", self.effects),
            Vec::new(),
        )
        .await
        .unwrap()[0]
            .unwrap();
        (all, distinct)
    }

    async fn count(&self, service: &str, status: Status) -> i64 {
        let mut conn = self.h.pool.acquire().await.unwrap();
        let stats = self.h.outbox.stats(&mut conn).await.unwrap();
        stats.iter().find(|s| s.service == service).unwrap().counts[&status]
    }

    async fn cleanup(self) {
        let mut conn = self.h.pool.acquire().await.unwrap();
        DB::execute(
            &mut conn,
            &format!("DROP TABLE IF EXISTS {}", self.effects),
            Vec::new(),
        )
        .await
        .unwrap();
        drop(conn);
        self.h.cleanup().await;
    }
}

async fn enqueue_mix<DB: TestDb>(w: &World<DB>, n: u64) {
    for i in 0..n {
        let mut tx = w.h.pool.begin().await.unwrap();
        match i % 4 {
            0 => {
                w.h.outbox
                    .enqueue(&mut *tx, &samples::feishu(i))
                    .await
                    .unwrap()
            }
            1 => {
                w.h.outbox
                    .enqueue(&mut *tx, &samples::urgency(i))
                    .await
                    .unwrap()
            }
            2 => {
                w.h.outbox
                    .enqueue(&mut *tx, &samples::liked(i))
                    .await
                    .unwrap()
            }
            _ => {
                w.h.outbox
                    .enqueue(&mut *tx, &samples::charge(i))
                    .await
                    .unwrap()
            }
        };
        tx.commit().await.unwrap();
    }
}

// Seed 13-28, bugs B1, B4 and B10: every service's relay publishes its own table's rows (also
// for services first written after start), and every event is consumed once; nothing is left
// published.
async fn events_flow_from_enqueue_to_their_handler_once<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let running = w.start(w.recorder(), relay()).await;
    enqueue_mix(&w, 200).await;
    w.settle(200).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (200, 200));
    for (service, n) in [("notification", 50), ("task", 50), ("token-store", 100)] {
        assert_eq!(w.count(service, Status::Consumed).await, n, "{service}");
        assert_eq!(
            w.count(service, Status::Published).await,
            0,
            "{service}: B4"
        );
        assert_eq!(w.count(service, Status::Dead).await, 0, "{service}");
    }
    w.cleanup().await;
}

/// A row written past validation, as a buggy or legacy producer would.
async fn raw_row<DB: TestDb>(
    w: &World<DB>,
    event_type: &str,
    version: i64,
    key: &str,
    payload: &str,
) -> String {
    let table = w.h.table("notification");
    let topic =
        w.h.outbox
            .catalog()
            .service("notification")
            .unwrap()
            .topic
            .clone();
    let event_id = format!("0190c3c0-0000-7000-8000-{:012x}", fastrand::u64(..1 << 48));
    let now = w.h.outbox.now_ms();
    let sql = DB::sql(&format!(
        "INSERT INTO {table} (event_id, event_type, event_version, service_name, topic, message_key, aggregate_id, payload, headers, status, attempts, max_attempts, next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, 'notification', $4, $5, NULL, $6, '{{}}', 'pending', 0, 20, $7, $8, $9)"
    ));
    let args = vec![
        Arg::Str(event_id.clone()),
        Arg::Str(event_type.into()),
        Arg::I64(version),
        Arg::Str(topic),
        Arg::Str(key.into()),
        Arg::Str(payload.into()),
        Arg::I64(now),
        Arg::I64(now),
        Arg::I64(now),
    ];
    let mut conn = w.h.pool.acquire().await.unwrap();
    DB::execute(&mut conn, &sql, args).await.unwrap();
    event_id
}

// Seed 31, 33, 38: poison goes dead with its reason, is never retried, and the healthy events
// behind it on the same key (so the same partition) are still consumed.
async fn poison_is_dead_lettered_and_does_not_hold_back_its_partition<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let running = w.start(w.recorder(), relay()).await;
    let key = "42";
    let good_payload =
        String::from_utf8(outbox_runtime::OutboxEvent::to_payload(&samples::feishu(1)).unwrap())
            .unwrap();
    raw_row(
        &w,
        "notification.feishu.requested",
        1,
        key,
        "{\"user_id\": \"seven\"}",
    )
    .await;
    // Seed 18: a stored payload that is not JSON at all never reaches the broker.
    raw_row(
        &w,
        "notification.feishu.requested",
        1,
        key,
        "{\"user_id\": 7",
    )
    .await;
    raw_row(&w, "notification.feishu.requested", 9, key, &good_payload).await;
    raw_row(&w, "notification.sms.requested", 1, key, "{}").await;
    // A JSON null payload is a payload the decoder rejects (not a missing one, which left the
    // row published for good).
    raw_row(&w, "notification.feishu.requested", 1, key, "null").await;
    // Seed 31: an envelope without an event type takes its row to dead too.
    raw_row(&w, "", 1, key, &good_payload).await;
    let mut invalid = serde_json::to_value(samples::feishu(2)).unwrap();
    invalid["user_id"] = 0.into();
    raw_row(
        &w,
        "notification.feishu.requested",
        1,
        key,
        &invalid.to_string(),
    )
    .await;
    for i in 0..5 {
        let mut e = samples::feishu(100 + i);
        e.user_id = 42;
        let mut tx = w.h.pool.begin().await.unwrap();
        w.h.outbox.enqueue(&mut *tx, &e).await.unwrap();
        tx.commit().await.unwrap();
    }
    w.settle(12).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (5, 5));
    let mut conn = w.h.pool.acquire().await.unwrap();
    let stats = w.h.outbox.stats(&mut conn).await.unwrap();
    let n = stats.iter().find(|s| s.service == "notification").unwrap();
    let reasons: Vec<(&str, i64)> = n
        .dead_by_reason
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        reasons,
        [
            ("decode_error", 2),
            ("invalid_payload", 1),
            ("malformed_payload", 1),
            ("undecodable_envelope", 1),
            ("unknown_event_type", 1),
            ("unsupported_version", 1)
        ]
    );
    let dead =
        w.h.outbox
            .list_dead(&mut conn, "notification", 0, 10)
            .await
            .unwrap();
    assert!(
        dead.iter().all(|r| r.attempts == 1),
        "poison is never retried"
    );
    drop(conn);
    w.cleanup().await;
}

// Seed 34 and bug B3: a handler error sends the event back through the outbox with backoff; the
// relay publishes it again, and the third delivery succeeds.
async fn a_failing_handler_is_retried_through_the_outbox_until_it_succeeds<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    recorder.failures.lock().unwrap().insert("pv-7".into(), 2);
    let running = w.start(recorder.clone(), relay()).await;
    let e = {
        let mut tx = w.h.pool.begin().await.unwrap();
        let e =
            w.h.outbox
                .enqueue(&mut *tx, &samples::feishu(7))
                .await
                .unwrap();
        tx.commit().await.unwrap();
        e
    };
    w.settle(1).await;
    running.shutdown().await.unwrap();
    let mut conn = w.h.pool.acquire().await.unwrap();
    let row =
        w.h.outbox
            .get(&mut conn, "notification", e.id)
            .await
            .unwrap()
            .unwrap();
    drop(conn);
    assert_eq!(row.status, Status::Consumed);
    assert_eq!(row.attempts, 3, "published three times");
    assert_eq!(w.effects().await, (1, 1));
    w.cleanup().await;
}

// Seed 40: a redelivered message (here: published again by hand) has no second effect.
async fn a_message_delivered_twice_has_one_effect<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let running = w.start(w.recorder(), relay()).await;
    let e = {
        let mut tx = w.h.pool.begin().await.unwrap();
        let e =
            w.h.outbox
                .enqueue(&mut *tx, &samples::charge(1))
                .await
                .unwrap();
        tx.commit().await.unwrap();
        e
    };
    w.settle(1).await;
    let mut conn = w.h.pool.acquire().await.unwrap();
    let row =
        w.h.outbox
            .get(&mut conn, "token-store", e.id)
            .await
            .unwrap()
            .unwrap();
    drop(conn);
    let bus = outbox_runtime::bus::KafkaBus::new(KafkaConfig::new(brokers())).unwrap();
    let again = Outgoing {
        topic: row.topic.clone(),
        key: row.message_key.clone(),
        value: envelope::encode(&row, VersionFormat::Number).unwrap(),
        headers: envelope::headers(&row),
    };
    for _ in 0..2 {
        bus.send(&again).await.unwrap();
    }
    // A marker behind the duplicates on the same key: once it is consumed, they were seen.
    let mut marker = samples::charge(2);
    marker.event_id = row.message_key.clone().unwrap();
    let mut tx = w.h.pool.begin().await.unwrap();
    w.h.outbox.enqueue(&mut *tx, &marker).await.unwrap();
    tx.commit().await.unwrap();
    w.settle(2).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (2, 2));
    w.cleanup().await;
}

// Two relays and two consumers per service, racing on one database and one broker.
async fn two_relays_and_two_consumers_give_no_duplicate_effect<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    let a = w
        .start(recorder.clone(), relay().owner("relay-a").batch(20))
        .await;
    let b = w
        .start(recorder.clone(), relay().owner("relay-b").batch(20))
        .await;
    enqueue_mix(&w, 300).await;
    w.settle(300).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (300, 300));
    w.cleanup().await;
}

async fn a_trace_started_before_enqueue_continues_in_the_handler<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    let running = w.start(recorder.clone(), relay()).await;
    let trace = TraceParent::new_root();
    let e = trace
        .scope(async {
            let mut tx = w.h.pool.begin().await.unwrap();
            let e =
                w.h.outbox
                    .enqueue(&mut *tx, &samples::urgency(3))
                    .await
                    .unwrap();
            tx.commit().await.unwrap();
            e
        })
        .await;
    w.settle(1).await;
    running.shutdown().await.unwrap();
    let seen = recorder.traces.lock().unwrap().get(&e.event_id).cloned();
    assert_eq!(seen, Some(Some(trace.trace_id_hex())));
    w.cleanup().await;
}

// Bug B8: Go producers wrote "1" for some events and "v1" for others; both are version 1.
async fn go_version_spellings_are_accepted<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let running = w
        .start(
            w.recorder(),
            relay().version_format(VersionFormat::Prefixed),
        )
        .await;
    enqueue_mix(&w, 8).await;
    w.settle(8).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (8, 8));
    w.cleanup().await;
}

// Seed 14: rows already waiting when the relay starts are published in its first round.
async fn rows_written_before_the_relay_starts_go_out_at_once<DB: TestDb>() {
    let w = World::<DB>::new().await;
    enqueue_mix(&w, 40).await;
    let started = Instant::now();
    let running = w
        .start(
            w.recorder(),
            relay().poll_interval(Duration::from_secs(3600)),
        )
        .await;
    w.settle(40).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (40, 40));
    assert!(started.elapsed() < Duration::from_secs(60));
    w.cleanup().await;
}

/// A task handler that, in its transaction, asks notification to tell the user (the Go
/// system's active-scheduler → notification write).
struct Notifying<DB: TestDb> {
    outbox: outbox_runtime::Outbox<DB>,
    inner: Recorder,
}

impl<DB: TestDb> TaskEventsHandler<Context<DB>> for Notifying<DB> {
    async fn task_urgency_promote_requested(
        &self,
        ctx: &mut Context<DB>,
        e: TaskUrgencyPromoteRequested,
    ) -> Result<(), HandlerError> {
        self.inner.record(ctx, "promote").await?;
        let mut note = samples::feishu(e.user_id);
        note.preview_id = format!("promoted-{}", e.user_id);
        self.outbox.enqueue(ctx.tx(), &note).await?;
        Ok(())
    }
}

// Seed 46: a consumer transaction of one service writes an event owned by another into that
// service's table; it commits with the handler's effects, and its relay publishes it.
async fn a_handler_can_write_another_services_event_in_its_transaction<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    let consumers = ConsumerConfig::default();
    let running = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(w.h.outbox.clone())
        .relay(relay().poll_interval(Duration::from_millis(100)))
        .consumer_with::<TaskEvents, _>(
            Notifying {
                outbox: w.h.outbox.clone(),
                inner: recorder.clone(),
            },
            consumers.clone(),
        )
        .consumer_with::<NotificationEvents, _>(recorder, consumers)
        .start()
        .await
        .unwrap();
    assert!(running.ready(Duration::from_secs(60)).await);
    let mut tx = w.h.pool.begin().await.unwrap();
    w.h.outbox
        .enqueue(&mut *tx, &samples::urgency(5))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    w.settle(2).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.count("notification", Status::Consumed).await, 1);
    assert_eq!(w.effects().await, (2, 2));
    w.cleanup().await;
}

// Seed 29, 30, 32: on a service's topic, a value that is not an envelope is dead-lettered
// without touching any row, and another service's event is skipped, its row left as it is;
// the partition moves on to the next message either way.
async fn messages_that_are_not_this_services_leave_its_rows_alone<DB: TestDb>() {
    let w = World::<DB>::new().await;
    // Only notification consumes; task's row is published and stays published.
    let running = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(w.h.outbox.clone())
        .relay(relay().poll_interval(Duration::from_millis(100)))
        .consumer_with::<NotificationEvents, _>(w.recorder(), ConsumerConfig::default())
        .start()
        .await
        .unwrap();
    assert!(running.ready(Duration::from_secs(60)).await);
    let task = {
        let mut tx = w.h.pool.begin().await.unwrap();
        let e =
            w.h.outbox
                .enqueue(&mut *tx, &samples::urgency(1))
                .await
                .unwrap();
        tx.commit().await.unwrap();
        e
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.count("task", Status::Published).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the task event was not published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = w.h.pool.acquire().await.unwrap();
    let task_row =
        w.h.outbox
            .get(&mut conn, "task", task.id)
            .await
            .unwrap()
            .unwrap();
    drop(conn);
    let topic =
        w.h.outbox
            .catalog()
            .service("notification")
            .unwrap()
            .topic
            .clone();
    let bus = outbox_runtime::bus::KafkaBus::new(KafkaConfig::new(brokers())).unwrap();
    let key = Some("9".to_owned());
    for value in [
        b"not json at all".to_vec(),
        b"{\"outbox_id\": 0, \"event_type\": \"a.b\", \"payload\": {}}".to_vec(),
        // The task event, misrouted onto notification's topic.
        envelope::encode(&task_row, VersionFormat::Number).unwrap(),
    ] {
        let record = Outgoing {
            topic: topic.clone(),
            key: key.clone(),
            value,
            headers: Vec::new(),
        };
        bus.send(&record).await.unwrap();
    }
    let mut marker = samples::feishu(9);
    marker.user_id = 9;
    let mut tx = w.h.pool.begin().await.unwrap();
    w.h.outbox.enqueue(&mut *tx, &marker).await.unwrap();
    tx.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.count("notification", Status::Consumed).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the message after the strays was not consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    let mut conn = w.h.pool.acquire().await.unwrap();
    let after =
        w.h.outbox
            .get(&mut conn, "task", task.id)
            .await
            .unwrap()
            .unwrap();
    drop(conn);
    assert_eq!(after, task_row, "another service's row is not touched");
    assert_eq!(w.effects().await, (1, 1));
    w.cleanup().await;
}

// The consumer applies the messages waiting for it in one transaction; one failing handler
// rolls that back, its batch is applied one at a time, and only the failing event is retried.
async fn a_failing_handler_in_a_batch_leaves_the_rest_of_it_applied_once<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    recorder.failures.lock().unwrap().insert("pv-17".into(), 1);
    // Written before the relay starts, so the consumer finds them waiting together.
    let rows = w.enqueue_feishu(0..60).await;
    let running = w.start(recorder, relay()).await;
    w.settle(60).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (60, 60));
    w.consumed_once(&rows, &[17]).await;
    w.cleanup().await;
}

// A handler whose statement fails in the database (on PostgreSQL that aborts the whole
// transaction) costs its own message: a batch rolls back to its last savepoint (after the first
// failure) or runs again without it, and every other event of the batch is applied once. Every
// fourth event fails, so most batches meet several failures.
async fn a_handler_whose_statement_fails_costs_only_its_own_message<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    let failing: Vec<usize> = (0..60).filter(|n| n % 4 == 1).collect();
    for n in &failing {
        recorder
            .sql_errors
            .lock()
            .unwrap()
            .insert(format!("pv-{n}"), 1);
    }
    let rows = w.enqueue_feishu(0..60).await;
    let running = w.start(recorder.clone(), relay()).await;
    w.settle(60).await;
    running.shutdown().await.unwrap();
    assert!(
        recorder
            .sql_errors
            .lock()
            .unwrap()
            .values()
            .all(|n| *n == 0),
        "every failing statement ran"
    );
    assert_eq!(w.effects().await, (60, 60));
    w.consumed_once(&rows, &failing).await;
    w.cleanup().await;
}

// A handler that panics is a handler that failed: its event is retried through the outbox, and
// the worker of its partition lives on to apply everything after it. The first panic comes in
// the batch path, the second in the one-at-a-time path that follows it.
async fn a_panicking_handler_is_retried_and_its_partition_goes_on<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let recorder = w.recorder();
    recorder.panics.lock().unwrap().insert("pv-5".into(), 2);
    let rows = w.enqueue_feishu(0..30).await;
    let running = w.start(recorder.clone(), relay()).await;
    w.settle(30).await;
    // Written after the panics: the worker that panicked still applies new events.
    let late = w.enqueue_feishu(5..6).await.remove(0);
    w.settle(31).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (31, 31));
    assert!(
        recorder.panics.lock().unwrap()["pv-5"] == 0,
        "both panics ran"
    );
    let mut conn = w.h.pool.acquire().await.unwrap();
    let row =
        w.h.outbox
            .get(&mut conn, "notification", rows[5].id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(row.status, Status::Consumed);
    assert!(row.attempts >= 2, "published again after the panic");
    let late =
        w.h.outbox
            .get(&mut conn, "notification", late.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(late.status, Status::Consumed);
    drop(conn);
    w.cleanup().await;
}

// PostgreSQL: a relay in another process (here: an outbox instance that shares no in-process
// wake-up with the writer) rests between bursts and is woken by the writer's commit, not by its
// poll, which is an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_in_another_process_is_woken_by_each_commit_postgres() {
    use outbox_runtime::relay::{Relay, Shutdown};
    let w = World::<outbox_runtime::sqlx::Postgres>::new().await;
    let writer =
        outbox_runtime::Outbox::<outbox_runtime::sqlx::Postgres>::new(w.h.outbox.catalog().clone());
    let topic = w.h.outbox.catalog().service("task").unwrap().topic.clone();
    let bus = std::sync::Arc::new(
        outbox_runtime::bus::KafkaBus::new(KafkaConfig::new(brokers())).unwrap(),
    );
    bus.ensure_topics(&[topic]).await.unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let relay = Relay::new(
        w.h.outbox.clone(),
        w.h.pool.clone(),
        bus,
        relay().poll_interval(Duration::from_secs(3600)),
    );
    let task = tokio::spawn(relay.run(shutdown));
    for round in 1..=3 {
        // Long enough for the relay to have found nothing and rested.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut tx = w.h.pool.begin().await.unwrap();
        writer
            .enqueue(&mut *tx, &samples::urgency(round))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.count("task", Status::Published).await < round as i64 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the resting relay was not woken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    trigger.trigger();
    task.await.unwrap().unwrap();
    w.cleanup().await;
}

// Per-key order lets a claim take one row of a key; the next becomes due when that one is
// published, and the relay claims again at once instead of sleeping its poll interval (an hour
// here): the backlog drained at one row per key per poll before.
async fn a_backlog_of_one_key_drains_without_waiting_for_the_poll<DB: TestDb>() {
    let w = World::<DB>::new().await;
    for i in 0..30 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        let mut tx = w.h.pool.begin().await.unwrap();
        w.h.outbox.enqueue(&mut *tx, &e).await.unwrap();
        tx.commit().await.unwrap();
    }
    let running = w
        .start(
            w.recorder(),
            relay().poll_interval(Duration::from_secs(3600)),
        )
        .await;
    w.settle(30).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.effects().await, (30, 30));
    w.cleanup().await;
}

// A consumer typed on a second enum of a service is refused when the runtime is built (the
// compiler cannot see it: the enums are separate types): it would dead-letter the events of
// the catalog's enum as unknown, and the other consumer this one's.
#[tokio::test]
async fn a_consumer_of_a_second_enum_of_a_service_is_refused() {
    use outbox_runtime::contract::Error as ContractError;
    use outbox_runtime::sqlx::{Sqlite, SqlitePool};
    use outbox_runtime::{Catalog, Error, Outbox, OutboxEvent, OutboxService, RouteConfig};

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, OutboxEvent)]
    #[outbox(event_type = "task.archived", version = 1, service = "task")]
    struct TaskArchived {
        task_id: u64,
    }
    #[derive(OutboxService)]
    #[outbox(service = "task")]
    enum MoreTaskEvents {
        Archived(TaskArchived),
    }
    struct Archiver;
    impl MoreTaskEventsHandler<Context<Sqlite>> for Archiver {
        async fn archived(
            &self,
            _: &mut Context<Sqlite>,
            _: TaskArchived,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
    let catalog = Catalog::builder(RouteConfig::new())
        .service::<TaskEvents>()
        .unwrap()
        .build();
    let err = Engine::builder(pool, KafkaConfig::new(brokers()))
        .outbox(Outbox::<Sqlite>::new(catalog))
        .consumer::<MoreTaskEvents, _>(Archiver)
        .start()
        .await
        .unwrap_err();
    let Error::Contract(ContractError::ServiceClaimedTwice {
        service,
        first,
        second,
    }) = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (service.as_str(), *first),
        ("task", "contracts::task::TaskEvents")
    );
    assert!(second.ends_with("::MoreTaskEvents"), "{second}");
    assert!(
        err.to_string().starts_with(
            "service `task` is claimed by two enums, `contracts::task::TaskEvents` and `"
        ),
        "{err}"
    );
}

// An engine whose relay or consumers would write a table that `migrate` has not brought up to
// date (a MySQL table made before it had `room`) does not start: it says which column is
// missing and that `outbox migrate` adds it. Once migrated, the engine starts, and the event
// written before and the one after are consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_on_a_table_migrate_has_not_brought_up_to_date_is_refused_mysql() {
    use outbox_runtime::Error;
    use outbox_runtime::sqlx::MySql;
    use outbox_runtime::store::Backend;
    let w = World::<MySql>::new().await;
    let table = w.h.table("task");
    let mut conn = w.h.pool.acquire().await.unwrap();
    let drop_room = format!("ALTER TABLE {table} DROP COLUMN room");
    MySql::execute(&mut conn, &drop_room, Vec::new())
        .await
        .unwrap();
    drop(conn);
    let engine = |relay: bool| {
        let engine = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
            .outbox(w.h.outbox.clone());
        if relay {
            engine.relay(self::relay())
        } else {
            engine
                .without_relay()
                .consumer::<TaskEvents, _>(w.recorder())
        }
    };
    for relay in [true, false] {
        let Err(err) = engine(relay).start().await else {
            panic!("started on an outdated table (relay: {relay})");
        };
        let Error::TableOutdated {
            table: t, missing, ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(
            (t.as_str(), missing.as_slice()),
            (table.as_str(), &["room".to_owned()][..])
        );
        assert!(err.to_string().contains("run `outbox migrate`"), "{err}");
    }
    // Writers go on meanwhile: the insert does not name the column.
    put_task(&w, &samples::urgency(1)).await;
    let mut conn = w.h.pool.acquire().await.unwrap();
    w.h.outbox.migrate(&mut conn).await.unwrap();
    drop(conn);
    let running = w.start(w.recorder(), relay()).await;
    put_task(&w, &samples::urgency(2)).await;
    w.settle(2).await;
    running.shutdown().await.unwrap();
    assert_eq!(w.count("task", Status::Consumed).await, 2);
    w.h.cleanup().await;
}

/// A relay of the task service alone, on its own producer.
fn task_relay<DB: TestDb>(
    w: &World<DB>,
    kafka: KafkaConfig,
) -> (outbox_runtime::relay::Relay<DB, KafkaBus>, Arc<KafkaBus>) {
    let bus = Arc::new(KafkaBus::new(kafka).unwrap());
    let relay = outbox_runtime::relay::Relay::new(
        w.h.outbox.clone(),
        w.h.pool.clone(),
        bus.clone(),
        relay().batch(100),
    )
    .services(["task"]);
    (relay, bus)
}

fn task_topic<DB: TestDb>(w: &World<DB>) -> String {
    w.h.outbox.catalog().service("task").unwrap().topic.clone()
}

/// The event ids of the first `n` messages of `key` on `topic`, in the order the broker holds
/// them (a key's messages share one partition), waiting at most 60 s.
fn event_ids_on_the_broker(topic: &str, key: &str, n: usize) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("order-check-{:08x}", fastrand::u32(..)))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..KafkaConfig::new(brokers()).topic_partitions() {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    while ids.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages of key {key} arrived: {ids:?}",
            ids.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        if message.key() != Some(key.as_bytes()) {
            continue;
        }
        let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        ids.push(value["event_id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Asserts that the task topic holds `want`, and only those, as the messages of `key`, in
/// that order.
async fn assert_key_order_on_the_broker<DB: TestDb>(w: &World<DB>, key: &str, want: &[&Enqueued]) {
    let (topic, key, n) = (task_topic(w), key.to_owned(), want.len());
    let got = tokio::task::spawn_blocking(move || event_ids_on_the_broker(&topic, &key, n))
        .await
        .unwrap();
    let want: Vec<&str> = want.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(got, want);
}

async fn put_task<DB: TestDb>(w: &World<DB>, e: &TaskUrgencyPromoteRequested) -> Enqueued {
    let mut tx = w.h.pool.begin().await.unwrap();
    let done = w.h.outbox.enqueue(&mut *tx, e).await.unwrap();
    tx.commit().await.unwrap();
    done
}

async fn task_row<DB: TestDb>(w: &World<DB>, id: i64) -> outbox_runtime::store::OutboxRow {
    let mut conn = w.h.pool.acquire().await.unwrap();
    w.h.outbox
        .get(&mut conn, "task", id)
        .await
        .unwrap()
        .unwrap()
}

/// Five events of key 5 (the third larger than the producer takes) and one of key 6 between.
async fn a_key_with_an_oversized_event<DB: TestDb>(w: &World<DB>) -> (Vec<Enqueued>, Enqueued) {
    let mut rows = Vec::new();
    let mut other = None;
    for i in 0..5u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        if i == 2 {
            // About 9 kB of ids against a 2 kB `message.max.bytes`.
            e.task_ids = (0..500).map(|n| 1_000_000_000_000_000 + n).collect();
            let mut o = samples::urgency(100);
            o.user_id = 6;
            other = Some(put_task(w, &o).await);
        }
        rows.push(put_task(w, &e).await);
    }
    (rows, other.unwrap())
}

// Per-key order through a failure, the classic case: an event larger than the producer takes.
// It goes dead at once with its reason (no retry can send it), the rows of its key behind it in
// the same batch are not sent but given back uncounted, and they go out after it, in order; a
// row of another key in the batch is not held back.
async fn an_oversized_event_goes_dead_and_its_keys_later_rows_follow_in_order<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let (rows, other) = a_key_with_an_oversized_event(&w).await;
    let (relay, bus) = task_relay(
        &w,
        KafkaConfig::new(brokers()).set("message.max.bytes", "2000"),
    );
    bus.ensure_topics(&[task_topic(&w)]).await.unwrap();
    assert_eq!(relay.relay_once("task").await.unwrap(), 6);
    let states: Vec<_> = row_states(&w, &rows).await;
    assert_eq!(
        states,
        [
            (Status::Published, 1, None),
            (Status::Published, 1, None),
            (Status::Dead, 1, Some("message_too_large".to_owned())),
            (Status::Pending, 0, None),
            (Status::Pending, 0, None),
        ]
    );
    assert!(
        task_row(&w, rows[2].id)
            .await
            .last_error
            .unwrap()
            .contains("too large"),
        "the dead row names its reason"
    );
    assert_eq!(task_row(&w, other.id).await.status, Status::Published);
    assert_eq!(relay.relay_once("task").await.unwrap(), 2);
    for r in [&rows[3], &rows[4]] {
        let r = task_row(&w, r.id).await;
        assert_eq!((r.status, r.attempts), (Status::Published, 1));
    }
    let want: Vec<&Enqueued> = [0, 1, 3, 4].iter().map(|&i| &rows[i]).collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    w.cleanup().await;
}

// A publish that fails (here: the topic does not exist, and the broker does not create it) puts
// its row back for a retry and its key's later rows of the batch back uncounted; while the
// first waits for its retry no later row of its key is claimed; once the topic exists the key
// goes out in id order.
async fn a_failed_publish_holds_its_keys_later_rows_back_until_it_goes<DB: TestDb>() {
    let w = World::<DB>::new().await;
    let rows: Vec<Enqueued> = {
        let mut rows = Vec::new();
        for i in 0..4u64 {
            let mut e = samples::urgency(i);
            e.user_id = 5;
            rows.push(put_task(&w, &e).await);
        }
        rows
    };
    let kafka = KafkaConfig::new(brokers()).publish_timeout(Duration::from_secs(1));
    let (relay, bus) = task_relay(&w, kafka);
    assert_eq!(relay.relay_once("task").await.unwrap(), 4);
    let first = task_row(&w, rows[0].id).await;
    assert_eq!((first.status, first.attempts), (Status::Pending, 1));
    assert!(first.last_error.is_some());
    for r in &rows[1..] {
        let r = task_row(&w, r.id).await;
        assert_eq!(
            (r.status, r.attempts, r.last_error),
            (Status::Pending, 0, None)
        );
    }
    // The later rows are due, the first is not: nothing of the key may go.
    let mut conn = w.h.pool.acquire().await.unwrap();
    let now = w.h.outbox.now_ms();
    if first.next_attempt_at.unwrap() > now {
        let claimed =
            w.h.outbox
                .claim(&mut conn, "task", "probe", 10, Duration::from_secs(1))
                .await
                .unwrap();
        assert!(
            claimed.is_empty() || claimed[0].id == rows[0].id,
            "a later row of the key was claimed before the failed one: {claimed:?}"
        );
        if !claimed.is_empty() {
            // The retry came due meanwhile: give the probe's claim back.
            let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
            w.h.outbox
                .release_leased(&mut conn, "task", "probe", &ids)
                .await
                .unwrap();
        }
    }
    drop(conn);
    bus.ensure_topics(&[task_topic(&w)]).await.unwrap();
    // A new producer, so that the failed one's view of the missing topic plays no part.
    let (relay, _bus) = task_relay(&w, KafkaConfig::new(brokers()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.count("task", Status::Published).await < 4 {
        assert!(Instant::now() < deadline, "the key did not drain in 60 s");
        if relay.relay_once("task").await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_key_order_on_the_broker(&w, "5", &rows.iter().collect::<Vec<_>>()).await;
    w.cleanup().await;
}

/// A bus that, on its first send, waits until the relay has claimed more rows than that send
/// carries (the next batch, claimed while this one is published) and records whether it saw
/// that within 30 s (with one writer at a time, where the relay claims nothing while it
/// publishes, it looks once); then it passes every send to the broker.
struct OverlapWatch<DB: TestDb> {
    bus: Arc<KafkaBus>,
    pool: outbox_runtime::sqlx::Pool<DB>,
    outbox: outbox_runtime::Outbox<DB>,
    first: std::sync::atomic::AtomicBool,
    overlapped: std::sync::atomic::AtomicBool,
}

impl<DB: TestDb> OverlapWatch<DB> {
    fn new(w: &World<DB>, kafka: KafkaConfig) -> Self {
        Self {
            bus: Arc::new(KafkaBus::new(kafka).unwrap()),
            pool: w.h.pool.clone(),
            outbox: w.h.outbox.clone(),
            first: true.into(),
            overlapped: false.into(),
        }
    }

    async fn sending(&self) -> i64 {
        let mut conn = self.pool.acquire().await.unwrap();
        let stats = self.outbox.stats(&mut conn).await.unwrap();
        let task = stats.iter().find(|s| s.service == "task").unwrap();
        task.counts.get(&Status::Sending).copied().unwrap_or(0)
    }

    /// On the first call only: waits until more rows are leased than a send of `carried`
    /// records holds (30 s at most; with one writer at a time, looks once), and records
    /// whether it saw that.
    async fn first_overlap(&self, carried: usize) {
        use std::sync::atomic::Ordering;
        if !self.first.swap(false, Ordering::SeqCst) {
            return;
        }
        let wait = if DB::ONE_WRITER { 0 } else { 30 };
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            if self.sending().await > carried as i64 {
                self.overlapped.store(true, Ordering::SeqCst);
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that the relay claimed a batch while it published the first one, unless the
    /// backend has one writer at a time.
    fn assert_overlapped(&self) {
        assert_eq!(
            self.overlapped.load(std::sync::atomic::Ordering::SeqCst),
            !DB::ONE_WRITER,
            "whether a batch was claimed while the first one was in flight (one writer: {})",
            DB::ONE_WRITER
        );
    }
}

impl<DB: TestDb> Publish for OverlapWatch<DB> {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<outbox_runtime::bus::Sent> {
        self.first_overlap(records.len()).await;
        self.bus.send_all(records).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.bus.ensure_topics(topics).await
    }
}

// A backlog that fills the relay's batches: each batch is published while the next is claimed
// (the database claims while the broker acknowledges; with one writer at a time, SQLite, one
// after the other). Every key reaches the broker in id order, a hot key among twenty others as
// well, and through a failure: the hot key's oversized event goes dead, and its later rows
// follow the rows before it.
async fn a_backlog_is_claimed_while_the_batch_before_it_is_published_keys_in_order<DB: TestDb>() {
    let w = World::<DB>::new().await;
    // Eight times: one event of each of keys 100..=119, then five of key 5; the eleventh event
    // of key 5 is too large for the producer.
    let mut of_key: HashMap<String, Vec<Enqueued>> = HashMap::new();
    let mut oversized = None;
    for round in 0..8u64 {
        for k in 100..120u64 {
            let mut e = samples::urgency(round * 100 + k);
            e.user_id = k;
            of_key
                .entry(k.to_string())
                .or_default()
                .push(put_task(&w, &e).await);
        }
        for j in 0..5u64 {
            let mut e = samples::urgency(round * 10 + j);
            e.user_id = 5;
            if round == 2 && j == 0 {
                e.task_ids = (0..500).map(|n| 1_000_000_000_000_000 + n).collect();
                oversized = Some(put_task(&w, &e).await);
                continue;
            }
            of_key
                .entry("5".to_owned())
                .or_default()
                .push(put_task(&w, &e).await);
        }
    }
    let oversized = oversized.unwrap();
    let kafka = KafkaConfig::new(brokers()).set("message.max.bytes", "2000");
    let watch = Arc::new(OverlapWatch::new(&w, kafka));
    drain_in_batches_of_ten(&w, watch.clone(), 8 * 25).await;
    watch.assert_overlapped();
    let dead = task_row(&w, oversized.id).await;
    assert_eq!(
        (dead.status, dead.dead_reason.as_deref()),
        (Status::Dead, Some("message_too_large"))
    );
    assert_eq!(w.count("task", Status::Dead).await, 1);
    for (key, rows) in &of_key {
        assert_key_order_on_the_broker(&w, key, &rows.iter().collect::<Vec<_>>()).await;
    }
    w.cleanup().await;
}

/// A bus that fails one record, found by its event id, the first time it is asked to send it
/// (a transient error, as a broker that is briefly unreachable gives), holding back the later
/// records of its key in that call as the producer does. Before it answers that call it waits
/// until the relay has claimed more rows than the call carries (the next batch, claimed while
/// this one is in flight), at most 30 s, and records whether it saw that (with one writer at a
/// time, where the relay claims nothing while it publishes, it looks once).
struct FailOnceInFlight<DB: TestDb> {
    watch: OverlapWatch<DB>,
    fail: String,
    failed: std::sync::atomic::AtomicBool,
}

impl<DB: TestDb> Publish for FailOnceInFlight<DB> {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<outbox_runtime::bus::Sent> {
        use outbox_runtime::bus::Sent;
        use std::sync::atomic::Ordering;
        let event_id = |r: &Outgoing| {
            serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let at = records.iter().position(|r| event_id(r) == self.fail);
        let Some(at) = at.filter(|_| !self.failed.swap(true, Ordering::SeqCst)) else {
            return self.watch.bus.send_all(records).await;
        };
        self.watch.first_overlap(records.len()).await;
        let key = records[at].key.clone();
        let held = |i: usize| i > at && records[i].key == key;
        let passed: Vec<Outgoing> = (0..records.len())
            .filter(|&i| i != at && !held(i))
            .map(|i| records[i].clone())
            .collect();
        let mut sent = self.watch.bus.send_all(&passed).await.into_iter();
        (0..records.len())
            .map(|i| {
                if i == at {
                    Sent::Failed(outbox_runtime::Error::Bus(
                        "the broker is away (test)".into(),
                    ))
                } else if held(i) {
                    Sent::HeldBack
                } else {
                    sent.next().unwrap()
                }
            })
            .collect()
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.watch.bus.ensure_topics(topics).await
    }
}

// A hot key drains as fast as many keys: while the relay publishes a batch, it claims the next
// one behind it, of the same key (on SQLite, one batch after the other). When a row of the
// batch in flight fails, its key's rows in the next batch are given back uncounted before that
// batch is sent, so none reaches the broker before the failed row's retry: the key arrives in
// id order, every row with one attempt but the failed one (two), and the other key's rows in
// the next batch go on.
async fn a_hot_keys_next_batch_is_claimed_behind_the_one_in_flight_and_waits_for_its_failed_row<
    DB: TestDb,
>() {
    let w = World::<DB>::new().await;
    // 40 events of key 5, and after every fifth one of key 6.
    let mut of_key: HashMap<String, Vec<Enqueued>> = HashMap::new();
    for i in 0..40u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        of_key
            .entry("5".to_owned())
            .or_default()
            .push(put_task(&w, &e).await);
        if i % 5 == 4 {
            let mut e = samples::urgency(100 + i);
            e.user_id = 6;
            of_key
                .entry("6".to_owned())
                .or_default()
                .push(put_task(&w, &e).await);
        }
    }
    // The sixth event of key 5, in the first batch of ten.
    let failing = of_key["5"][5].clone();
    let bus = Arc::new(FailOnceInFlight {
        watch: OverlapWatch::new(&w, KafkaConfig::new(brokers())),
        fail: failing.event_id.clone(),
        failed: false.into(),
    });
    drain_in_batches_of_ten(&w, bus.clone(), 48).await;
    // Only one key besides 5, whose rows are in the first batch too: a claim that passed over
    // nothing in flight would have found every key stopped.
    bus.watch.assert_overlapped();
    for (key, rows) in &of_key {
        for r in rows {
            let row = task_row(&w, r.id).await;
            let want = if r.id == failing.id { 2 } else { 1 };
            assert_eq!(
                (row.status, row.attempts),
                (Status::Published, want),
                "row {} of key {key}",
                r.id
            );
        }
        assert_key_order_on_the_broker(&w, key, &rows.iter().collect::<Vec<_>>()).await;
    }
    w.cleanup().await;
}

/// Runs a relay of the task service with batches of ten on `bus` until `settled` rows are
/// published or dead (60 s at most), and stops it.
async fn drain_in_batches_of_ten<DB: TestDb, B: Publish>(w: &World<DB>, bus: Arc<B>, settled: i64) {
    bus.ensure_topics(&[task_topic(w)]).await.unwrap();
    let relay = outbox_runtime::relay::Relay::new(
        w.h.outbox.clone(),
        w.h.pool.clone(),
        bus,
        relay().batch(10),
    )
    .services(["task"]);
    let (trigger, shutdown) = outbox_runtime::relay::Shutdown::new();
    let task = tokio::spawn(relay.run(shutdown));
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.count("task", Status::Published).await + w.count("task", Status::Dead).await < settled {
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    task.await.unwrap().unwrap();
}

/// `(status, attempts, dead_reason)` of each row.
async fn row_states<DB: TestDb>(
    w: &World<DB>,
    rows: &[Enqueued],
) -> Vec<(Status, i32, Option<String>)> {
    let mut out = Vec::new();
    for r in rows {
        let r = task_row(w, r.id).await;
        out.push((r.status, r.attempts, r.dead_reason));
    }
    out
}

// The in-memory bus puts a key on the partition librdkafka's `murmur2_random` picks on a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_bus_partitions_keys_as_librdkafka_does_on_the_broker() {
    let bus = KafkaBus::new(KafkaConfig::new(brokers()).partitions(5)).unwrap();
    let topic = format!("murmur2-{:08x}", fastrand::u32(..));
    bus.ensure_topics(std::slice::from_ref(&topic))
        .await
        .unwrap();
    let records: Vec<Outgoing> = (0..200)
        .map(|i| Outgoing {
            topic: topic.clone(),
            key: Some(format!("user-{i}-{}", "k".repeat(i % 7))),
            value: b"x".to_vec(),
            headers: Vec::new(),
        })
        .collect();
    let mut partitions = std::collections::HashSet::new();
    for (r, sent) in records.iter().zip(bus.send_all(&records).await) {
        let (partition, _) = sent.into_result().unwrap();
        let key = r.key.as_deref().unwrap();
        assert_eq!(
            partition,
            outbox_runtime::bus::partition_for(key.as_bytes(), 5),
            "{key}"
        );
        partitions.insert(partition);
    }
    assert_eq!(partitions.len(), 5, "the keys spread over every partition");
}

/// A consumer's database of its own (`C`): the inbox tables and an effects table, no outbox
/// table; and a recorder of effects there whose handler of `pv-3` fails twice.
struct OwnDatabase<C: TestDb> {
    pool: outbox_runtime::sqlx::Pool<C>,
    file: Option<std::path::PathBuf>,
    outbox: outbox_runtime::Outbox<C>,
    effects: String,
    recorder: Recorder,
}

impl<C: TestDb> OwnDatabase<C> {
    /// For the consumers of `w`'s services; `letter` starts the effects table's name.
    async fn open<P: TestDb>(w: &World<P>, letter: &str) -> Self {
        let (pool, file) = C::open(&format!("inbox-{}", w.h.tag)).await;
        let outbox = outbox_runtime::Outbox::<C>::builder(w.h.outbox.catalog().clone()).build();
        let effects = format!("{letter}{}", w.h.tag);
        {
            let mut conn = pool.acquire().await.unwrap();
            let _turn = harness::MIGRATIONS.lock().await;
            for sql in outbox.migration_sql() {
                if sql.contains("outbox_inbox") || sql.contains("outbox_calls") {
                    C::execute(&mut conn, &sql, Vec::new()).await.unwrap();
                }
            }
            let sql = format!(
                "CREATE TABLE {effects} (event_id VARCHAR(64) NOT NULL, kind VARCHAR(32) NOT NULL)"
            );
            C::execute(&mut conn, &sql, Vec::new()).await.unwrap();
        }
        let recorder = Recorder {
            effects: effects.clone(),
            ..Recorder::default()
        };
        recorder
            .failures
            .lock()
            .unwrap()
            .insert("pv-3".to_owned(), 2);
        Self {
            pool,
            file,
            outbox,
            effects,
            recorder,
        }
    }
}

/// The producer relays from database `P`; the consumer applies in database `C`, which has no
/// outbox table of the producer's, only the inbox: each event once, a handler that fails twice
/// kept in `C` and retried, poison dead in `C` with its envelope, and the producer's rows left
/// `published`.
async fn an_inbox_consumer_in_its_own_database_applies_each_event_once<P: TestDb, C: TestDb>(
    kind: Kind,
) {
    let w = World::<P>::new().await;
    let own = OwnDatabase::<C>::open(&w, "i").await;
    let (pool, file, outbox, effects) = (own.pool, own.file, own.outbox, own.effects);
    let recorder = own.recorder;
    let producer = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(w.h.outbox.clone())
        .relay(relay())
        .start()
        .await
        .unwrap();
    let config = ConsumerConfig::default()
        .dedupe(outbox_runtime::Dedupe::Inbox)
        .inbox_attempts(5)
        .dlq(true);
    let consumer = Engine::builder(pool.clone(), KafkaConfig::new(brokers()))
        .outbox(outbox.clone())
        .without_relay();
    let consumer = match kind {
        Kind::InTransaction => consumer.consumer_with::<NotificationEvents, _>(recorder, config),
        Kind::Calls => consumer.call_consumer_with::<NotificationEvents, _>(
            Caller {
                recorder,
                pool: pool.clone(),
            },
            config,
        ),
    }
    .start()
    .await
    .unwrap();
    assert!(consumer.ready(Duration::from_secs(60)).await);
    let rows = w.enqueue_feishu(0..20).await;
    let route =
        w.h.outbox
            .catalog()
            .service("notification")
            .unwrap()
            .clone();
    let v9 = r#"{"outbox_id":900,"event_id":"inbox-poison","event_type":"notification.feishu.requested","event_version":"9","service_name":"notification","payload":{}}"#;
    KafkaBus::new(KafkaConfig::new(brokers()))
        .unwrap()
        .send(&Outgoing {
            topic: route.topic.clone(),
            key: Some("7".into()),
            value: v9.as_bytes().to_vec(),
            headers: Vec::new(),
        })
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let (applied, dead) = loop {
        let mut conn = pool.acquire().await.unwrap();
        let applied = C::fetch_ints(
            &mut conn,
            &format!("SELECT COUNT(DISTINCT event_id) FROM {effects}"),
            Vec::new(),
        )
        .await
        .unwrap()[0]
            .unwrap();
        let dead = outbox
            .list_inbox_dead(&mut conn, &route.group, "", 10)
            .await
            .unwrap();
        if applied >= 20 && !dead.is_empty() {
            break (applied, dead);
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of 20 applied and {} dead letters in 60 s",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    consumer.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();

    let mut conn = pool.acquire().await.unwrap();
    let all = C::fetch_ints(
        &mut conn,
        &format!("SELECT COUNT(*) FROM {effects}"),
        Vec::new(),
    )
    .await
    .unwrap()[0]
        .unwrap();
    assert_eq!((all, applied), (20, 20), "each event once");
    if kind == Kind::Calls {
        // The event whose call failed twice succeeded on its third attempt; no call is open.
        let third = C::fetch_ints(
            &mut conn,
            &format!("SELECT COUNT(*) FROM {effects} WHERE kind = 'call-3'"),
            Vec::new(),
        )
        .await
        .unwrap()[0];
        assert_eq!(third, Some(1));
        let sql = C::sql("SELECT COUNT(*) FROM outbox_calls WHERE consumer_group = $1");
        let open = C::fetch_ints(&mut conn, &sql, vec![Arg::Str(route.group.clone())]);
        assert_eq!(open.await.unwrap()[0], Some(0));
    }
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].event_id.as_str(),
            dead[0].reason.as_str(),
            dead[0].envelope.as_str()
        ),
        ("inbox-poison", "unsupported_version", v9)
    );
    C::execute(&mut conn, &format!("DROP TABLE {effects}"), Vec::new())
        .await
        .unwrap();
    drop(conn);
    pool.close().await;
    if let Some(file) = file {
        let _ = std::fs::remove_file(file);
    }
    // The producer's rows: published, never marked by a consumer in another database.
    assert_eq!(rows.len(), 20);
    assert_eq!(w.count("notification", Status::Published).await, 20);
    w.cleanup().await;
}
