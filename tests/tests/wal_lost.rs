//! A write-ahead-log service whose replication slot PostgreSQL invalidated (it held more WAL
//! than `max_slot_wal_keep_size` allows): the relay stops with the fix rather than go on as if
//! nothing were waiting, `outbox_wal_slot_lost` says so, and the slot's lag shows it.
//!
//! A test binary of its own: it lowers `max_slot_wal_keep_size`, a setting of the whole
//! server, for the moment it takes to invalidate its slot, and test binaries run one at a
//! time (tests within one run at once). PostgreSQL (with `wal_level = logical`, which
//! `./scripts/test` sets) and tansu.

#[allow(
    dead_code,
    reason = "the store tests' harness, of which this test needs a part"
)]
#[path = "store/harness.rs"]
mod harness;
#[path = "../../outbox-cli/tests/support/lost_slot.rs"]
mod lost_slot;

use std::time::Duration;

use contracts::samples;
use harness::Harness;
use outbox_runtime::sqlx::Postgres;
use outbox_runtime::store::StoreConfig;
use outbox_runtime::{Engine, Error, KafkaConfig, Outbox, RelayConfig};

fn brokers() -> String {
    std::env::var("OUTBOX_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn migrate(h: &Harness<Postgres>) {
    let mut conn = h.pool.acquire().await.unwrap();
    h.outbox.migrate(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stops_on_an_invalidated_slot_with_the_fix_and_its_gauge_says_lost() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let mut h = Harness::<Postgres>::live(StoreConfig::default(), |tag| format!("lost{tag}")).await;
    h.outbox = Outbox::builder(h.outbox.catalog().clone())
        .wal("notification")
        .unwrap()
        .build();
    migrate(&h).await;
    let slot = h.outbox.wal_slot("notification").unwrap();
    // An event the slot holds for the relay.
    let mut tx = h.pool.begin().await.unwrap();
    h.outbox
        .enqueue(&mut *tx, &samples::feishu(1))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    lost_slot::invalidate(&h.pool, &slot).await;

    let mut conn = h.pool.acquire().await.unwrap();
    let lag = h.outbox.wal_lag(&mut conn, "notification").await.unwrap();
    drop(conn);
    assert!(lag.lost && lag.bytes.is_some(), "{lag:?}");
    assert_eq!((lag.age_ms, lag.relay_active), (None, false), "{lag:?}");

    let mut running = Engine::builder(h.pool.clone(), KafkaConfig::new(brokers()))
        .outbox(h.outbox.clone())
        .relay(RelayConfig::default().poll_interval(Duration::from_millis(100)))
        .start()
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait())
        .await
        .expect("the relay went on with a lost slot");
    let err = stopped.unwrap_err();
    assert!(
        matches!(&err, Error::WalSlotLost { service, slot: s } if service == "notification" && *s == slot),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("pg_drop_replication_slot('{slot}')"))
            && text.contains("outbox migrate"),
        "the fix: {text}"
    );
    let rendered = metrics.render();
    assert!(
        rendered.contains("outbox_wal_slot_lost{service=\"notification\"} 1"),
        "{rendered}"
    );
    drop(running);

    // The fix: the slot dropped and made again is read from the present.
    let drop_slot = format!("SELECT pg_drop_replication_slot('{slot}')");
    lost_slot::run(&h.pool, &drop_slot).await;
    migrate(&h).await;
    let mut conn = h.pool.acquire().await.unwrap();
    let lag = h.outbox.wal_lag(&mut conn, "notification").await.unwrap();
    drop(conn);
    assert!(!lag.lost && lag.age_ms == Some(0), "{lag:?}");
    lost_slot::run(&h.pool, &drop_slot).await;
    h.cleanup().await;
}
