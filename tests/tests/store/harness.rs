//! A fresh set of outbox tables per test, on a real server (PostgreSQL, MariaDB/MySQL) or a
//! SQLite file, with a manual clock. A server that cannot be reached fails the test: there is no
//! silent skip. `./scripts/test` starts the servers.

use std::time::Duration;

use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::{Arg, Backend, ManualClock, StoreConfig};
use outbox_runtime::{Catalog, Outbox, RouteConfig};

/// The services of the reference contracts.
pub(crate) const SERVICES: [&str; 6] = [
    "agent",
    "memory",
    "task",
    "active-scheduler",
    "notification",
    "token-store",
];

/// 2026-11-23T09:00:00Z, where every test clock starts.
pub(crate) const T0: i64 = 1_795_424_400_000;

/// How a test reaches its database.
pub(crate) trait TestDb: Backend {
    /// The pool, and the file to delete afterwards (SQLite).
    async fn open(tag: &str) -> (Pool<Self>, Option<std::path::PathBuf>);
    /// `$n` placeholders as this database writes them.
    fn sql(sql: &str) -> String {
        Self::dialect_sql(sql).into_owned()
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

impl TestDb for sqlx::Postgres {
    async fn open(_: &str) -> (Pool<Self>, Option<std::path::PathBuf>) {
        let url = env_or(
            "OUTBOX_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e}"));
        (pool, None)
    }
}

impl TestDb for sqlx::MySql {
    async fn open(_: &str) -> (Pool<Self>, Option<std::path::PathBuf>) {
        let url = env_or("OUTBOX_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("MySQL/MariaDB at {url} is unreachable: {e}"));
        (pool, None)
    }
}

impl TestDb for sqlx::Sqlite {
    async fn open(tag: &str) -> (Pool<Self>, Option<std::path::PathBuf>) {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
        let path = std::env::temp_dir().join(format!("outbox-test-{tag}.db"));
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("SQLite file {} cannot be opened: {e}", path.display()));
        (pool, Some(path))
    }
}

/// One test's tables, pool, outbox and clock.
pub(crate) struct Harness<DB: TestDb> {
    pub(crate) pool: Pool<DB>,
    pub(crate) outbox: Outbox<DB>,
    pub(crate) clock: ManualClock,
    pub(crate) tag: String,
    /// The business table of this test: `(id BIGINT PRIMARY KEY, note VARCHAR(100))`.
    pub(crate) business: String,
    file: Option<std::path::PathBuf>,
}

/// `CREATE TABLE IF NOT EXISTS` of the shared inbox table races on PostgreSQL when two tests
/// run it at once, so migrations take turns within this test binary.
pub(crate) static MIGRATIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl<DB: TestDb> Harness<DB> {
    pub(crate) async fn new() -> Self {
        Self::with_config(StoreConfig::default().jitter(false)).await
    }

    pub(crate) async fn with_config(config: StoreConfig) -> Self {
        Self::build(config, |_| "smartflow".to_owned(), false).await
    }

    /// For end-to-end tests: the system clock, and topics and groups named
    /// `<prefix(tag)>.<service>.outbox`, so that tests sharing a broker stay apart.
    #[allow(
        dead_code,
        reason = "used by the end-to-end tests, not by the store tests"
    )]
    pub(crate) async fn live(config: StoreConfig, prefix: impl Fn(&str) -> String) -> Self {
        Self::build(config, prefix, true).await
    }

    async fn build(config: StoreConfig, prefix: impl Fn(&str) -> String, live: bool) -> Self {
        let tag = format!("{:08x}", fastrand::u32(..));
        let (pool, file) = DB::open(&tag).await;
        let mut routes = RouteConfig::new().prefix(&prefix(&tag)).unwrap();
        for service in SERVICES {
            let over = RouteOverride::default()
                .table(format!("t{tag}_{}_outbox", service.replace('-', "_")));
            routes = routes.override_service(service, over).unwrap();
        }
        let catalog = Catalog::builder(routes)
            .service::<contracts::AgentEvents>()
            .unwrap()
            .service::<contracts::MemoryEvents>()
            .unwrap()
            .service::<contracts::TaskEvents>()
            .unwrap()
            .service::<contracts::ActiveSchedulerEvents>()
            .unwrap()
            .service::<contracts::NotificationEvents>()
            .unwrap()
            .service::<contracts::TokenStoreEvents>()
            .unwrap()
            .build();
        let clock = ManualClock::at(T0);
        let builder = Outbox::builder(catalog).config(config);
        let outbox = if live {
            builder.build()
        } else {
            builder.clock(clock.clone()).build()
        };
        let business = format!("b{tag}");
        let h = Self {
            pool,
            outbox,
            clock,
            tag,
            business,
            file,
        };
        {
            let _turn = MIGRATIONS.lock().await;
            let mut conn = h.pool.acquire().await.unwrap();
            h.outbox.migrate(&mut conn).await.unwrap();
            let create = format!(
                "CREATE TABLE {} (id BIGINT PRIMARY KEY, note VARCHAR(100) NOT NULL)",
                h.business
            );
            DB::execute(&mut conn, &create, Vec::new()).await.unwrap();
        }
        h
    }

    /// The table of `service` in this test.
    pub(crate) fn table(&self, service: &str) -> String {
        self.outbox
            .catalog()
            .service(service)
            .unwrap()
            .table
            .clone()
    }

    /// Runs a statement written with `$n` placeholders.
    pub(crate) async fn exec(&self, conn: &mut DB::Connection, sql: &str, args: Vec<Arg>) -> u64 {
        DB::execute(conn, &DB::sql(sql), args).await.unwrap()
    }

    /// Writes one business row.
    pub(crate) async fn write_business(&self, conn: &mut DB::Connection, id: i64, note: &str) {
        let sql = format!("INSERT INTO {} (id, note) VALUES ($1, $2)", self.business);
        self.exec(conn, &sql, vec![Arg::I64(id), Arg::Str(note.to_owned())])
            .await;
    }

    /// How many business rows there are.
    pub(crate) async fn business_rows(&self) -> i64 {
        let mut conn = self.pool.acquire().await.unwrap();
        let sql = format!("SELECT COUNT(*) FROM {}", self.business);
        DB::fetch_ints(&mut conn, &sql, Vec::new()).await.unwrap()[0].unwrap()
    }

    /// How many rows `service`'s table holds.
    pub(crate) async fn rows(&self, service: &str) -> i64 {
        let mut conn = self.pool.acquire().await.unwrap();
        let sql = format!("SELECT COUNT(*) FROM {}", self.table(service));
        DB::fetch_ints(&mut conn, &sql, Vec::new()).await.unwrap()[0].unwrap()
    }

    /// Drops this test's tables.
    pub(crate) async fn cleanup(self) {
        let mut conn = self.pool.acquire().await.unwrap();
        for service in SERVICES {
            let sql = format!("DROP TABLE IF EXISTS {}", self.table(service));
            DB::execute(&mut conn, &sql, Vec::new()).await.unwrap();
        }
        let sql = format!("DROP TABLE IF EXISTS {}", self.business);
        DB::execute(&mut conn, &sql, Vec::new()).await.unwrap();
        drop(conn);
        self.pool.close().await;
        if let Some(file) = self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
    }
}
