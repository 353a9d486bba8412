//! Services relayed from PostgreSQL's write-ahead log (`OutboxBuilder::wal`): the writer's
//! transaction emits each event into the log, a relay reads the service's replication slot,
//! and consumers, in a database of their own, apply through the inbox. PostgreSQL producers
//! (the test server runs with `wal_level = logical`, which `./scripts/test` sets) and tansu.

use outbox_runtime::Outbox;
use outbox_runtime::relay::WalRead;
use outbox_runtime::sqlx::Postgres;
use outbox_runtime::store::{Backend, WalLag};

use super::*;

/// A world whose `service` is relayed from the write-ahead log, its slot made by migrate.
async fn wal_world(service: &str) -> World<Postgres> {
    let mut w = World::<Postgres>::new().await;
    let outbox = Outbox::builder(w.h.outbox.catalog().clone())
        .config(
            StoreConfig::default()
                .backoff_base(Duration::from_millis(100))
                .jitter(false),
        )
        .wal(service)
        .unwrap()
        .build();
    {
        let _turn = harness::MIGRATIONS.lock().await;
        let mut conn = w.h.pool.acquire().await.unwrap();
        outbox.migrate(&mut *conn).await.unwrap();
    }
    w.h.outbox = outbox;
    w
}

/// Drops the world's slots (a slot left behind would keep the server's WAL) and tables.
async fn wal_cleanup(w: World<Postgres>) {
    let mut conn = w.h.pool.acquire().await.unwrap();
    let slots: Vec<String> =
        w.h.outbox
            .wal_services()
            .map(|s| w.h.outbox.wal_slot(s).unwrap())
            .collect();
    for slot in slots {
        drop_slot(&mut conn, slot).await;
    }
    drop(conn);
    w.cleanup().await;
}

async fn drop_slot(conn: &mut outbox_runtime::sqlx::PgConnection, slot: String) {
    let sql = "SELECT pg_drop_replication_slot($1)::TEXT";
    Postgres::execute(conn, sql, vec![Arg::Str(slot)])
        .await
        .unwrap();
}

async fn lag(w: &World<Postgres>, service: &str) -> WalLag {
    let mut conn = w.h.pool.acquire().await.unwrap();
    w.h.outbox.wal_lag(&mut conn, service).await.unwrap()
}

/// Rows in `service`'s table: a WAL service writes none but its dead letters.
async fn table_rows(w: &World<Postgres>, service: &str) -> i64 {
    w.h.rows(service).await
}

