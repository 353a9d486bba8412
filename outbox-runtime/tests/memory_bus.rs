//! The consumer's and the relay's logic, unit-tested on the in-memory bus and SQLite: batches,
//! the fallback after a failing handler, offsets never stored past an unsettled message, poison,
//! shutdown in the middle of a batch, and per-key order through failed publishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outbox_runtime::bus::{Bus, MemoryBus, Outgoing, Publish, Sent, partition_for};
use outbox_runtime::consumer::Consumer;
use outbox_runtime::relay::{Relay, Shutdown};
use outbox_runtime::sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use outbox_runtime::sqlx::{Sqlite, SqlitePool};
use outbox_runtime::store::{GoRoute, ManualClock, StoreConfig};
use outbox_runtime::{
    Call, Catalog, ConsumerConfig, Context, Dedupe, HandlerError, Outbox, OutboxEvent,
    OutboxService, RelayConfig, RouteConfig, Status,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
#[outbox(event_type = "order.placed", version = 1, service = "orders", key = customer)]
pub struct OrderPlaced {
    pub customer: String,
    pub n: u64,
    /// Padding, to make a record too large.
    pub note: String,
}

#[derive(Debug, Clone, OutboxService)]
#[outbox(service = "orders")]
pub enum OrderEvents {
    OrderPlaced(OrderPlaced),
}

/// Records every call; fails or waits where told.
#[derive(Default)]
struct Recorder {
    calls: Mutex<HashMap<u64, u32>>,
    /// `n` whose first call fails with a retryable error.
    fail_once: Option<u64>,
    /// `n` whose every call fails with a retryable error.
    always_fail: Vec<u64>,
    /// `n` whose handler refuses it for good.
    refuse: Vec<u64>,
    /// `n` whose call closes the pool once it is applied (a database going away).
    close_pool_after: Option<(u64, SqlitePool)>,
    /// `n` whose call waits for `gate` (and signals `entered` first).
    hold: Option<(u64, Arc<Notify>, Arc<Notify>)>,
}

impl Recorder {
    fn calls(&self, n: u64) -> u32 {
        self.calls.lock().unwrap().get(&n).copied().unwrap_or(0)
    }
}

impl OrderEventsHandler<Context<Sqlite>> for Arc<Recorder> {
    async fn order_placed(
        &self,
        ctx: &mut Context<Sqlite>,
        e: OrderPlaced,
    ) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(e.n).or_default();
            *c += 1;
            *c
        };
        if self.fail_once == Some(e.n) && call == 1 || self.always_fail.contains(&e.n) {
            return Err(HandlerError::retry("the payment service answered 503"));
        }
        if self.refuse.contains(&e.n) {
            return Err(HandlerError::permanent("no such customer"));
        }
        if let Some((n, entered, gate)) = &self.hold
            && *n == e.n
        {
            entered.notify_one();
            gate.notified().await;
        }
        outbox_runtime::sqlx::query("INSERT INTO effects (n) VALUES (?)")
            .bind(e.n as i64)
            .execute(ctx.tx())
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))?;
        if let Some((n, pool)) = &self.close_pool_after
            && *n == e.n
        {
            let pool = pool.clone();
            tokio::spawn(async move { pool.close().await });
        }
        Ok(())
    }
}

struct World {
    pool: SqlitePool,
    outbox: Outbox<Sqlite>,
    bus: MemoryBus,
    topic: String,
    group: String,
    _dir: Option<TempFile>,
}

/// A SQLite file removed when the test ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

async fn file_pool(path: &std::path::Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .busy_timeout(std::time::Duration::from_secs(10)),
        )
        .await
        .unwrap()
}

impl World {
    async fn new(bus: MemoryBus) -> Self {
        let path = std::env::temp_dir().join(format!(
            "outbox-memory-bus-{}-{:08x}.db",
            std::process::id(),
            fastrand::u32(..)
        ));
        let pool = file_pool(&path).await;
        let catalog = Catalog::builder(RouteConfig::new())
            .service::<OrderEvents>()
            .unwrap()
            .build();
        let outbox = Outbox::<Sqlite>::new(catalog);
        let mut conn = pool.acquire().await.unwrap();
        outbox.migrate(&mut conn).await.unwrap();
        outbox_runtime::sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)")
            .execute(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let route = outbox.catalog().service("orders").unwrap().clone();
        bus.ensure_topics(&[route.topic.clone(), format!("{}.dlq", route.topic)])
            .await
            .unwrap();
        Self {
            pool,
            outbox,
            bus,
            topic: route.topic,
            group: route.group,
            _dir: Some(TempFile(path)),
        }
    }

    async fn enqueue(&self, customer: &str, n: u64, note_len: usize) -> i64 {
        let mut tx = self.pool.begin().await.unwrap();
        let e = OrderPlaced {
            customer: customer.to_owned(),
            n,
            note: "x".repeat(note_len),
        };
        let done = self.outbox.enqueue(&mut *tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        done.id
    }

    fn relay(&self) -> Relay<Sqlite, MemoryBus> {
        Relay::new(
            self.outbox.clone(),
            self.pool.clone(),
            Arc::new(self.bus.clone()),
            RelayConfig::default(),
        )
    }

    /// Publishes every due row.
    async fn relay_all(&self) {
        let relay = self.relay();
        while relay.relay_once("orders").await.unwrap() > 0 {}
    }

    fn consumer(
        &self,
        pool: &SqlitePool,
        recorder: &Arc<Recorder>,
        config: ConsumerConfig,
    ) -> Consumer<Sqlite, OrderEvents, Arc<Recorder>, MemoryBus> {
        Consumer::new(
            self.outbox.clone(),
            pool.clone(),
            Arc::new(self.bus.clone()),
            recorder.clone(),
            config,
        )
        .unwrap()
    }

    /// Runs a consumer on `pool` until the group has committed past every message of the
    /// topic, then stops it.
    async fn consume_everything(
        &self,
        pool: &SqlitePool,
        recorder: &Arc<Recorder>,
        config: ConsumerConfig,
    ) {
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(self.consumer(pool, recorder, config).run(shutdown));
        self.consumed_all().await;
        trigger.trigger();
        task.await.unwrap().unwrap();
    }

    /// Waits until the group has committed past every message of the topic.
    async fn consumed_all(&self) {
        loop {
            let changed = self.bus.changed();
            if self.bus.lag(&self.group, &self.topic) == 0 {
                return;
            }
            changed.await;
        }
    }

    async fn effects(&self) -> Vec<i64> {
        outbox_runtime::sqlx::query_scalar("SELECT n FROM effects ORDER BY n")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn status(&self, id: i64) -> outbox_runtime::store::OutboxRow {
        let mut conn = self.pool.acquire().await.unwrap();
        self.outbox
            .get(&mut conn, "orders", id)
            .await
            .unwrap()
            .unwrap()
    }
}

#[tokio::test]
async fn a_batch_applies_together_and_one_whose_handler_fails_is_left_out_of_it() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder {
        fail_once: Some(7),
        ..Recorder::default()
    });
    // On this single-threaded runtime the receiving loop hands the worker every waiting
    // message before the worker runs: one batch of 20.
    w.consume_everything(&w.pool, &recorder, ConsumerConfig::default().workers(1))
        .await;

