//! Invalidating a replication slot as PostgreSQL does past `max_slot_wal_keep_size`, for the
//! tests of what a lost slot does. The setting is the whole server's: a test that uses this
//! runs alone (a test binary of its own, or taking turns with the other tests that have
//! slots), and the setting is put back whatever happens.

use std::time::{Duration, Instant};

use outbox_runtime::sqlx::{self, PgPool};

/// Runs a statement that must succeed.
pub(crate) async fn run(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// Lowers `max_slot_wal_keep_size` to 1 MB, writes, switches and checkpoints WAL segments until
/// the server invalidates `slot` (`wal_status` `lost`, at most 60 s), and puts the setting back.
pub(crate) async fn invalidate(pool: &PgPool, slot: &str) {
    let keep: String = sqlx::query_scalar("SELECT current_setting('wal_keep_size')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        keep, "0",
        "wal_keep_size keeps the segments a slot would lose"
    );
    run(pool, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").await;
    run(pool, "SELECT pg_reload_conf()").await;
    // In a task of its own: the setting goes back even when it panics.
    let (pool2, slot2) = (pool.clone(), slot.to_owned());
    let done = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            run(
                &pool2,
                "SELECT pg_logical_emit_message(false, 'outbox-test-filler', repeat('x', 1000))",
            )
            .await;
            run(&pool2, "SELECT pg_switch_wal()").await;
            run(&pool2, "CHECKPOINT").await;
            let status: String = sqlx::query_scalar(
                "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&slot2)
            .fetch_one(&pool2)
            .await
            .unwrap();
            if status == "lost" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot2} still {status:?} after 60 s of checkpoints"
            );
        }
    })
    .await;
    run(pool, "ALTER SYSTEM RESET max_slot_wal_keep_size").await;
    run(pool, "SELECT pg_reload_conf()").await;
    done.unwrap();
}