// Events of single and multi-event transactions reach a consumer in a database of its own
// (MariaDB) once each, a rolled-back transaction's event never; the producer's table stays
// empty (no row, no status write); the slot's lag is back to nothing once it drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_events_reach_an_inbox_consumer_in_its_own_database_once() {
    use outbox_runtime::sqlx::MySql;
    let w = wal_world("notification").await;
    // A handler that fails twice there: kept in the consumer's database and retried.
    let own = OwnDatabase::<MySql>::open(&w, "w").await;
    let (pool, outbox, effects, recorder) = (own.pool, own.outbox, own.effects, own.recorder);
    let producer = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(w.h.outbox.clone())
        .relay(relay())
        .start()
        .await
        .unwrap();
    let consumer = Engine::builder(pool.clone(), KafkaConfig::new(brokers()))
        .outbox(outbox.clone())
        .without_relay()
        .consumer_with::<NotificationEvents, _>(
            recorder,
            ConsumerConfig::default()
                .dedupe(outbox_runtime::Dedupe::Inbox)
                .inbox_attempts(5),
        )
        .start()
        .await
        .unwrap();
    assert!(consumer.ready(Duration::from_secs(60)).await);

    let mut events = w.enqueue_feishu(0..20).await;
    // Three events in one transaction with a business row.
    let mut tx = w.h.pool.begin().await.unwrap();
    w.h.write_business(&mut tx, 1, "three events").await;
    let batch: Vec<_> = (20..23).map(samples::feishu).collect();
    events.extend(w.h.outbox.enqueue_all(&mut *tx, &batch).await.unwrap());
    tx.commit().await.unwrap();
    // A rolled-back transaction: its event was never written.
    let mut tx = w.h.pool.begin().await.unwrap();
    let gone =
        w.h.outbox
            .enqueue(&mut *tx, &samples::feishu(99))
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        events.iter().all(|e| e.id == 0),
        "no row id: there is no row"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut conn = pool.acquire().await.unwrap();
        let applied = MySql::fetch_ints(
            &mut conn,
            &format!("SELECT COUNT(DISTINCT event_id) FROM {effects}"),
            Vec::new(),
        )
        .await
        .unwrap()[0]
            .unwrap();
        if applied >= 23 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of 23 events applied in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Drained: the relay advanced the slot past every event.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = lag(&w, "notification").await;
        assert!(
            lag.relay_active,
            "the running relay holds the slot: {lag:?}"
        );
        if lag.age_ms == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot did not drain: {lag:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();

    let mut conn = pool.acquire().await.unwrap();
    let applied: Vec<String> =
        outbox_runtime::sqlx::query_scalar(&format!("SELECT event_id FROM {effects}"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let mut want: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    let mut got = applied.clone();
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "each committed event once, the rolled-back one never"
    );
    assert!(!applied.contains(&gone.event_id));
    MySql::execute(&mut conn, &format!("DROP TABLE {effects}"), Vec::new())
        .await
        .unwrap();
    drop(conn);
    pool.close().await;
    assert_eq!(
        table_rows(&w, "notification").await,
        0,
        "no row was written"
    );
    assert_eq!(w.h.business_rows().await, 1);
    wal_cleanup(w).await;
}

// `begin_with` on a WAL service sends the events with the `BEGIN`, in one message: they are
// decoded with the transaction's commit, whole and in commit order (a payload full of quotes,
// backslashes and placeholders included), and a rolled-back transaction's never. An emit the
// server refuses fails the begin with the server's reason, emits nothing and leaves the
// connection idle, not in an aborted transaction; in a transaction, the events go into a
// savepoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_a_transaction_begun_with_its_events_brings_them_to_the_slot_with_its_commit() {
    use outbox_runtime::OutboxEvent as _;
    use outbox_runtime::sqlx::Connection as _;
    use outbox_runtime::store::WalItem;
    let w = wal_world("notification").await;
    let mut conn = w.h.pool.acquire().await.unwrap();
    let mut quoted = samples::feishu(1);
    quoted.summary_text = Some(r#"it's \'; ROLLBACK; -- \\ $1 $2 $$ E'\x' "日本" ü"#.into());
    let second = samples::feishu(2);

    let (mut tx, stored) =
        w.h.outbox
            .begin_with(&mut *conn, [&quoted, &second])
            .await
            .unwrap();
    w.h.write_business(&mut tx, 1, "two events").await;
    tx.commit().await.unwrap();

    let (mut tx, gone) =
        w.h.outbox
            .begin_with(&mut *conn, [&samples::feishu(3)])
            .await
            .unwrap();
    w.h.write_business(&mut tx, 2, "rolled back").await;
    tx.rollback().await.unwrap();

    // A server that refuses the emit: a function of its name earlier in the search path.
    let schema = format!("{}_refuse", w.h.table("notification"));
    let mut other = w.h.pool.acquire().await.unwrap();
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!(
            "CREATE FUNCTION {schema}.pg_logical_emit_message(boolean, text, text) \
             RETURNS pg_lsn LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'emit refused here'; END $$"
        ),
        format!("SET search_path = {schema}, pg_catalog, public"),
    ] {
        Postgres::execute(&mut other, &sql, Vec::new())
            .await
            .unwrap();
    }
    let refused =
        w.h.outbox
            .begin_with(&mut *other, [&samples::feishu(4)])
            .await
            .unwrap_err();
    assert!(
        refused.to_string().contains("emit refused here"),
        "{refused}"
    );
    assert!(!other.is_in_transaction());
    let idle = Postgres::fetch_ints(&mut other, "SELECT 1::BIGINT", Vec::new()).await;
    assert_eq!(
        idle.unwrap(),
        vec![Some(1)],
        "the connection is idle, not in an aborted transaction"
    );
    for sql in [
        "RESET search_path".to_owned(),
        format!("DROP SCHEMA {schema} CASCADE"),
    ] {
        Postgres::execute(&mut other, &sql, Vec::new())
            .await
            .unwrap();
    }
    drop(other);

    let mut outer = conn.begin().await.unwrap();
    let (inner, nested) =
        w.h.outbox
            .begin_with(&mut *outer, [&samples::feishu(5)])
            .await
            .unwrap();
    inner.commit().await.unwrap();
    outer.commit().await.unwrap();

    let read =
        w.h.outbox
            .wal_peek(&mut conn, "notification", 10_000)
            .await
            .unwrap();
    let rows: Vec<_> = read
        .items
        .into_iter()
        .map(|(item, _)| match item {
            WalItem::Event(row) => *row,
            other => panic!("not an event: {other:?}"),
        })
        .collect();
    let got: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let want: Vec<&str> = stored
        .iter()
        .chain(&nested)
        .map(|e| e.event_id.as_str())
        .collect();
    assert_eq!(got, want, "the committed events, in commit order");
    assert!(!got.contains(&gone[0].event_id.as_str()));
    let payload: serde_json::Value = serde_json::from_str(&rows[0].payload).unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&quoted.to_payload().unwrap()).unwrap();
    assert_eq!(payload, sent, "the payload whole");
    assert_eq!(
        (rows[0].event_type.as_str(), rows[0].message_key.clone()),
        ("notification.feishu.requested", quoted.message_key())
    );
    drop(conn);
    assert_eq!(w.h.business_rows().await, 1);
    assert_eq!(
        table_rows(&w, "notification").await,
        0,
        "no row was written"
    );
    wal_cleanup(w).await;
}