    // 0..=7 ran in the batch that rolled back at 7; then the batch ran again without 7 (0..=6
    // a second time, 8.. once), and 7's failure went back through the outbox.
    for n in 0..20 {
        let expected = if n < 7 { 2 } else { 1 };
        assert_eq!(recorder.calls(n), expected, "calls of {n}");
    }
    // Each effect exactly once: the batch's writes rolled back with it.
    let expected: Vec<i64> = (0..20).filter(|n| *n != 7).collect();
    assert_eq!(w.effects().await, expected);
    assert_eq!(w.bus.committed(&w.group, &w.topic), vec![20]);
    let failed = w.status(ids[7]).await;
    assert_eq!(
        (failed.status, failed.last_error.as_deref()),
        (Status::Pending, Some("the payment service answered 503"))
    );
}

#[tokio::test]
async fn a_failing_handler_costs_its_own_message_not_its_batch() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder {
        always_fail: vec![3, 13],
        ..Recorder::default()
    });
    let (trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&w.pool, &recorder, ConsumerConfig::default().workers(1));
    let task = tokio::spawn(consumer.run(shutdown));
    w.consumed_all().await;
    // The failure rolled its batch back once: the messages before it ran again, the messages
    // after it once, and its retry was scheduled.
    for n in 0..10 {
        assert_eq!(recorder.calls(n), if n < 3 { 2 } else { 1 }, "calls of {n}");
    }
    let failed = w.status(ids[3]).await;
    assert_eq!(
        (failed.status, failed.last_error.as_deref()),
        (Status::Pending, Some("the payment service answered 503"))
    );
    // The same in the next batch: its failing message costs the messages before it one run,
    // those after it none. (Another key: 3, waiting for its retry, holds c1's later rows back.)
    for n in 10..20 {
        ids.push(w.enqueue("c2", n, 0).await);
    }
    w.relay_all().await;
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();
    for n in 10..20 {
        let expected = if n < 13 { 2 } else { 1 };
        assert_eq!(recorder.calls(n), expected, "calls of {n}");
    }
    assert_eq!(w.status(ids[13]).await.status, Status::Pending);
    let expected: Vec<i64> = (0..20).filter(|n| *n != 3 && *n != 13).collect();
    assert_eq!(
        w.effects().await,
        expected,
        "every effect but the failing ones, once"
    );
    for (n, id) in ids.iter().enumerate() {
        if n != 3 && n != 13 {
            assert_eq!(w.status(*id).await.status, Status::Consumed, "row of {n}");
        }
    }
}

#[tokio::test]
async fn after_a_failure_batches_take_savepoints_and_a_failure_reruns_only_the_handlers_since_the_last()
 {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let failing: Vec<u64> = vec![1, 3, 5, 7, 9, 24];
    let recorder = Arc::new(Recorder {
        always_fail: failing.clone(),
        ..Recorder::default()
    });
    w.consume_everything(&w.pool, &recorder, ConsumerConfig::default().workers(1))
        .await;
    // The first failure (1) rolled the whole batch back: 0 ran twice. From then on the batch
    // took savepoints: at 0, after each failure (4, 6, 8, 10), and ten handlers after the
    // last (20): each failure ran again only the handlers since the savepoint before it
    // (0 and 2 for 3; 4 for 5; 6 for 7; 8 for 9; 20 to 23 for 24).
    let calls: Vec<u32> = (0..30).map(|n| recorder.calls(n)).collect();
    let mut expected = vec![1u32; 30];
    for n in [0, 2, 4, 6, 8, 20, 21, 22, 23] {
        expected[n] += 1;
    }
    expected[0] += 1;
    assert_eq!(calls, expected);
    let applied: Vec<i64> = (0..30i64)
        .filter(|n| !failing.contains(&n.unsigned_abs()))
        .collect();
    assert_eq!(w.effects().await, applied);
    for (n, id) in ids.iter().enumerate() {
        let row = w.status(*id).await;
        if failing.contains(&(n as u64)) {
            // Each failure recorded on its own row: one attempt, back to pending.
            assert_eq!(
                (row.status, row.attempts),
                (Status::Pending, 1),
                "row of {n}"
            );
        } else {
            assert_eq!(row.status, Status::Consumed, "row of {n}");
        }
    }
}

#[tokio::test]
async fn an_event_whose_handler_failed_in_a_batch_runs_alone_when_it_comes_back() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..5 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder {
        always_fail: vec![3],
        ..Recorder::default()
    });
    let (trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&w.pool, &recorder, ConsumerConfig::default().workers(1));
    let task = tokio::spawn(consumer.run(shutdown));
    w.consumed_all().await;
    assert_eq!(recorder.calls(3), 1);
    let again = w
        .bus
        .messages(&w.topic)
        .into_iter()
        .find(|m| m.offset == 3)
        .unwrap();

    // Event 3 comes back (a redelivery) in the middle of another key's messages, all in one
    // batch: relayed to a bus of their own first, then put on the consumer's all at once.
    let aside = MemoryBus::new().with_partitions(1);
    aside
        .ensure_topics(std::slice::from_ref(&w.topic))
        .await
        .unwrap();
    for n in 10..20 {
        w.enqueue("c2", n, 0).await;
    }
    let relay = Relay::new(
        w.outbox.clone(),
        w.pool.clone(),
        Arc::new(aside.clone()),
        RelayConfig::default(),
    );
    while relay.relay_once("orders").await.unwrap() > 0 {}
    let outgoing = |m: &outbox_runtime::bus::Received| outgoing_of(&w.topic, m);
    let c2 = aside.messages(&w.topic);
    let mut records: Vec<Outgoing> = c2[..5].iter().map(outgoing).collect();
    records.push(outgoing(&again));
    records.extend(c2[5..].iter().map(outgoing));
    w.bus.send_all(&records).await;
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();

    // 3 ran on its own: the batch around it did not roll back for it.
    assert_eq!(recorder.calls(3), 2);
    for n in 10..20 {
        assert_eq!(recorder.calls(n), 1, "calls of {n}");
    }
    let expected: Vec<i64> = (0..20)
        .filter(|n| *n != 3 && !(5..10).contains(n))
        .collect();
    assert_eq!(w.effects().await, expected);
}

#[tokio::test]
async fn a_batch_commits_when_its_time_bound_is_up_and_the_rest_goes_into_the_next() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..10 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder {
        fail_once: Some(3),
        ..Recorder::default()
    });
    // A zero bound: the batch of 10 commits after each message, so the failure at 3 rolls
    // back only its own transaction, and no handler runs twice.
    let config = ConsumerConfig::default()
        .workers(1)
        .batch_time(std::time::Duration::ZERO);
    w.consume_everything(&w.pool, &recorder, config).await;
    for n in 0..10 {
        assert_eq!(recorder.calls(n), 1, "calls of {n}");
    }
    let expected: Vec<i64> = (0..10).filter(|n| *n != 3).collect();
    assert_eq!(w.effects().await, expected);
    assert_eq!(w.bus.committed(&w.group, &w.topic), vec![10]);
}

// An inbox consumer records a batch's events in one statement before their handlers run: the
// ones a batch leaves for the next (its time bound is up) are taken back, and an event that
// comes twice, or was applied before, is applied once.
#[tokio::test]
async fn an_inbox_batch_records_its_events_at_once_and_takes_back_those_it_leaves() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..10 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    // 4 published again: twice in the same batch.
    let mut again = w.bus.messages(&w.topic);
    let fourth = again.swap_remove(4);
    w.bus.send_all(&[outgoing_of(&w.topic, &fourth)]).await;
    let recorder = Arc::new(Recorder::default());
    let inbox = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .workers(1)
        .batch_time(std::time::Duration::ZERO);
    w.consume_everything(&w.pool, &recorder, inbox.clone())
        .await;
    for n in 0..10 {
        assert_eq!(recorder.calls(n), 1, "calls of {n}");
    }
    assert_eq!(w.effects().await, (0..10).collect::<Vec<i64>>());
    // All of them again, in one batch this time: recorded already, none runs.
    for m in w.bus.messages(&w.topic).iter().take(10) {
        w.bus.send_all(&[outgoing_of(&w.topic, m)]).await;
    }
    let whole = inbox.batch_time(std::time::Duration::from_secs(60));
    w.consume_everything(&w.pool, &recorder, whole).await;
    for n in 0..10 {
        assert_eq!(recorder.calls(n), 1, "calls of {n}");
    }
    let recorded: i64 = outbox_runtime::sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox_inbox WHERE consumer_group = ?",
    )
    .bind(&w.group)
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 10);
}

