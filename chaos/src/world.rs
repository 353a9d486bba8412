//! What the driver and its child processes share: the per-scenario names, the catalog, the
//! store and Kafka settings, and the two databases.

use std::time::Duration;

use outbox_runtime::bus::KafkaConfig;
use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::{Backend, StoreConfig};
use outbox_runtime::{Catalog, RouteConfig};

use crate::BoxError;
use crate::contract::{ChaosEvents, SERVICE};

/// Attempts of a healthy row. Every relay kill can cost a row one attempt (its lease runs out
/// and it is claimed again), and a broker outage a few more (each publish waits for the
/// publish timeout): the budget is set well above what a scenario can use, so that a healthy
/// row going dead is a finding, not the budget running out.
pub(crate) const HEALTHY_MAX_ATTEMPTS: i32 = 100;

/// Attempts of an event whose handler always fails: it goes dead with `max_attempts` after
/// this many deliveries.
pub(crate) const FAILING_MAX_ATTEMPTS: i32 = 3;

/// A relay's lease: short, so that rows held by a killed relay come back quickly.
pub(crate) const LEASE: Duration = Duration::from_secs(5);

/// The database a run is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendKind {
    Postgres,
    Mysql,
}

impl BackendKind {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "postgres" | "postgresql" => Some(Self::Postgres),
            "mysql" | "mariadb" => Some(Self::Mysql),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }

    /// The other server: where a consumer with its own database keeps it.
    pub(crate) fn other(self) -> Self {
        match self {
            Self::Postgres => Self::Mysql,
            Self::Mysql => Self::Postgres,
        }
    }

    /// `OUTBOX_TEST_POSTGRES_URL` / `OUTBOX_TEST_MYSQL_URL`, as the test suite reads them.
    pub(crate) fn default_url(self) -> String {
        let (var, default) = match self {
            Self::Postgres => (
                "OUTBOX_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            Self::Mysql => ("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
        };
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }
}

/// A database the suite runs on.
pub(crate) trait ChaosDb: Backend {
    /// A pool that gives up on a connection after a few seconds, so that a database restart
    /// shows up as errors rather than a hang.
    async fn pool(url: &str, max: u32) -> Result<Pool<Self>, BoxError>;

    /// The statement that gives back the space of the rows a run deleted from `table`, one the
    /// runs share, so that each run starts from the same state: PostgreSQL's autovacuum may
    /// not come round between runs (a run of 12,000 events leaves as many dead inbox records,
    /// and later runs slowed down behind them), while InnoDB purges on its own. A plain
    /// `VACUUM` left the inbox's primary key at 3 MB after a few runs, and the runs unequal
    /// (the first clean run at 5,900 healthy events/s, the later ones at 5,100, from MariaDB to
    /// PostgreSQL): `VACUUM FULL` rebuilds the table and its indexes, nearly empty between runs,
    /// and the clean runs measured 5,184 and 5,059.
    fn reclaim(table: &str) -> Option<String>;
}

impl ChaosDb for sqlx::Postgres {
    async fn pool(url: &str, max: u32) -> Result<Pool<Self>, BoxError> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| format!("PostgreSQL at {url} is unreachable: {e}"))?)
    }

    fn reclaim(table: &str) -> Option<String> {
        Some(format!("VACUUM FULL {table}"))
    }
}

impl ChaosDb for sqlx::MySql {
    async fn pool(url: &str, max: u32) -> Result<Pool<Self>, BoxError> {
        Ok(sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| format!("MariaDB/MySQL at {url} is unreachable: {e}"))?)
    }

    fn reclaim(_table: &str) -> Option<String> {
        None
    }
}

/// The tables and Kafka names of one scenario run, from its tag.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The chaos service's outbox table.
    pub(crate) table: String,
    /// One row per applied event; no unique key, so a second effect is visible.
    pub(crate) effects: String,
    /// The writers' business rows, one per sequence number, committed with the event.
    pub(crate) business: String,
    prefix: String,
}

impl Names {
    pub(crate) fn new(tag: &str) -> Self {
        Self {
            table: format!("{tag}_outbox"),
            effects: format!("{tag}_fx"),
            business: format!("{tag}_biz"),
            prefix: format!("chaos-{tag}"),
        }
    }

    pub(crate) fn catalog(&self) -> Result<Catalog, BoxError> {
        let routes = RouteConfig::new()
            .prefix(&self.prefix)?
            .override_service(SERVICE, RouteOverride::default().table(self.table.clone()))?;
        Ok(Catalog::builder(routes).service::<ChaosEvents>()?.build())
    }
}

/// Retries in the relays and consumers: quick, so that a scenario settles in seconds.
pub(crate) fn store_config(max_attempts: i32) -> StoreConfig {
    StoreConfig::default()
        .max_attempts(max_attempts)
        .backoff_base(Duration::from_millis(100))
        .backoff_cap(Duration::from_secs(1))
}

/// A consumer group member's session: a consumer killed with -9 never leaves its group; the
/// broker notices when its session times out, and until then its partitions are nobody's. A
/// short session keeps that pause to seconds.
pub(crate) const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How long a consumer lets a partition with messages wait at one offset before it leaves its
/// group and joins again (the runtime's default is 2 minutes).
pub(crate) const REJOIN_AFTER: Duration = Duration::from_secs(20);

/// The Kafka settings of every client (see [`SESSION_TIMEOUT`]).
///
/// `CHAOS_KAFKA_DEBUG` sets librdkafka's `debug` property (`cgrp`, `consumer,cgrp`, ...) in every
/// client, to see in the role logs what a group did.
pub(crate) fn kafka(brokers: &str) -> KafkaConfig {
    let config = KafkaConfig::new(brokers)
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000");
    match std::env::var("CHAOS_KAFKA_DEBUG") {
        Ok(debug) if !debug.is_empty() => config.set("debug", debug),
        _ => config,
    }
}

/// The relay's settings: the runtime's idempotent producer, except where `idempotent` is false.
/// tansu 0.6's SQLite storage panics on a produce from an idempotent producer that was already
/// producing before the broker restarted (`tansu-storage` `lite.rs:503`, "more or less than one
/// row", in `idempotent_message_check`), and its storage task stays dead; the broker-outage
/// scenario therefore runs its relays without idempotence. A duplicate publish that
/// idempotence would have suppressed is then applied once by the consumer all the same.
pub(crate) fn relay_kafka(brokers: &str, idempotent: bool) -> KafkaConfig {
    let config = kafka(brokers);
    if idempotent {
        config
    } else {
        config.set("enable.idempotence", "false")
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
