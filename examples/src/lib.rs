//! What the runnable programs in `examples/` share: the broker to use and the SQLite setup.

use std::path::Path;
use std::time::Duration;

use outbox_runtime::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// rdkafka's in-process mock cluster.
pub type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// The brokers to use: `given`, or else a new one-broker mock cluster, returned too because it
/// lives only as long as its value.
pub fn brokers(given: Option<&str>) -> Result<(String, Option<Mock>), rdkafka::error::KafkaError> {
    match given {
        Some(b) => Ok((b.to_owned(), None)),
        None => {
            let mock = Mock::new(1)?;
            Ok((mock.bootstrap_servers(), Some(mock)))
        }
    }
}

/// A pool of 8 connections for many writers at once: WAL, `synchronous = NORMAL`, and a 30 s
/// busy timeout (SQLite has one writer at a time; the others wait rather than fail).
pub async fn sqlite_pool(
    options: SqliteConnectOptions,
) -> Result<SqlitePool, outbox_runtime::sqlx::Error> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
}

/// Deletes a SQLite database file and its WAL companions.
pub fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