#[tokio::test]
async fn a_retryable_handler_error_goes_back_through_the_outbox_and_the_partition_moves_on() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder {
        fail_once: Some(1),
        ..Recorder::default()
    });
    let (trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&w.pool, &recorder, ConsumerConfig::default().batch(1));
    let task = tokio::spawn(consumer.run(shutdown));
    w.consumed_all().await;
    let failed = w.status(ids[1]).await;
    assert_eq!(failed.status, Status::Pending);
    assert_eq!(
        failed.last_error.as_deref(),
        Some("the payment service answered 503")
    );
    assert_eq!(w.status(ids[2]).await.status, Status::Consumed);
    trigger.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(w.effects().await, vec![0, 2]);
}

#[tokio::test]
async fn no_offset_is_stored_past_a_message_left_unsettled() {
    let mut w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..10 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    // The consumer's own pool goes away after message 3: message 4 cannot be applied, and the
    // consumer is stopped while it retries.
    let path = w._dir.as_ref().unwrap().0.clone();
    let doomed = file_pool(&path).await;
    let recorder = Arc::new(Recorder {
        close_pool_after: Some((3, doomed.clone())),
        ..Recorder::default()
    });
    let (trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&doomed, &recorder, ConsumerConfig::default().batch(1));
    let task = tokio::spawn(consumer.run(shutdown));
    // Wait until message 3 is applied and the pool closed: message 4 is failing now.
    while !doomed.is_closed() || w.bus.committed(&w.group, &w.topic) != vec![4] {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    trigger.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(
        w.bus.committed(&w.group, &w.topic),
        vec![4],
        "committed up to the unsettled message, and not past it"
    );
    assert_eq!(w.effects().await, vec![0, 1, 2, 3]);

    // A new consumer (a restart) gets message 4 on and applies the rest, each once.
    w.consume_everything(&w.pool, &recorder, ConsumerConfig::default())
        .await;
    assert_eq!(w.effects().await, (0..10).collect::<Vec<i64>>());
    w._dir.take();
}

#[tokio::test]
async fn poison_is_dead_lettered_with_its_reason_and_the_partition_moves_on() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let good = w.enqueue("c1", 1, 0).await;
    w.relay_all().await;
    let raw = |value: &str| Outgoing {
        topic: w.topic.clone(),
        key: Some("c1".into()),
        value: value.as_bytes().to_vec(),
        headers: Vec::new(),
    };
    // Not an envelope; a version no one handles; a payload that does not decode.
    w.bus.send(&raw("not json")).await.unwrap();
    let v9 = r#"{"outbox_id":900,"event_id":"e-900","event_type":"order.placed","event_version":"9","service_name":"orders","payload":{"customer":"c1","n":9,"note":""}}"#;
    w.bus.send(&raw(v9)).await.unwrap();
    let bad = r#"{"outbox_id":901,"event_id":"e-901","event_type":"order.placed","event_version":"1","service_name":"orders","payload":{"customer":"c1","n":"nine"}}"#;
    w.bus.send(&raw(bad)).await.unwrap();
    let after = w.enqueue("c1", 2, 0).await;
    w.relay_all().await;

    let recorder = Arc::new(Recorder::default());
    w.consume_everything(&w.pool, &recorder, ConsumerConfig::default().dlq(true))
        .await;

    let reasons: Vec<String> = w
        .bus
        .messages(&format!("{}.dlq", w.topic))
        .iter()
        .map(|m| m.header("x-outbox-dead-reason").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        reasons,
        [
            "undecodable_envelope",
            "unsupported_version",
            "decode_error"
        ]
    );
    assert_eq!(w.status(good).await.status, Status::Consumed);
    assert_eq!(w.status(after).await.status, Status::Consumed);
    assert_eq!(w.effects().await, vec![1, 2]);
}

/// Five events of one key on one partition, relayed, and a recorder whose handler of the third
/// signals `entered` and waits for `gate`.
async fn held_batch() -> (World, Arc<Recorder>, Arc<Notify>, Arc<Notify>) {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..5 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let recorder = Arc::new(Recorder {
        hold: Some((2, entered.clone(), gate.clone())),
        ..Recorder::default()
    });
    (w, recorder, entered, gate)
}

/// Opens [`held_batch`]'s gate and waits until the batch in hand, its handler no longer held,
/// has committed its offsets (no consumer is left to do it otherwise); then checks that each of
/// its events was applied once.
async fn finished_held_batch(w: &World, recorder: &Recorder, gate: &Notify) {
    gate.notify_one();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let changed = w.bus.changed();
        if w.bus.committed(&w.group, &w.topic) == vec![5] {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "the batch in hand was not committed: offsets {:?}",
            w.bus.committed(&w.group, &w.topic)
        );
    }
    assert_eq!(w.effects().await, vec![0, 1, 2, 3, 4]);
    assert_eq!(recorder.calls(2), 1);
}

#[tokio::test]
async fn a_shutdown_in_the_middle_of_a_batch_finishes_it_and_commits_its_offsets() {
    let (w, recorder, entered, gate) = held_batch().await;
    let (trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&w.pool, &recorder, ConsumerConfig::default().workers(1));
    let task = tokio::spawn(consumer.run(shutdown));
    entered.notified().await;
    trigger.trigger();
    // Published after the shutdown: not this consumer's to take any more. (Straight onto the
    // bus: the batch's transaction holds SQLite's write lock.)
    for n in 5..8 {
        w.bus
            .send(&Outgoing {
                topic: w.topic.clone(),
                key: Some("c1".into()),
                value: format!("late {n}").into_bytes(),
                headers: Vec::new(),
            })
            .await
            .unwrap();
    }
    gate.notify_one();
    task.await.unwrap().unwrap();
    assert_eq!(w.effects().await, vec![0, 1, 2, 3, 4]);
    assert_eq!(w.bus.committed(&w.group, &w.topic), vec![5]);
    assert_eq!(w.bus.lag(&w.group, &w.topic), 3);
}

#[tokio::test]
async fn a_dropped_engine_lets_the_batch_in_hand_finish_and_commit() {
    let (w, recorder, entered, gate) = held_batch().await;
    let running = outbox_runtime::Engine::builder(w.pool.clone(), Arc::new(w.bus.clone()))
        .outbox(w.outbox.clone())
        .without_relay()
        .consumer_with::<OrderEvents, _>(recorder.clone(), ConsumerConfig::default().workers(1))
        .start()
        .await
        .unwrap();
    entered.notified().await;
    // Dropped in the middle of a batch (its transaction open, a handler running): the batch
    // is not cut off, it commits, and so do its offsets.
    drop(running);
    finished_held_batch(&w, &recorder, &gate).await;
}

/// Drops the `run` future `task` runs, as a `select!` drops one whose other branch won.
async fn drop_run_future(task: tokio::task::JoinHandle<Result<(), outbox_runtime::Error>>) {
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
}