// The slot is one ordered log: an event larger than the broker takes goes dead (a dead row in
// the service's table, with its reason) and no longer holds the log back; the later events of
// its key, held back behind it, go out on the next round, in commit order, and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_an_oversized_event_goes_dead_and_its_keys_later_events_follow_in_order() {
    let w = wal_world("task").await;
    let (rows, other) = a_key_with_an_oversized_event(&w).await;
    let (relay, bus) = task_relay(
        &w,
        KafkaConfig::new(brokers()).set("message.max.bytes", "2000"),
    );
    bus.ensure_topics(&[task_topic(&w)]).await.unwrap();
    assert_eq!(relay.relay_once("task").await.unwrap(), 6);
    let mut conn = w.h.pool.acquire().await.unwrap();
    let dead =
        w.h.outbox
            .get_by_event_id(&mut conn, "task", &rows[2].event_id)
            .await
            .unwrap()
            .expect("the oversized event is kept as a dead row");
    drop(conn);
    assert_eq!(dead.status, Status::Dead);
    assert_eq!(dead.dead_reason.as_deref(), Some("message_too_large"));
    assert!(dead.last_error.unwrap().contains("too large"));
    assert_eq!(
        table_rows(&w, "task").await,
        1,
        "only the dead event has a row"
    );
    // The two events of the key behind it: read again and published now.
    assert_eq!(relay.relay_once("task").await.unwrap(), 2);
    assert_eq!(
        relay.relay_once("task").await.unwrap(),
        0,
        "the slot is drained"
    );
    let want: Vec<&Enqueued> = [0, 1, 3, 4].iter().map(|&i| &rows[i]).collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    assert_key_order_on_the_broker(&w, "6", &[&other]).await;
    // Replayed, the dead row is published from the table by the same relay.
    let mut conn = w.h.pool.acquire().await.unwrap();
    w.h.outbox
        .replay_dead(&mut conn, "task", &[dead.id])
        .await
        .unwrap();
    drop(conn);
    let (relay, _bus) = task_relay(&w, KafkaConfig::new(brokers()));
    assert_eq!(relay.relay_once("task").await.unwrap(), 1);
    assert_eq!(w.count("task", Status::Published).await, 1);
    wal_cleanup(w).await;
}