#[tokio::test]
async fn a_dropped_consumer_future_lets_the_batch_in_hand_finish_and_commit() {
    let (w, recorder, entered, gate) = held_batch().await;
    // Never triggered: only the future's drop stops the consumer.
    let (_trigger, shutdown) = Shutdown::new();
    let consumer = w.consumer(&w.pool, &recorder, ConsumerConfig::default().workers(1));
    let task = tokio::spawn(consumer.run(shutdown));
    entered.notified().await;
    drop_run_future(task).await;
    finished_held_batch(&w, &recorder, &gate).await;
}

#[tokio::test]
async fn a_dropped_relay_future_lets_the_round_in_hand_finish_and_mark_its_rows() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    let bus = Arc::new(HeldSend {
        bus: w.bus.clone(),
        entered: Notify::new(),
        gate: Notify::new(),
        held: Default::default(),
    });
    let relay = Relay::new(
        w.outbox.clone(),
        w.pool.clone(),
        bus.clone(),
        RelayConfig::default(),
    );
    let (_trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(relay.run(shutdown));
    // Claimed and being sent: the future is dropped in the middle of its round.
    bus.entered.notified().await;
    drop_run_future(task).await;
    bus.gate.notify_one();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(w.status(*id).await.status);
        }
        if statuses.iter().all(|s| *s == Status::Published) {
            break;
        }
        // (The rows' status is in the database; nothing signals its change.)
        assert!(
            tokio::time::Instant::now() < deadline,
            "the round in hand did not mark its rows: {statuses:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(w.bus.messages(&w.topic).len(), 5, "each sent once");
}

#[tokio::test]
async fn the_relay_keeps_each_keys_order_on_its_partition() {
    let w = World::new(MemoryBus::new().with_partitions(4)).await;
    for n in 0..40 {
        w.enqueue(&format!("c{}", n % 5), n, 0).await;
    }
    w.relay_all().await;
    let messages = w.bus.messages(&w.topic);
    assert_eq!(messages.len(), 40);
    for m in &messages {
        let key = m.key.as_deref().unwrap();
        assert_eq!(m.partition, partition_for(key, 4));
        // Enqueued with no trace in scope, each still carries one (a trace of its own).
        let tp: outbox_runtime::trace::TraceParent =
            m.header("traceparent").unwrap().parse().unwrap();
        assert_eq!(tp.flags, 1);
    }
    for k in 0..5 {
        let key = format!("c{k}");
        let ns: Vec<u64> = messages
            .iter()
            .filter(|m| m.key_str().as_deref() == Some(key.as_str()))
            .map(|m| {
                let env = outbox_runtime::envelope::decode(m.payload.as_deref().unwrap()).unwrap();
                serde_json::from_slice::<OrderPlaced>(&env.payload)
                    .unwrap()
                    .n
            })
            .collect();
        let expected: Vec<u64> = (0..40).filter(|n| n % 5 == k).collect();
        assert_eq!(ns, expected, "order of {key}");
    }
}

#[tokio::test]
async fn a_service_gets_the_event_version_spelling_its_consumers_accept() {
    use outbox_runtime::envelope::VersionFormat;
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    w.enqueue("c1", 1, 0).await;
    let spelling = |config: RelayConfig| {
        assert_eq!(config.version_format_of("orders"), VersionFormat::Prefixed);
        assert_eq!(config.version_format_of("another"), VersionFormat::Number);
        Relay::new(
            w.outbox.clone(),
            w.pool.clone(),
            Arc::new(w.bus.clone()),
            config,
        )
    };
    let relay =
        spelling(RelayConfig::default().service_version_format("orders", VersionFormat::Prefixed));
    assert_eq!(relay.relay_once("orders").await.unwrap(), 1);
    let value: serde_json::Value =
        serde_json::from_slice(w.bus.messages(&w.topic)[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(value["event_version"], "v1");
}

#[tokio::test]
async fn a_failed_publish_holds_its_keys_later_rows_back_and_an_oversized_row_goes_dead() {
    let w = World::new(
        MemoryBus::new()
            .with_partitions(2)
            .with_max_message_bytes(2_000),
    )
    .await;
    // Key a: a row too large, then two more. Key b: three rows while the broker fails.
    let a_big = w.enqueue("a", 0, 5_000).await;
    let a1 = w.enqueue("a", 1, 0).await;
    let a2 = w.enqueue("a", 2, 0).await;
    let relay = w.relay();
    assert_eq!(relay.relay_once("orders").await.unwrap(), 3);
    let dead = w.status(a_big).await;
    assert_eq!(
        (dead.status, dead.dead_reason.as_deref()),
        (Status::Dead, Some("message_too_large"))
    );
    // Held back behind the refused row in that batch: given back uncounted, then published.
    assert_eq!(w.status(a1).await.attempts, 0);
    w.relay_all().await;
    assert_eq!(w.status(a1).await.status, Status::Published);
    assert_eq!(w.status(a2).await.status, Status::Published);

    w.bus.fail_publishes(&w.topic, "the broker is down");
    let b: Vec<i64> = [
        w.enqueue("b", 10, 0).await,
        w.enqueue("b", 11, 0).await,
        w.enqueue("b", 12, 0).await,
    ]
    .into();
    relay.relay_once("orders").await.unwrap();
    let first = w.status(b[0]).await;
    assert_eq!((first.status, first.attempts), (Status::Pending, 1));
    assert!(first.last_error.unwrap().contains("the broker is down"));
    for id in &b[1..] {
        let row = w.status(*id).await;
        assert_eq!(
            (row.status, row.attempts),
            (Status::Pending, 0),
            "released uncounted"
        );
    }
    // While the first waits for its retry, nothing of its key goes.
    assert_eq!(relay.relay_once("orders").await.unwrap(), 0);
    w.bus.heal(&w.topic);
    let mut conn = w.pool.acquire().await.unwrap();
    outbox_runtime::sqlx::query(
        "UPDATE orders_outbox SET next_attempt_at = 0 WHERE status = 'pending'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    w.relay_all().await;
    let ns: Vec<u64> = w
        .bus
        .messages(&w.topic)
        .iter()
        .filter(|m| m.key_str().as_deref() == Some("b"))
        .map(|m| {
            let env = outbox_runtime::envelope::decode(m.payload.as_deref().unwrap()).unwrap();
            serde_json::from_slice::<OrderPlaced>(&env.payload)
                .unwrap()
                .n
        })
        .collect();
    assert_eq!(ns, vec![10, 11, 12]);
}

#[tokio::test]
async fn consumers_of_one_group_share_the_partitions_and_apply_each_event_once() {
    let w = World::new(MemoryBus::new().with_partitions(4)).await;
    for n in 0..60 {
        w.enqueue(&format!("c{}", n % 7), n, 0).await;
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder::default());
    let (trigger, shutdown) = Shutdown::new();
    let a = tokio::spawn(
        w.consumer(&w.pool, &recorder, ConsumerConfig::default())
            .run(shutdown.clone()),
    );
    let b = tokio::spawn(
        w.consumer(&w.pool, &recorder, ConsumerConfig::default())
            .run(shutdown),
    );
    w.consumed_all().await;
    trigger.trigger();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(w.effects().await, (0..60).collect::<Vec<i64>>());
    // Another group reads everything again.
    let other = w
        .bus
        .receiver("another-group", std::slice::from_ref(&w.topic))
        .unwrap();
    let mut n = 0;
    while n < 60 {
        outbox_runtime::bus::Receive::recv(&other).await.unwrap();
        n += 1;
    }
}

/// The dead letters of the world's group in `db`, and their (reason, last error, attempts),
/// sorted.
async fn inbox_dead_letters(
    w: &World,
    db: &SqlitePool,
) -> (
    Vec<outbox_runtime::store::InboxDead>,
    Vec<(String, String, i32)>,
) {
    let mut conn = db.acquire().await.unwrap();
    let dead = w
        .outbox
        .list_inbox_dead(&mut conn, &w.group, "", 100)
        .await
        .unwrap();
    let mut reasons: Vec<(String, String, i32)> = dead
        .iter()
        .map(|d| (d.reason.clone(), d.last_error.clone(), d.attempts))
        .collect();
    reasons.sort();
    (dead, reasons)
}

/// A consumer with a database of its own (the inbox): the producer's rows are elsewhere.
async fn own_database(w: &World) -> (SqlitePool, TempFile) {
    let path = std::env::temp_dir().join(format!(
        "outbox-memory-bus-consumer-{}-{:08x}.db",
        std::process::id(),
        fastrand::u32(..)
    ));
    let pool = file_pool(&path).await;
    let mut conn = pool.acquire().await.unwrap();
    for sql in w.outbox.migration_sql() {
        if sql.contains("outbox_inbox") || sql.contains("outbox_calls") {
            outbox_runtime::sqlx::query(&sql)
                .execute(&mut *conn)
                .await
                .unwrap();
        }
    }
    outbox_runtime::sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    (pool, TempFile(path))
}

/// The number of dead letters of `w`'s group in `db` and the attempts of the retry kept for
/// `event_id` there (0 when none is kept), once they are `want`: what a consumer's retries do
/// happens in the background.
async fn kept_and_dead(w: &World, db: &SqlitePool, event_id: &str, want: (usize, i32)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut conn = db.acquire().await.unwrap();
        let dead = w
            .outbox
            .list_inbox_dead(&mut conn, &w.group, "", 100)
            .await
            .unwrap()
            .len();
        let kept = w
            .outbox
            .inbox_retry(&mut conn, &w.group, event_id)
            .await
            .unwrap()
            .map_or(0, |r| r.attempts);
        if (dead, kept) == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dead} dead letters and a retry with {kept} attempts, not {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_inbox_consumer_retries_up_to_its_attempts_and_keeps_dead_letters_in_its_own_database() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let (db, _file) = own_database(&w).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let v9 = r#"{"outbox_id":900,"event_id":"e-900","event_type":"order.placed","event_version":"9","service_name":"orders","payload":{"customer":"c1","n":9,"note":""}}"#;
    let raw = |value: &str| Outgoing {
        topic: w.topic.clone(),
        key: Some("c1".into()),
        value: value.as_bytes().to_vec(),
        headers: Vec::new(),
    };
    w.bus.send(&raw(v9)).await.unwrap();
    let recorder = Arc::new(Recorder {
        always_fail: vec![2],
        refuse: vec![4],
        ..Recorder::default()
    });
    let config = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .inbox_attempts(3)
        .dlq(true);
    // The consumer's store keeps its retries on a clock the test moves.
    let clock = ManualClock::at(1_000_000);
    let own = Outbox::<Sqlite>::builder(w.outbox.catalog().clone())
        .config(
            StoreConfig::default()
                .backoff_base(std::time::Duration::from_millis(100))
                .jitter(false),
        )
        .clock(clock.clone())
        .build();
    let consumer = Consumer::<Sqlite, OrderEvents, _, _>::new(
        own,
        db.clone(),
        Arc::new(SlowDeadLetters(w.bus.clone())),
        recorder.clone(),
        config.clone(),
    )
    .unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(consumer.run(shutdown));
    // The partition moved on: every offset is committed while 2 is kept for its retry.
    w.consumed_all().await;
    let event_2 = w.status(ids[2]).await.event_id;
    kept_and_dead(&w, &db, &event_2, (2, 1)).await;
    assert_eq!(recorder.calls(2), 1);
    let effects = || async {
        outbox_runtime::sqlx::query_scalar::<_, i64>("SELECT n FROM effects ORDER BY n")
            .fetch_all(&db)
            .await
            .unwrap()
    };
    assert_eq!(effects().await, vec![0, 1, 3, 5]);
    // Due after its backoff: 100 ms, then 200 ms.
    clock.advance(std::time::Duration::from_millis(100));
    kept_and_dead(&w, &db, &event_2, (2, 2)).await;
    clock.advance(std::time::Duration::from_millis(200));
    kept_and_dead(&w, &db, &event_2, (3, 0)).await;
    assert_eq!(recorder.calls(2), 3, "its 3 attempts, then dead");
    assert_eq!(effects().await, vec![0, 1, 3, 5]);
    let (dead, reasons) = inbox_dead_letters(&w, &db).await;
    assert_eq!(
        reasons,
        [
            (
                "handler_rejected".to_owned(),
                "no such customer".to_owned(),
                1
            ),
            (
                "max_attempts".to_owned(),
                "the payment service answered 503".to_owned(),
                3
            ),
            (
                "unsupported_version".to_owned(),
                "unsupported version 9 of `order.placed`: service `orders` accepts version 1"
                    .to_owned(),
                1
            ),
        ]
    );
    let stored = dead.iter().find(|d| d.event_id == "e-900").unwrap();
    assert_eq!(stored.envelope, v9, "the whole envelope, as it arrived");
    assert_eq!(
        (stored.topic.as_str(), stored.message_key.as_deref()),
        (w.topic.as_str(), Some("c1"))
    );
    // Their messages went to the dead-letter topic too, with the reason.
    // (Once its kept retry is gone, the last one's message is there, however slow the bus.)
    let reasons: std::collections::BTreeSet<_> = w
        .bus
        .messages(&format!("{}.dlq", w.topic))
        .iter()
        .map(|m| m.header("x-outbox-dead-reason").unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons,
        ["handler_rejected", "max_attempts", "unsupported_version"]
            .map(str::to_owned)
            .into()
    );
    assert_eq!(w.bus.messages(&format!("{}.dlq", w.topic)).len(), 3);
    // The producer's rows are another database's: published, left alone.
    for id in &ids {
        assert_eq!(w.status(*id).await.status, Status::Published);
    }

    // A redelivery of a dead-lettered event is skipped, not applied nor dead-lettered again.
    w.bus.send(&raw(v9)).await.unwrap();
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(w.bus.messages(&format!("{}.dlq", w.topic)).len(), 3);

    // Replay: take the dead letter back and publish its stored envelope; it is applied once.
    let mut conn = db.acquire().await.unwrap();
    let taken = w
        .outbox
        .take_inbox_dead(&mut conn, &w.group, &event_2)
        .await
        .unwrap()
        .unwrap();
    assert!(
        w.outbox
            .take_inbox_dead(&mut conn, &w.group, &event_2)
            .await
            .unwrap()
            .is_none()
    );
    drop(conn);
    w.bus.send(&raw(&taken.envelope)).await.unwrap();
    let healthy = Arc::new(Recorder::default());
    w.consume_everything(&db, &healthy, config).await;
    let effects: Vec<i64> = outbox_runtime::sqlx::query_scalar("SELECT n FROM effects ORDER BY n")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(effects, vec![0, 1, 2, 3, 5]);
    let mut conn = db.acquire().await.unwrap();
    assert_eq!(
        w.outbox
            .list_inbox_dead(&mut conn, &w.group, "", 100)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        w.outbox
            .discard_inbox_dead(&mut conn, &w.group, "e-900")
            .await
            .unwrap()
    );
    assert_eq!(
        w.outbox
            .list_inbox_dead(&mut conn, &w.group, "", 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A remote service, as a handler that runs outside any transaction calls it: every call is
/// recorded with its idempotency key and attempt; an effect row is written, through the pool
/// and outside any transaction, for each call that succeeds.
#[derive(Default)]
struct Remote {
    calls: Mutex<Vec<(u64, String, u32)>>,
    /// `n` whose first attempts (this many) fail with a retryable error.
    fail_first: HashMap<u64, u32>,
    /// `n` the service refuses for good.
    refuse: Vec<u64>,
    /// `n` whose first attempt never answers.
    stall_first: Vec<u64>,
    /// Where the effects go.
    pool: Option<SqlitePool>,
}

impl Remote {
    fn calls_of(&self, n: u64) -> Vec<(String, u32)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.0 == n)
            .map(|c| (c.1.clone(), c.2))
            .collect()
    }
}

impl OrderEventsHandler<Call> for Arc<Remote> {
    async fn order_placed(&self, call: &mut Call, e: OrderPlaced) -> Result<(), HandlerError> {
        let attempt = call.attempt();
        self.calls
            .lock()
            .unwrap()
            .push((e.n, call.idempotency_key().to_owned(), attempt));
        if self.refuse.contains(&e.n) {
            return Err(HandlerError::permanent("the service refused it: 422"));
        }
        if self.fail_first.get(&e.n).is_some_and(|k| attempt <= *k) {
            return Err(HandlerError::retry("the service answered 503"));
        }
        if attempt == 1 && self.stall_first.contains(&e.n) {
            std::future::pending::<()>().await;
        }
        if let Some(pool) = &self.pool {
            outbox_runtime::sqlx::query("INSERT INTO effects (n) VALUES (?)")
                .bind(e.n as i64)
                .execute(pool)
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
        }
        Ok(())
    }
}

fn call_consumer(
    w: &World,
    pool: &SqlitePool,
    remote: &Arc<Remote>,
    config: ConsumerConfig,
) -> Consumer<Sqlite, OrderEvents, Arc<Remote>, MemoryBus> {
    Consumer::calling(
        w.outbox.clone(),
        pool.clone(),
        Arc::new(w.bus.clone()),
        remote.clone(),
        config,
    )
    .unwrap()
}

async fn open_calls(pool: &SqlitePool) -> i64 {
    outbox_runtime::sqlx::query_scalar("SELECT COUNT(*) FROM outbox_calls")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn effects_in(pool: &SqlitePool) -> Vec<i64> {
    outbox_runtime::sqlx::query_scalar("SELECT n FROM effects ORDER BY n")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_harness_waits_for_the_retries_an_inbox_consumer_keeps() {
    let builder = outbox_runtime::testing::Harness::builder();
    let pool = builder.pool().clone();
    outbox_runtime::sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let recorder = Arc::new(Recorder {
        fail_once: Some(1),
        always_fail: vec![2],
        ..Recorder::default()
    });
    let config = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .inbox_attempts(3)
        .dlq(true);
    let mut h = builder
        .consumer_with::<OrderEvents, _>(recorder.clone(), config)
        .start()
        .await
        .unwrap();
    for n in 0..3 {
        let e = OrderPlaced {
            customer: "c1".to_owned(),
            n,
            note: String::new(),
        };
        h.enqueue(&e).await.unwrap();
    }
    // Every offset is committed while 1 and 2 are kept for their retries; idle only once 1 is
    // applied and 2 is dead, with its message on the dead-letter topic.
    h.run_until_idle().await.unwrap();
    assert_eq!(effects_in(&pool).await, vec![0, 1]);
    assert_eq!(recorder.calls(1), 2);
    assert_eq!(recorder.calls(2), 3);
    let dead = h.dead_letters("orders").await;
    assert_eq!(
        dead.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(),
        ["max_attempts"]
    );
}

#[tokio::test]
async fn a_call_handler_runs_outside_any_transaction_with_the_event_id_as_its_key() {
    // The harness's database has one connection: a handler that needed it while the consumer
    // held a transaction would wait for ever. This one writes its effect through it.
    let builder = outbox_runtime::testing::Harness::builder();
    let pool = builder.pool().clone();
    outbox_runtime::sqlx::query("CREATE TABLE effects (n INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let remote = Arc::new(Remote {
        fail_first: HashMap::from([(1, 1)]),
        refuse: vec![3],
        pool: Some(pool.clone()),
        ..Remote::default()
    });
    let mut h = builder
        .call_consumer::<OrderEvents, _>(remote.clone())
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        let e = OrderPlaced {
            customer: format!("c{n}"),
            n,
            note: String::new(),
        };
        ids.push(h.enqueue(&e).await.unwrap().event_id);
    }
    h.run_until_idle().await.unwrap();

    assert_eq!(effects_in(&pool).await, vec![0, 1, 2, 4]);
    // Every call carries its event's id, the same on the retry of event 1.
    for n in [0, 2, 4] {
        assert_eq!(remote.calls_of(n), vec![(ids[n as usize].clone(), 1)]);
    }
    let retried = remote.calls_of(1);
    assert_eq!(retried.len(), 2);
    assert!(retried.iter().all(|(key, _)| *key == ids[1]));
    // A shared database: the failure went back through the outbox, and the republished
    // message's call is the event's second attempt.
    assert_eq!(retried[1].1, 2);
    let mut applied: Vec<String> = h
        .applied("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    applied.sort();
    let mut expected = vec![
        ids[0].clone(),
        ids[1].clone(),
        ids[2].clone(),
        ids[4].clone(),
    ];
    expected.sort();
    assert_eq!(applied, expected);
    let dead = h.dead("orders").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, ids[3]);
    assert_eq!(dead[0].reason, "handler_rejected");
    assert_eq!(open_calls(&pool).await, 0, "no call is left open");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_call_in_its_own_database_is_tried_up_to_its_attempts_then_dead() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let (db, _file) = own_database(&w).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(w.enqueue("c1", n, 0).await);
    }
    w.relay_all().await;
    let v9 = r#"{"outbox_id":900,"event_id":"e-900","event_type":"order.placed","event_version":"9","service_name":"orders","payload":{"customer":"c1","n":9,"note":""}}"#;
    w.bus
        .send(&Outgoing {
            topic: w.topic.clone(),
            key: Some("c1".into()),
            value: v9.as_bytes().to_vec(),
            headers: Vec::new(),
        })
        .await
        .unwrap();
    let remote = Arc::new(Remote {
        fail_first: HashMap::from([(1, 2), (2, u32::MAX)]),
        refuse: vec![4],
        pool: Some(db.clone()),
        ..Remote::default()
    });
    let config = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .inbox_attempts(3);
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(call_consumer(&w, &db, &remote, config).run(shutdown));
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();

    assert_eq!(effects_in(&db).await, vec![0, 1, 3, 5]);
    let attempts = |n: u64| -> Vec<u32> { remote.calls_of(n).into_iter().map(|c| c.1).collect() };
    assert_eq!(
        attempts(1),
        vec![1, 2, 3],
        "two failures, then it went through"
    );
    assert_eq!(attempts(2), vec![1, 2, 3], "its 3 attempts, then dead");
    assert_eq!(attempts(4), vec![1], "refused: dead at once");
    assert!(remote.calls_of(9).is_empty(), "poison is never called");
    let (_, reasons) = inbox_dead_letters(&w, &db).await;
    assert_eq!(
        reasons,
        [
            (
                "handler_rejected".to_owned(),
                "the service refused it: 422".to_owned(),
                1
            ),
            (
                "max_attempts".to_owned(),
                "the service answered 503".to_owned(),
                3
            ),
            (
                "unsupported_version".to_owned(),
                "unsupported version 9 of `order.placed`: service `orders` accepts version 1"
                    .to_owned(),
                1
            ),
        ]
    );
    assert_eq!(open_calls(&db).await, 0, "no call is left open");
    // The producer's rows are another database's: published, left alone.
    for id in &ids {
        assert_eq!(w.status(*id).await.status, Status::Published);
    }
}

/// Leaves the call of `event_id` open in `db` as a consumer that died in it would: held by
/// `owner` until `until`, after `attempts` claims.
async fn open_call(db: &SqlitePool, group: &str, event_id: &str, until: i64, attempts: i64) {
    outbox_runtime::sqlx::query(
        "INSERT INTO outbox_calls (consumer_group, event_id, lease_owner, lease_until, attempts) \
         VALUES (?, ?, 'consumer-that-died', ?, ?)",
    )
    .bind(group)
    .bind(event_id)
    .bind(until)
    .bind(attempts)
    .execute(db)
    .await
    .unwrap();
    outbox_runtime::sqlx::query(
        "INSERT INTO outbox_inbox (consumer_group, event_id, consumed_at) VALUES (?, ?, 0)",
    )
    .bind(group)
    .bind(event_id)
    .execute(db)
    .await
    .unwrap();
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_call_left_open_by_a_dead_consumer_is_called_again_once_its_lease_has_run_out() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let (db, _file) = own_database(&w).await;
    let (a, b) = (w.enqueue("c1", 0, 0).await, w.enqueue("c1", 1, 0).await);
    w.relay_all().await;
    let (a, b) = (w.status(a).await.event_id, w.status(b).await.event_id);
    // Event 0: a consumer claimed its call and died in it; its lease runs a while longer.
    let until = now_ms() + 700;
    open_call(&db, &w.group, &a, until, 1).await;
    // Event 1: claimed 3 times already, and every time the process died.
    open_call(&db, &w.group, &b, now_ms() - 1, 3).await;

    let called_at = Arc::new(Mutex::new(None));
    struct Timed(Arc<Remote>, Arc<Mutex<Option<i64>>>);
    impl OrderEventsHandler<Call> for Timed {
        async fn order_placed(&self, call: &mut Call, e: OrderPlaced) -> Result<(), HandlerError> {
            self.1.lock().unwrap().get_or_insert(now_ms());
            self.0.order_placed(call, e).await
        }
    }
    let remote = Arc::new(Remote {
        pool: Some(db.clone()),
        ..Remote::default()
    });
    let config = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .inbox_attempts(3);
    let consumer = Consumer::<Sqlite, OrderEvents, _, _>::calling(
        w.outbox.clone(),
        db.clone(),
        Arc::new(w.bus.clone()),
        Timed(remote.clone(), called_at.clone()),
        config,
    )
    .unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(consumer.run(shutdown));
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();

    // Called again, once, as its second attempt, and not before the dead consumer's lease
    // ended.
    assert_eq!(remote.calls_of(0), vec![(a.clone(), 2)]);
    assert!(called_at.lock().unwrap().unwrap() >= until);
    assert_eq!(effects_in(&db).await, vec![0]);
    // Event 1 is not called a fourth time: dead, with why.
    assert!(remote.calls_of(1).is_empty());
    let mut conn = db.acquire().await.unwrap();
    let dead = w
        .outbox
        .inbox_dead(&mut conn, &w.group, &b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.reason, "max_attempts");
    assert_eq!(dead.attempts, 3);
    assert!(
        dead.last_error
            .contains("3 calls were claimed and none returned"),
        "{}",
        dead.last_error
    );
    drop(conn);
    assert_eq!(open_calls(&db).await, 0);
}

#[tokio::test]
async fn a_call_that_runs_past_its_lease_is_cancelled_and_called_again() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    let (db, _file) = own_database(&w).await;
    for n in 0..3 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let remote = Arc::new(Remote {
        stall_first: vec![1],
        pool: Some(db.clone()),
        ..Remote::default()
    });
    let config = ConsumerConfig::default()
        .dedupe(Dedupe::Inbox)
        .call_lease(std::time::Duration::from_millis(300));
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(call_consumer(&w, &db, &remote, config).run(shutdown));
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();

    let attempts = |n: u64| -> Vec<u32> { remote.calls_of(n).into_iter().map(|c| c.1).collect() };
    assert_eq!(attempts(1), vec![1, 2]);
    assert_eq!(attempts(0), vec![1]);
    assert_eq!(attempts(2), vec![1]);
    // In order, each once.
    let order: Vec<u64> = remote.calls.lock().unwrap().iter().map(|c| c.0).collect();
    assert_eq!(order, vec![0, 1, 1, 2]);
    assert_eq!(effects_in(&db).await, vec![0, 1, 2]);
}

const T: i64 = 1_800_000_000_000;

/// A clock that says `T` until it is read after being armed: that read still says `T` and
/// signals the relay's wake-up, as an enqueue in this process would at that moment; every later
/// read says `T + 20 s`.
#[derive(Debug, Default)]
struct WakeOnRead {
    armed: std::sync::atomic::AtomicBool,
    read: std::sync::atomic::AtomicBool,
    wake: std::sync::OnceLock<Arc<Notify>>,
}

#[derive(Debug, Clone, Default)]
struct SharedClock(Arc<WakeOnRead>);

impl outbox_runtime::store::Clock for SharedClock {
    fn now_ms(&self) -> i64 {
        use std::sync::atomic::Ordering::SeqCst;
        let c = &self.0;
        if !c.armed.load(SeqCst) {
            return T;
        }
        if c.read.swap(true, SeqCst) {
            return T + 20_000;
        }
        if let Some(wake) = c.wake.get() {
            wake.notify_waiters();
        }
        T
    }
}

// The lost wake-up: an enqueue's signal that comes while the relay's round is looking at the
// table (here: at the moment its claim reads the clock) must wake the wait that follows, or
// the relay sleeps its whole poll interval (here an hour) with a due row.
#[tokio::test]
async fn an_enqueue_signalled_during_a_relay_round_wakes_the_wait_after_it() {
    let w = World::new(MemoryBus::new()).await;
    let clock = SharedClock::default();
    let outbox = Outbox::<Sqlite>::builder(w.outbox.catalog().clone())
        .clock(clock.clone())
        .build();
    clock.0.wake.set(outbox.wakeups()).unwrap();
    let mut tx = w.pool.begin().await.unwrap();
    let e = OrderPlaced {
        customer: "c1".into(),
        n: 1,
        note: String::new(),
    };
    let id = outbox.enqueue(&mut *tx, &e).await.unwrap().id;
    tx.commit().await.unwrap();
    // Not due when the round looks (T), due once it has looked (T + 20 s).
    let table = &w.outbox.catalog().service("orders").unwrap().table;
    outbox_runtime::sqlx::query(&format!(
        "UPDATE {table} SET next_attempt_at = ? WHERE id = ?"
    ))
    .bind(T + 10_000)
    .bind(id)
    .execute(&w.pool)
    .await
    .unwrap();
    clock
        .0
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let relay = Relay::new(
        outbox,
        w.pool.clone(),
        Arc::new(w.bus.clone()),
        RelayConfig::default().poll_interval(std::time::Duration::from_secs(3600)),
    );
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(relay.run(shutdown));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let changed = w.bus.changed();
        if w.bus.messages(&w.topic).len() == 1 {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "the relay slept through a wake-up signalled during its round"
        );
    }
    assert!(clock.0.read.load(std::sync::atomic::Ordering::SeqCst));
    trigger.trigger();
    task.await.unwrap().unwrap();
}

/// Waits until `group` has rejoined `n` times, at most 10 s.
async fn rejoined(bus: &MemoryBus, group: &str, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let changed = bus.changed();
        let done = bus.rejoins(group);
        if done >= n {
            return done;
        }
        assert!(
            tokio::time::timeout_at(deadline, changed).await.is_ok(),
            "{done} rejoins of {n} in 10 s"
        );
    }
}