// At least once: a relay whose publishes fail (the topic does not exist yet) leaves the slot
// where it was, and the events wait there, in order, with the slot's lag in bytes and age
// showing them; once the topic exists a relay publishes them all and the lag is gone. Two
// relays: one holds the slot, the other stands by and takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_the_slot_advances_only_past_acknowledged_events_and_a_standby_takes_over() {
    let w = wal_world("task").await;
    let mut rows = Vec::new();
    for i in 0..4u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        rows.push(put_task(&w, &e).await);
    }
    let kafka = KafkaConfig::new(brokers()).publish_timeout(Duration::from_secs(1));
    let (failing, bus) = task_relay(&w, kafka);
    assert_eq!(failing.relay_once("task").await.unwrap(), 4);
    let before = lag(&w, "task").await;
    assert!(
        before.bytes.unwrap() > 0,
        "the events are still in the slot: {before:?}"
    );
    assert!(before.age_ms.unwrap() > 0, "{before:?}");
    assert!(!before.relay_active);
    assert_eq!(
        table_rows(&w, "task").await,
        0,
        "a transient failure is no dead letter"
    );

    bus.ensure_topics(&[task_topic(&w)]).await.unwrap();
    // The first streams the slot, the standby reads it through the SQL interface.
    let start = |owner: &str, read: WalRead| {
        Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
            .outbox(w.h.outbox.clone())
            .relay(relay().owner(owner).wal_read(read))
            .start()
    };
    let first = start("first", WalRead::Stream).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lag(&w, "task").await.relay_active {
        assert!(
            Instant::now() < deadline,
            "the first relay did not take the slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = start("second", WalRead::Sql).await.unwrap();
    let want: Vec<&Enqueued> = rows.iter().collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag(&w, "task").await.age_ms != Some(0) {
        assert!(Instant::now() < deadline, "the slot did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The relay holding the slot stops; the standby takes it over.
    first.shutdown().await.unwrap();
    for i in 4..8u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        rows.push(put_task(&w, &e).await);
    }
    let want: Vec<&Enqueued> = rows.iter().collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    second.shutdown().await.unwrap();
    let after = lag(&w, "task").await;
    assert_eq!(after.age_ms, Some(0), "{after:?}");
    wal_cleanup(w).await;
}

// The relay daemon streams the slot (replication protocol): an event larger than the broker
// takes goes dead with its reason and the later events of its key follow it in commit order,
// another key's event is not held back; while it runs the slot is streamed (`outbox status`
// sees a relay holding it), and once it stopped the slot is free and confirmed past every
// event (its last acknowledgement reached the server before the stream closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_a_streaming_relay_dead_letters_an_oversized_event_and_keeps_key_order() {
    let w = wal_world("task").await;
    let (rows, other) = a_key_with_an_oversized_event(&w).await;
    let running = Engine::builder(
        w.h.pool.clone(),
        KafkaConfig::new(brokers()).set("message.max.bytes", "2000"),
    )
    .outbox(w.h.outbox.clone())
    .relay(relay())
    .start()
    .await
    .unwrap();
    let want: Vec<&Enqueued> = [0, 1, 3, 4].iter().map(|&i| &rows[i]).collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    assert_key_order_on_the_broker(&w, "6", &[&other]).await;
    let dead = {
        let mut conn = w.h.pool.acquire().await.unwrap();
        w.h.outbox
            .get_by_event_id(&mut conn, "task", &rows[2].event_id)
            .await
            .unwrap()
            .expect("the oversized event is kept as a dead row")
    };
    assert_eq!(dead.status, Status::Dead);
    assert_eq!(dead.dead_reason.as_deref(), Some("message_too_large"));
    let mut conn = w.h.pool.acquire().await.unwrap();
    assert!(
        w.h.outbox
            .wal_slot_state(&mut conn, "task")
            .await
            .unwrap()
            .unwrap()
            .streamed,
        "the relay reads the slot by streaming"
    );
    drop(conn);
    assert!(lag(&w, "task").await.relay_active);
    running.shutdown().await.unwrap();
    let mut conn = w.h.pool.acquire().await.unwrap();
    assert!(
        !w.h.outbox
            .wal_slot_state(&mut conn, "task")
            .await
            .unwrap()
            .unwrap()
            .streamed,
        "a stopped relay gave the slot up"
    );
    drop(conn);
    let after = lag(&w, "task").await;
    assert!(!after.relay_active, "{after:?}");
    assert_eq!(
        after.age_ms,
        Some(0),
        "confirmed past every event: {after:?}"
    );
    assert_eq!(
        table_rows(&w, "task").await,
        1,
        "only the dead event has a row"
    );
    wal_cleanup(w).await;
}

// A streaming relay whose publishes fail (the topic does not exist, and the relay may not make
// it) keeps the events it read and tries them again, after its backoff, from the failed
// one's transaction on: once the topic exists they all reach the broker, in commit order,
// and none goes dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_a_streaming_relay_retries_failed_events_in_order_until_the_broker_takes_them() {
    let w = wal_world("task").await;
    let mut rows = Vec::new();
    for i in 0..6u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        rows.push(put_task(&w, &e).await);
    }
    let kafka = KafkaConfig::new(brokers())
        .create_topics(false)
        .publish_timeout(Duration::from_millis(500));
    let running = Engine::builder(w.h.pool.clone(), kafka)
        .outbox(w.h.outbox.clone())
        .relay(relay())
        .start()
        .await
        .unwrap();
    // Written while the relay fails: behind the others.
    for i in 6..9u64 {
        let mut e = samples::urgency(i);
        e.user_id = 5;
        rows.push(put_task(&w, &e).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = lag(&w, "task").await;
        if seen.relay_active && seen.age_ms.is_some_and(|a| a > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never showed its unpublished events: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bus = KafkaBus::new(KafkaConfig::new(brokers())).unwrap();
    bus.ensure_topics(&[task_topic(&w)]).await.unwrap();
    let want: Vec<&Enqueued> = rows.iter().collect();
    assert_key_order_on_the_broker(&w, "5", &want).await;
    running.shutdown().await.unwrap();
    assert_eq!(
        table_rows(&w, "task").await,
        0,
        "a transient failure is no dead letter"
    );
    assert_eq!(lag(&w, "task").await.age_ms, Some(0));
    wal_cleanup(w).await;
}

// Every slot of a database decodes every message: two outboxes in one database with the same
// service (two prefixes, each with its own tables) each relay only their own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_two_outboxes_in_one_database_relay_only_their_own_events() {
    let (a, b) = (wal_world("task").await, wal_world("task").await);
    assert_ne!(
        a.h.outbox.wal_prefix("task").unwrap(),
        b.h.outbox.wal_prefix("task").unwrap()
    );
    for (w, n) in [(&a, 3u64), (&b, 2), (&a, 1)] {
        for i in 0..n {
            put_task(w, &samples::urgency(i)).await;
        }
    }
    for (w, n) in [(&a, 4), (&b, 2)] {
        let (relay, bus) = task_relay(w, KafkaConfig::new(brokers()));
        bus.ensure_topics(&[task_topic(w)]).await.unwrap();
        assert_eq!(relay.relay_once("task").await.unwrap(), n);
        assert_eq!(relay.relay_once("task").await.unwrap(), 0);
    }
    wal_cleanup(a).await;
    wal_cleanup(b).await;
}

// A consumer that would mark the producer's rows cannot serve a WAL service (its events have
// no row); the builder refuses a WAL service on another database, or one also Go-routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_wal_services_refuse_what_cannot_work() {
    let w = wal_world("notification").await;
    let refused = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(w.h.outbox.clone())
        .without_relay()
        .consumer::<NotificationEvents, _>(w.recorder())
        .start()
        .await;
    match refused {
        Err(e @ outbox_runtime::Error::WalNeedsInbox { .. }) => {
            assert!(e.to_string().contains("Dedupe::Inbox"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(running) => {
            let e = running
                .shutdown()
                .await
                .expect_err("a row-marking consumer ran");
            assert!(
                matches!(e, outbox_runtime::Error::WalNeedsInbox { .. }),
                "{e}"
            );
        }
    }
    let catalog = w.h.outbox.catalog().clone();
    let sqlite =
        Outbox::<outbox_runtime::sqlx::Sqlite>::builder(catalog.clone()).wal("notification");
    assert!(matches!(
        sqlite,
        Err(outbox_runtime::Error::WalUnsupported { .. })
    ));
    let go = Outbox::<Postgres>::builder(catalog)
        .wal("notification")
        .unwrap()
        .go_route(
            "notification",
            outbox_runtime::store::GoRoute::new("notification_outbox"),
        );
    assert!(matches!(go, Err(outbox_runtime::Error::WalAndGo { .. })));
    // A relay of a WAL service whose slot was never made (no migrate) does not start.
    let unmigrated = Outbox::<Postgres>::builder(w.h.outbox.catalog().clone())
        .wal("task")
        .unwrap()
        .build();
    let started = Engine::builder(w.h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(unmigrated.clone())
        .start()
        .await;
    match started {
        Err(e @ outbox_runtime::Error::WalSlotMissing { .. }) => {
            assert!(e.to_string().contains("run `outbox migrate`"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a relay started on a WAL service with no slot"),
    }
    // A team that migrates by hand runs `migration_sql`, each statement on its own (twice
    // here: each is idempotent); that makes the slot too.
    let slot = unmigrated.wal_slot("task").unwrap();
    let by_hand = unmigrated.migration_sql();
    assert!(by_hand.iter().any(|s| s.contains(&slot)), "{by_hand:?}");
    let mut conn = w.h.pool.acquire().await.unwrap();
    {
        let _turn = harness::MIGRATIONS.lock().await;
        for sql in by_hand.iter().chain(&by_hand) {
            Postgres::execute(&mut conn, sql, Vec::new()).await.unwrap();
        }
    }
    unmigrated.check_wal(&mut conn).await.unwrap();
    drop_slot(&mut conn, slot).await;
    drop(conn);
    // This server decodes its log.
    let mut conn = w.h.pool.acquire().await.unwrap();
    w.h.outbox
        .check_wal_level(&mut conn, "notification")
        .await
        .unwrap();
    drop(conn);
    wal_cleanup(w).await;
}