// A partition with messages whose group offset does not move (here: a member that joined and
// never reads, as a member whose session a coordinator kept) makes the consumer leave its group
// and join again; once that member is gone, the consumer reads its partitions too.
#[tokio::test]
async fn a_consumer_rejoins_its_group_when_a_partition_with_messages_is_read_by_nobody() {
    let w = World::new(MemoryBus::new().with_partitions(4)).await;
    let zombie = w
        .bus
        .receiver(&w.group, std::slice::from_ref(&w.topic))
        .unwrap();
    for n in 0..12 {
        w.enqueue(&format!("c{n}"), n, 0).await;
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder::default());
    let config = ConsumerConfig::default().rejoin_after(std::time::Duration::from_secs(1));
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(w.consumer(&w.pool, &recorder, config).run(shutdown));
    assert!(rejoined(&w.bus, &w.group, 1).await >= 1);
    assert!(
        w.bus.lag(&w.group, &w.topic) > 0,
        "the other member's partitions wait"
    );
    drop(zombie);
    w.consumed_all().await;
    trigger.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(w.effects().await, (0..12).collect::<Vec<i64>>());
}

// A message of the service whose event has no row in its table (a Go relay's, a row deleted)
// is never skipped silently: dead-lettered in the consumer's database with a reason, counted,
// sent to the dead-letter topic, and the rest of its batch is applied.
#[tokio::test]
async fn a_message_whose_event_has_no_row_is_dead_lettered_not_skipped() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    for n in 0..3 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let foreign = r#"{"outbox_id":42,"event_id":"42","event_type":"order.placed","event_version":"1","service_name":"orders","payload":{"customer":"c1","n":42,"note":""}}"#;
    w.bus
        .send(&Outgoing {
            topic: w.topic.clone(),
            key: Some("c1".into()),
            value: foreign.as_bytes().to_vec(),
            headers: Vec::new(),
        })
        .await
        .unwrap();
    for n in 3..5 {
        w.enqueue("c1", n, 0).await;
    }
    w.relay_all().await;
    let recorder = Arc::new(Recorder::default());
    w.consume_everything(&w.pool, &recorder, ConsumerConfig::default().dlq(true))
        .await;
    assert_eq!(w.effects().await, vec![0, 1, 2, 3, 4]);
    assert_eq!(recorder.calls(42), 0);
    let mut conn = w.pool.acquire().await.unwrap();
    let dead = w
        .outbox
        .inbox_dead(
            &mut conn,
            &w.group,
            &GoRoute::event_id("orders_outbox_messages", 42, None),
        )
        .await
        .unwrap()
        .expect("a dead letter, under an id that Go rows of other tables do not share");
    assert_eq!(dead.reason, "no_outbox_row");
    assert_eq!(dead.envelope, foreign);
    assert!(
        dead.last_error.contains(
            "the Go relay published it (outbox_id 42): declare service `orders`'s Go route"
        ),
        "{}",
        dead.last_error
    );
    drop(conn);
    let dlq = w.bus.messages(&format!("{}.dlq", w.topic));
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("x-outbox-dead-reason"), Some("no_outbox_row"));
}

/// A memory bus whose dead-letter topics answer slowly, as a remote broker may: what waits
/// for a dead letter's database record must not take its message for sent.
struct SlowDeadLetters(MemoryBus);

impl Publish for SlowDeadLetters {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        if records.iter().any(|r| r.topic.ends_with(".dlq")) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.0.send_all(records).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.0.ensure_topics(topics).await
    }
}

impl Bus for SlowDeadLetters {
    type Receiver = <MemoryBus as Bus>::Receiver;

    fn receiver(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Self::Receiver, outbox_runtime::Error> {
        self.0.receiver(group, topics)
    }
}

/// A memory bus whose first send signals `entered` and waits for `gate`.
struct HeldSend {
    bus: MemoryBus,
    entered: Notify,
    gate: Notify,
    held: std::sync::atomic::AtomicBool,
}

impl Publish for HeldSend {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        if !self.held.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        self.bus.send_all(records).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.bus.ensure_topics(topics).await
    }
}

/// A bus that publishes (to a memory bus) but cannot make a group member: every consumer fails
/// as it starts.
struct NoMembers(MemoryBus);

impl Publish for NoMembers {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        self.0.send_all(records).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.0.ensure_topics(topics).await
    }
}

impl Bus for NoMembers {
    type Receiver = <MemoryBus as Bus>::Receiver;

    fn receiver(&self, group: &str, _: &[String]) -> Result<Self::Receiver, outbox_runtime::Error> {
        Err(outbox_runtime::Error::Bus(format!(
            "no member of `{group}` can be made"
        )))
    }
}

#[tokio::test]
async fn a_task_that_fails_reaches_the_caller_through_running_and_run() {
    let w = World::new(MemoryBus::new()).await;
    let engine = || {
        outbox_runtime::Engine::builder(w.pool.clone(), Arc::new(NoMembers(w.bus.clone())))
            .outbox(w.outbox.clone())
            .consumer::<OrderEvents, _>(Arc::new(Recorder::default()))
    };
    // The relay goes on; the consumer's failure is what `wait` resolves with.
    let mut running = engine().start().await.unwrap();
    let failed = running.wait().await.unwrap_err().to_string();
    assert!(
        failed.contains(&format!("no member of `{}` can be made", w.group)),
        "{failed}"
    );
    // The failure was taken by `wait`; the relay stops cleanly.
    running.shutdown().await.unwrap();
    // `run` ends at the first failure with it, without waiting for its signal.
    let failed = engine()
        .run(std::future::pending::<()>())
        .await
        .unwrap_err()
        .to_string();
    assert!(failed.contains("no member"), "{failed}");
}

// A consumer refuses a group that has a member of another system (a Go consumer of the same
// group name): it would take part of that member's partitions. Told to, it joins and consumes.
// (Against Kafka the members come from the group's description; tansu 0.6 lists no groups, so
// this is where the refusal is tested.)
#[tokio::test]
async fn a_consumer_refuses_a_group_with_a_member_of_another_system() {
    let w = World::new(MemoryBus::new().with_partitions(1)).await;
    w.enqueue("c1", 1, 0).await;
    w.relay_all().await;
    w.bus.join_foreign(&w.group, "kafka-go@10.0.0.7");
    let recorder = Arc::new(Recorder::default());
    let (_trigger, shutdown) = Shutdown::new();
    let refused = w
        .consumer(&w.pool, &recorder, ConsumerConfig::default())
        .run(shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!(
            "consumer group `{}` has members that are not outbox consumers (kafka-go@10.0.0.7)",
            w.group
        )),
        "{refused}"
    );
    assert_eq!(recorder.calls(1), 0);
    let allowed = ConsumerConfig::default().allow_foreign_members(true);
    w.consume_everything(&w.pool, &recorder, allowed).await;
    assert_eq!(w.effects().await, vec![1]);
}

/// A message as it was received, to send again: with the relay's headers, so that the consumer
/// sees the messages its relay wrote.
fn outgoing_of(topic: &str, m: &outbox_runtime::bus::Received) -> Outgoing {
    Outgoing {
        topic: topic.to_owned(),
        key: m.key.clone().map(|k| String::from_utf8(k).unwrap()),
        value: m.payload.clone().unwrap(),
        headers: [
            "traceparent",
            "ce_specversion",
            "ce_id",
            "ce_type",
            "ce_source",
            "ce_time",
        ]
        .into_iter()
        .filter_map(|h| Some((h, m.header(h)?.to_owned())))
        .collect(),
    }
}
