//! `outbox`: the operator's tool for the transactional outbox.
//!
//! ```text
//! outbox migrate [--print]                 create or upgrade the services' tables
//! outbox status                            counts per service and status, oldest due, dead reasons
//! outbox dead list|show|replay|discard     inspect and act on dead letters (with filters, --dry-run)
//! outbox relay                             the relay as a daemon, with a Prometheus endpoint
//! outbox schema check --base DIR --head DIR
//! ```
//!
//! Services come from `--services`/`OUTBOX_SERVICES` or the config file (`--config`,
//! `OUTBOX_CONFIG`); the database from `--database-url`/`DATABASE_URL` (PostgreSQL, MySQL or
//! SQLite). Tables by default, `--json` for scripts; a failure exits non-zero with a one-line
//! reason.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod prometheus;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use outbox_runtime::bus::{KafkaBus, KafkaConfig, Outgoing, Publish as _};
use outbox_runtime::envelope::VersionFormat;
use outbox_runtime::relay::{RelayConfig, WalRead};
use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::{Backend, GoRoute, InboxDead, OutboxRow};
use outbox_runtime::{Catalog, Engine, Outbox, RouteConfig, Status};
use serde::Deserialize;
use serde_json::json;

/// The daemon's allocator. The relay frees a batch's messages all at once, round after round:
/// glibc's allocator then merges its free lists again and again, and a process that had been
/// running a while relayed slower (README, "Measured", the allocator).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(name = "outbox", version, about = "Operate a transactional outbox")]
struct Cli {
    /// postgres://…, mysql://… or sqlite://…
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Services to act on, comma-separated.
    #[arg(long, env = "OUTBOX_SERVICES", value_delimiter = ',', global = true)]
    services: Vec<String>,
    /// Topic and group prefix (default: the config file's, else `outbox`).
    #[arg(long, env = "OUTBOX_PREFIX", global = true)]
    prefix: Option<String>,
    /// A JSON config file (see the README).
    #[arg(long, env = "OUTBOX_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the tables of the services (idempotent).
    Migrate {
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Counts per service and status, the age of the oldest due row, dead rows by reason, and
    /// each write-ahead-log service's slot lag. Exits 2, with the fix on stderr, when such a
    /// service's slot is lost or missing.
    Status,
    /// Dead letters.
    #[command(subcommand)]
    Dead(Dead),
    /// Put rows published longer than `--older-than` ago back to pending (their message never
    /// reached a consumer: retention ran out, a partition nobody reads, a deleted topic).
    Republish {
        /// Rows published longer ago than this (`30s`, `15m`, `2h`, `7d`).
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
        /// Only this service (else every configured one).
        #[arg(long)]
        service: Option<String>,
        /// Show what would be republished, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many rows per service.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Move the pending rows of a Go outbox table (the Go system's schema) into this outbox,
    /// each exactly once; stop the Go relay of that table first.
    ImportGo {
        /// The Go table (`notification_outbox_messages`).
        #[arg(long)]
        table: String,
        /// The service whose table takes the rows (else the one whose `go_routes` entry names
        /// the table, or whose Go table it is by the Go naming convention).
        #[arg(long)]
        service: Option<String>,
        /// Show what would move and what would be refused, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many rows.
        #[arg(long, default_value_t = 1_000_000)]
        limit: usize,
    },
    /// Run the relay for the services until SIGTERM or Ctrl-C.
    Relay {
        /// Kafka brokers, `host:port,…`.
        #[arg(long, env = "OUTBOX_BROKERS")]
        brokers: Option<String>,
        /// Where to serve Prometheus metrics, `host:port`.
        #[arg(long, env = "OUTBOX_METRICS_ADDR")]
        metrics_addr: Option<String>,
    },
    /// Schema files.
    #[command(subcommand)]
    Schema(Schema),
}

#[derive(Subcommand)]
enum Dead {
    /// List dead rows matching the filters.
    List(Filter),
    /// Show one dead row (or, with `--group`, one inbox dead letter) in full.
    Show {
        /// The row's service.
        #[arg(long, required_unless_present = "group")]
        service: Option<String>,
        /// An inbox dead letter of this consumer group instead (ID is then its event id).
        #[arg(long)]
        group: Option<String>,
        /// The row id (the event id with `--group`).
        id: String,
    },
    /// Send matching dead rows back to pending, attempts reset; with `--group`, publish the
    /// stored envelopes of matching inbox dead letters again (so that the consumer applies
    /// them) and forget them.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Kafka brokers, for `--group` (the envelopes are published again).
        #[arg(long, env = "OUTBOX_BROKERS")]
        brokers: Option<String>,
    },
    /// Delete matching dead rows for good.
    Discard {
        #[command(flatten)]
        filter: Filter,
        /// Show what would be discarded, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Clone)]
struct Filter {
    /// Only this service (else every configured one).
    #[arg(long)]
    service: Option<String>,
    /// The dead letters an inbox consumer of this group kept in this (its own) database,
    /// instead of dead rows.
    #[arg(long)]
    group: Option<String>,
    /// Only this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Only rows whose reason or last error contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only ids from this one on.
    #[arg(long)]
    from_id: Option<i64>,
    /// Only ids up to this one.
    #[arg(long)]
    to_id: Option<i64>,
    /// Only rows dead for longer than this (`30s`, `15m`, `2h`, `7d`).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// At most this many rows.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Subcommand)]
enum Schema {
    /// Fail when an existing (event type, version) changed incompatibly between two schema
    /// trees (as written by `outbox_runtime::schema::export`).
    Check {
        /// The accepted schemas (say, the main branch's).
        #[arg(long)]
        base: PathBuf,
        /// The proposed schemas.
        #[arg(long)]
        head: PathBuf,
    },
}

/// The config file (no `Debug`: it holds the database URL and librdkafka secrets).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    database_url: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    services: Vec<String>,
    /// Per-service table, topic or group overrides.
    #[serde(default)]
    routes: BTreeMap<String, RouteOverride>,
    brokers: Option<String>,
    metrics_addr: Option<String>,
    /// librdkafka properties (TLS, SASL, ...).
    #[serde(default)]
    kafka: BTreeMap<String, String>,
    #[serde(default)]
    relay: RelayFile,
    /// Services still served by the Go system: their Go tables.
    #[serde(default)]
    go_routes: BTreeMap<String, GoRouteFile>,
    /// Services relayed from PostgreSQL's write-ahead log instead of their table.
    #[serde(default)]
    wal_services: Vec<String>,
}

/// A service's Go route in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoRouteFile {
    /// The Go table.
    table: String,
    /// How its Go handlers spell `event_version` (`"number"`, the default, or `"prefixed"`).
    version_format: Option<Spelling>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    batch: Option<usize>,
    lease_secs: Option<u64>,
    poll_ms: Option<u64>,
    /// Partitions of the topics the relay creates (3 by default).
    topic_partitions: Option<i32>,
    /// Replication factor of the topics the relay creates (1 by default).
    topic_replication: Option<i32>,
    /// Whether the relay creates its topics (true); off, an init job makes them.
    create_topics: Option<bool>,
    /// How `event_version` is written: `"number"` (`"1"`, the default) or `"prefixed"`
    /// (`"v1"`).
    version_format: Option<Spelling>,
    /// The spelling per service, for services whose consumers accept only one.
    #[serde(default)]
    version_formats: BTreeMap<String, Spelling>,
    /// How `wal_services` are read: `"stream"` (the replication protocol, the default) or
    /// `"sql"` (the SQL interface, for a server that needs TLS).
    wal_read: Option<WalReadFile>,
    /// The replication stream's connection URL, when not the database URL's (a user with the
    /// `REPLICATION` attribute).
    replication_url: Option<String>,
}

/// How the config file says `wal_services` are read.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WalReadFile {
    Stream,
    Sql,
}

/// An `event_version` spelling in the config file.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Spelling {
    Number,
    Prefixed,
}

impl From<Spelling> for VersionFormat {
    fn from(s: Spelling) -> Self {
        match s {
            Spelling::Number => VersionFormat::Number,
            Spelling::Prefixed => VersionFormat::Prefixed,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}` has an unknown unit; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    log_to_stderr(matches!(cli.command, Command::Relay { .. }));
    if let Err(e) = run(cli).await {
        eprintln!("outbox: {e}");
        // 2: what was asked for was done, and it found something an operator must fix.
        std::process::exit(if e.is::<Unhealthy>() { 2 } else { 1 });
    }
}

/// `outbox status` found a write-ahead-log service that cannot be relayed: its events are
/// being lost. The status is printed whole before it; the exit code is 2 (1: no status).
#[derive(Debug)]
struct Unhealthy(String);

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unhealthy {}

/// What the runtime logs goes to stderr: its warnings (a publish that failed and will be
/// retried, a replication stream refused, a slot lost) and, for `relay`, what it does (the
/// slots it takes). `RUST_LOG` (`outbox_runtime=debug`, ...) says otherwise.
fn log_to_stderr(daemon: bool) {
    // pgwire-replication logs a refused stream as an error of its own; the relay's warning
    // says the same with the fix.
    let default = if daemon {
        "warn,outbox_runtime=info,pgwire_replication=off"
    } else {
        "warn,pgwire_replication=off"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    if let Command::Schema(Schema::Check { base, head }) = &cli.command {
        return schema_check(base, head, cli.json);
    }
    let config: Config = match &cli.config {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config {}: {e}", path.display()))?,
        )
        .map_err(|e| format!("config {}: {e}", path.display()))?,
        None => Config::default(),
    };
    let url = cli
        .database_url
        .clone()
        .or_else(|| config.database_url.clone())
        .ok_or("no database: give --database-url or set DATABASE_URL")?;
    if url.starts_with("postgres") {
        // The password file read as libpq reads it (see `connect_options`).
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect_with(outbox_runtime::store::connect_options(&url)?)
            .await?;
        with_pool(cli, config, pool, &url).await
    } else if url.starts_with("mysql") || url.starts_with("mariadb") {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await?;
        with_pool(cli, config, pool, &url).await
    } else if url.starts_with("sqlite") {
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        with_pool(cli, config, pool, &url).await
    } else {
        Err(format!(
            "unsupported database URL `{}`: use postgres://, mysql:// or sqlite://",
            redact_url(&url)
        )
        .into())
    }
}

async fn with_pool<DB: Backend>(
    cli: Cli,
    config: Config,
    pool: Pool<DB>,
    url: &str,
) -> Result<(), BoxError> {
    let services = if cli.services.is_empty() {
        config.services.clone()
    } else {
        cli.services.clone()
    };
    if services.is_empty() {
        return Err("no services: give --services a,b, set OUTBOX_SERVICES, or list them in the config file".into());
    }
    let mut routes = RouteConfig::new();
    if let Some(prefix) = cli.prefix.as_ref().or(config.prefix.as_ref()) {
        routes = routes.prefix(prefix)?;
    }
    for (service, over) in &config.routes {
        // A route for no service would be silently unused: a misspelt name is an error.
        if !services.contains(service) && !config.services.contains(service) {
            return Err(format!(
                "the config file routes service `{service}`, which is not among the services ({})",
                services.join(", ")
            )
            .into());
        }
        routes = routes.override_service(service, over.clone())?;
    }
    let mut catalog = Catalog::builder(routes);
    for s in &services {
        catalog = catalog.service_by_name(s)?;
    }
    let mut outbox = Outbox::<DB>::builder(catalog.build());
    for (service, go) in &config.go_routes {
        let mut route = GoRoute::new(&go.table);
        if let Some(spelling) = go.version_format {
            route = route.version(spelling.into());
        }
        outbox = outbox
            .go_route(service, route)
            .map_err(|e| format!("go_routes.{service}: {e}"))?;
    }
    for service in &config.wal_services {
        outbox = outbox
            .wal(service)
            .map_err(|e| format!("wal_services: {e}"))?;
    }
    let outbox = outbox.build();
    match cli.command {
        Command::Migrate { print } => migrate(&outbox, &pool, print, cli.json).await,
        Command::Status => status(&outbox, &pool, cli.json).await,
        Command::Dead(dead) => {
            let kafka = |brokers: Option<String>| {
                brokers.or(config.brokers.clone()).map(|b| {
                    config
                        .kafka
                        .iter()
                        .fold(KafkaConfig::new(b), |k, (p, v)| k.set(p, v))
                })
            };
            if let Some(group) = dead_group(&dead) {
                let group = group.to_owned();
                return inbox_dead_letters(&outbox, &pool, &group, dead, kafka, cli.json).await;
            }
            dead_letters(&outbox, &pool, &services, dead, cli.json).await
        }
        Command::Republish {
            older_than,
            service,
            dry_run,
            limit,
        } => {
            let targets = match service {
                Some(s) if !services.contains(&s) => {
                    return Err(format!("service `{s}` is not configured").into());
                }
                Some(s) => vec![s],
                None => services.clone(),
            };
            republish(
                &outbox, &pool, &targets, older_than, dry_run, limit, cli.json,
            )
            .await
        }
        Command::ImportGo {
            table,
            service,
            dry_run,
            limit,
        } => {
            let service = match service {
                Some(s) if !services.contains(&s) => {
                    return Err(format!("service `{s}` is not configured").into());
                }
                Some(s) => s,
                None => services
                    .iter()
                    .find(|s| outbox.go_route(s).is_some_and(|r| r.table == table))
                    .or_else(|| services.iter().find(|s| GoRoute::convention(s) == table))
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "no configured service has Go table `{table}`: give --service, or name it in go_routes"
                        )
                    })?,
            };
            import_go(&outbox, &pool, &service, &table, dry_run, limit, cli.json).await
        }
        Command::Relay {
            brokers,
            metrics_addr,
        } => {
            let brokers = brokers
                .or(config.brokers.clone())
                .ok_or("no brokers: give --brokers or set OUTBOX_BROKERS")?;
            relay(
                outbox,
                pool,
                brokers,
                metrics_addr.or(config.metrics_addr.clone()),
                &config,
                url,
            )
            .await
        }
        Command::Schema(_) => unreachable!("handled before connecting"),
    }
}

async fn migrate<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    print: bool,
    json: bool,
) -> Result<(), BoxError> {
    let sql = outbox.migration_sql();
    if print {
        if json {
            println!("{}", serde_json::to_string_pretty(&sql)?);
        } else {
            for s in sql {
                println!("{s};\n");
            }
        }
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    outbox.migrate(&mut conn).await?;
    let tables: Vec<&str> = outbox
        .catalog()
        .services()
        .map(|r| r.table.as_str())
        .collect();
    if json {
        println!("{}", json!({ "migrated": tables }));
    } else {
        println!(
            "migrated {} ({} statements, all idempotent)",
            tables.join(", "),
            sql.len()
        );
    }
    Ok(())
}

fn age(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

async fn status<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    json: bool,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    let stats = outbox.stats(&mut conn).await?;
    let mut lags = BTreeMap::new();
    for service in outbox.wal_services() {
        lags.insert(
            service.to_owned(),
            outbox.wal_lag(&mut conn, service).await?,
        );
    }
    if json {
        let out: Vec<_> = stats
            .iter()
            .map(|s| {
                let counts: BTreeMap<&str, i64> =
                    s.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                let mut v = json!({
                    "service": s.service,
                    "table": s.table,
                    "counts": counts,
                    "oldest_due_ms": s.oldest_due_ms,
                    "oldest_published_ms": s.oldest_published_ms,
                    "dead_by_reason": s.dead_by_reason,
                });
                if let Some(lag) = lags.get(&s.service) {
                    v["wal"] = json!({
                        "slot": lag.slot,
                        "lag_bytes": lag.bytes,
                        "lag_age_ms": lag.age_ms,
                        "relay_active": lag.relay_active,
                        "lost": lag.lost,
                    });
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return unrelayable(&lags);
    }
    println!(
        "{:<18} {:>8} {:>8} {:>10} {:>9} {:>6}  {:>11}  {:>16}  dead reasons",
        "service",
        "pending",
        "sending",
        "published",
        "consumed",
        "dead",
        "oldest due",
        "oldest published"
    );
    for s in &stats {
        let reasons: Vec<String> = s
            .dead_by_reason
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        let line = format!(
            "{:<18} {:>8} {:>8} {:>10} {:>9} {:>6}  {:>11}  {:>16}  {}",
            s.service,
            s.counts[&Status::Pending],
            s.counts[&Status::Sending],
            s.counts[&Status::Published],
            s.counts[&Status::Consumed],
            s.counts[&Status::Dead],
            s.oldest_due_ms.map_or("-".to_owned(), age),
            s.oldest_published_ms.map_or("-".to_owned(), age),
            reasons.join(", ")
        );
        println!("{}", line.trim_end());
    }
    if !lags.is_empty() {
        println!();
        println!(
            "{:<18} {:<28} {:>12} {:>11}  relay",
            "service", "replication slot", "lag bytes", "lag age"
        );
        for lag in lags.values() {
            println!(
                "{:<18} {:<28} {:>12} {:>11}  {}",
                lag.service,
                lag.slot,
                lag.bytes.map_or("no slot".to_owned(), |b| b.to_string()),
                if lag.lost {
                    "LOST".to_owned()
                } else {
                    lag.age_ms.map_or("-".to_owned(), age)
                },
                if lag.relay_active { "active" } else { "none" },
            );
        }
    }
    unrelayable(&lags)
}

/// [`Unhealthy`], with the fix, when a write-ahead-log service's slot is lost or missing:
/// the server keeps no log for a slot that is not there, so the service's events are not kept
/// for the relay.
fn unrelayable(lags: &BTreeMap<String, outbox_runtime::store::WalLag>) -> Result<(), BoxError> {
    let broken: Vec<String> = lags
        .values()
        .filter(|l| l.lost || l.bytes.is_none())
        .map(|l| {
            let (service, slot) = (l.service.clone(), l.slot.clone());
            let broken = if l.lost {
                outbox_runtime::Error::WalSlotLost { service, slot }
            } else {
                outbox_runtime::Error::WalSlotMissing { service, slot }
            };
            broken.to_string()
        })
        .collect();
    if broken.is_empty() {
        return Ok(());
    }
    Err(Box::new(Unhealthy(broken.join("; "))))
}

async fn republish<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    services: &[String],
    older_than: Duration,
    dry_run: bool,
    limit: usize,
    json: bool,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    let mut out = Vec::new();
    for service in services {
        let ids = outbox
            .stuck_published(&mut conn, service, older_than, limit)
            .await?;
        let changed = if dry_run || ids.is_empty() {
            0
        } else {
            outbox
                .republish(&mut conn, service, older_than, &ids)
                .await?
        };
        out.push((service, ids, changed));
    }
    if json {
        let v: Vec<_> = out
            .iter()
            .map(|(s, ids, changed)| {
                json!({ "service": s, "matched": ids.len(), "ids": ids, "republished": changed, "dry_run": dry_run })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (service, ids, changed) in &out {
        let range = match (ids.first(), ids.last()) {
            (Some(a), Some(b)) => format!(" (ids {a}..={b})"),
            _ => String::new(),
        };
        if dry_run {
            println!(
                "{service}: {} rows published more than {} ago would go back to pending{range}",
                ids.len(),
                age(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
            );
        } else {
            println!(
                "{service}: {changed} of {} rows published more than {} ago back to pending{range}",
                ids.len(),
                age(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
            );
        }
    }
    Ok(())
}

async fn import_go<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    service: &str,
    table: &str,
    dry_run: bool,
    limit: usize,
    json: bool,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    outbox.check_table(&mut conn, service).await?;
    let done = outbox
        .import_go(&mut conn, service, table, dry_run, limit)
        .await?;
    if json {
        let mut v = serde_json::to_value(&done)?;
        v["dry_run"] = json!(dry_run);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let ours = &outbox
        .catalog()
        .service(service)
        .ok_or("unknown service")?
        .table;
    println!(
        "import-go: `{table}` -> `{ours}` (service {service}){}",
        if dry_run {
            ", dry run: nothing changes"
        } else {
            ""
        }
    );
    for m in &done.moved {
        println!(
            "  {} go#{} as event {} ({} v{})",
            if dry_run { "would move" } else { "moved" },
            m.go_id,
            m.event_id,
            m.event_type,
            m.version
        );
    }
    for r in &done.refused {
        println!("  refused go#{}: {}", r.go_id, r.reason);
    }
    let left: Vec<String> = done.left.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "{} {}, refused {}; `{table}` holds: {}",
        if dry_run { "would move" } else { "moved" },
        done.moved.len(),
        done.refused.len(),
        if left.is_empty() {
            "nothing".to_owned()
        } else {
            left.join(", ")
        }
    );
    Ok(())
}

/// Dead rows of the filter's services that match it, oldest first.
async fn matching<DB: Backend>(
    outbox: &Outbox<DB>,
    conn: &mut DB::Connection,
    services: &[String],
    f: &Filter,
) -> Result<Vec<OutboxRow>, BoxError> {
    let now = outbox.now_ms();
    let mut out = Vec::new();
    let targets: Vec<&String> = match &f.service {
        Some(s) if !services.contains(s) => {
            return Err(format!("service `{s}` is not configured").into());
        }
        Some(s) => vec![s],
        None => services.iter().collect(),
    };
    for service in targets {
        if out.len() >= f.limit {
            break;
        }
        let mut after = f.from_id.map_or(0, |id| id - 1);
        'pages: loop {
            let page = outbox.list_dead(conn, service, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for row in page {
                if f.to_id.is_some_and(|to| row.id > to) {
                    break 'pages;
                }
                let text = format!(
                    "{} {}",
                    row.dead_reason.as_deref().unwrap_or(""),
                    row.last_error.as_deref().unwrap_or("")
                );
                let keep = f.event_type.as_ref().is_none_or(|t| *t == row.event_type)
                    && f.reason.as_ref().is_none_or(|r| text.contains(r.as_str()))
                    && f.older_than
                        .is_none_or(|d| now - row.updated_at >= d.as_millis() as i64);
                if keep {
                    out.push(row);
                    if out.len() >= f.limit {
                        break 'pages;
                    }
                }
            }
        }
    }
    Ok(out)
}

fn row_json(r: &OutboxRow) -> serde_json::Value {
    json!({
        "service": r.service, "id": r.id, "event_id": r.event_id, "event_type": r.event_type,
        "event_version": r.event_version, "message_key": r.message_key, "attempts": r.attempts,
        "dead_reason": r.dead_reason, "last_error": r.last_error, "created_at": r.created_at,
        "updated_at": r.updated_at,
    })
}

async fn dead_letters<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    services: &[String],
    cmd: Dead,
    json_out: bool,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    match cmd {
        Dead::Show { service, id, .. } => {
            let service = service.ok_or("give --service (or --group for an inbox dead letter)")?;
            let id: i64 = id.parse().map_err(|_| {
                format!("`{id}` is not a row id (an inbox dead letter needs --group)")
            })?;
            let row = outbox
                .get(&mut conn, &service, id)
                .await?
                .filter(|r| r.status == Status::Dead)
                .ok_or_else(|| format!("no dead row {id} in service `{service}`"))?;
            let mut v = row_json(&row);
            v["payload"] = serde_json::from_str(&row.payload).unwrap_or(json!(row.payload));
            v["headers"] = serde_json::from_str(&row.headers).unwrap_or(json!(row.headers));
            v["topic"] = json!(row.topic);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Dead::List(f) => {
            let rows = matching(outbox, &mut conn, services, &f).await?;
            print_rows(&rows, json_out)?;
        }
        Dead::Replay {
            filter, dry_run, ..
        }
        | Dead::Discard { filter, dry_run }
            if dry_run =>
        {
            let rows = matching(outbox, &mut conn, services, &filter).await?;
            if json_out {
                println!(
                    "{}",
                    json!({ "dry_run": true, "would_change": rows.len(), "rows": rows.iter().map(row_json).collect::<Vec<_>>() })
                );
            } else {
                print_rows(&rows, false)?;
                println!(
                    "dry run: {} rows would change; nothing was changed",
                    rows.len()
                );
            }
        }
        Dead::Replay { filter, .. } => {
            let rows = matching(outbox, &mut conn, services, &filter).await?;
            let n = act(outbox, &mut conn, &rows, true).await?;
            report(json_out, "replayed", n)?;
        }
        Dead::Discard { filter, .. } => {
            let rows = matching(outbox, &mut conn, services, &filter).await?;
            let n = act(outbox, &mut conn, &rows, false).await?;
            report(json_out, "discarded", n)?;
        }
    }
    Ok(())
}

/// The consumer group whose inbox dead letters a `dead` command is about, if any.
fn dead_group(cmd: &Dead) -> Option<&str> {
    match cmd {
        Dead::Show { group, .. } => group.as_deref(),
        Dead::List(f) | Dead::Replay { filter: f, .. } | Dead::Discard { filter: f, .. } => {
            f.group.as_deref()
        }
    }
}

/// Inbox dead letters of `group` that match `f`, by event id.
async fn inbox_matching<DB: Backend>(
    outbox: &Outbox<DB>,
    conn: &mut DB::Connection,
    group: &str,
    f: &Filter,
) -> Result<Vec<InboxDead>, BoxError> {
    if f.from_id.is_some() || f.to_id.is_some() {
        return Err("--from-id and --to-id select rows; inbox dead letters have event ids".into());
    }
    let cutoff = f
        .older_than
        .map(|d| outbox.now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = outbox.list_inbox_dead(conn, group, &after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.event_id.clone();
        for d in page {
            let keep = f.event_type.as_ref().is_none_or(|t| *t == d.event_type)
                && f.reason.as_ref().is_none_or(|r| {
                    d.reason.contains(r.as_str()) || d.last_error.contains(r.as_str())
                })
                && cutoff.is_none_or(|c| d.dead_at < c);
            if keep && out.len() < f.limit {
                out.push(d);
            }
        }
        if out.len() >= f.limit {
            break;
        }
    }
    Ok(out)
}

fn inbox_json(d: &InboxDead) -> serde_json::Value {
    json!({
        "group": d.group,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "event_version": d.event_version,
        "topic": d.topic,
        "message_key": d.message_key,
        "reason": d.reason,
        "last_error": d.last_error,
        "attempts": d.attempts,
        "dead_at": d.dead_at,
    })
}

fn print_inbox(dead: &[InboxDead], json_out: bool) -> Result<(), BoxError> {
    if json_out {
        let v: Vec<_> = dead.iter().map(inbox_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<32} {:>2}  {:<20} last error",
        "event id", "event type", "v", "reason"
    );
    for d in dead {
        let err: String = d.last_error.chars().take(70).collect();
        let line = format!(
            "{:<36}  {:<32} {:>2}  {:<20} {err}",
            d.event_id, d.event_type, d.event_version, d.reason
        );
        println!("{}", line.trim_end());
    }
    Ok(())
}

/// `outbox dead … --group G`: the dead letters an inbox consumer kept in its own database.
async fn inbox_dead_letters<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    group: &str,
    cmd: Dead,
    kafka: impl FnOnce(Option<String>) -> Option<KafkaConfig>,
    json_out: bool,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    match cmd {
        Dead::Show { id, .. } => {
            let d = outbox
                .inbox_dead(&mut conn, group, &id)
                .await?
                .ok_or_else(|| format!("no inbox dead letter {id} in group `{group}`"))?;
            let mut v = inbox_json(&d);
            v["envelope"] = serde_json::from_str(&d.envelope).unwrap_or(json!(d.envelope));
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Dead::List(f) => {
            let dead = inbox_matching(outbox, &mut conn, group, &f).await?;
            print_inbox(&dead, json_out)?;
        }
        Dead::Replay {
            filter, dry_run, ..
        }
        | Dead::Discard { filter, dry_run }
            if dry_run =>
        {
            let dead = inbox_matching(outbox, &mut conn, group, &filter).await?;
            if json_out {
                let v: Vec<_> = dead.iter().map(inbox_json).collect();
                println!(
                    "{}",
                    json!({ "dry_run": true, "would_change": dead.len(), "dead_letters": v })
                );
            } else {
                print_inbox(&dead, false)?;
                println!(
                    "dry run: {} dead letters would change; nothing was changed",
                    dead.len()
                );
            }
        }
        Dead::Replay {
            filter, brokers, ..
        } => {
            let kafka = kafka(brokers).ok_or(
                "replaying inbox dead letters publishes their envelopes again: give --brokers or set OUTBOX_BROKERS",
            )?;
            let bus = KafkaBus::new(kafka)?;
            let dead = inbox_matching(outbox, &mut conn, group, &filter).await?;
            drop(conn);
            let mut n = 0u64;
            for d in dead {
                // Forgotten and published together: a failed publish leaves it dead.
                let mut tx = pool.begin().await?;
                let Some(taken) = outbox.take_inbox_dead(&mut tx, group, &d.event_id).await? else {
                    continue;
                };
                let record = Outgoing {
                    topic: taken.topic.clone(),
                    key: taken.message_key.clone(),
                    value: taken.envelope.into_bytes(),
                    headers: Vec::new(),
                };
                bus.send(&record).await.map_err(|e| {
                    format!("publishing {} again failed: {e}; it stays dead", d.event_id)
                })?;
                tx.commit().await?;
                n += 1;
            }
            report(json_out, "replayed", n)?;
        }
        Dead::Discard { filter, .. } => {
            let dead = inbox_matching(outbox, &mut conn, group, &filter).await?;
            let mut n = 0u64;
            for d in dead {
                n += u64::from(
                    outbox
                        .discard_inbox_dead(&mut conn, group, &d.event_id)
                        .await?,
                );
            }
            report(json_out, "discarded", n)?;
        }
    }
    Ok(())
}

async fn act<DB: Backend>(
    outbox: &Outbox<DB>,
    conn: &mut DB::Connection,
    rows: &[OutboxRow],
    replay: bool,
) -> Result<u64, BoxError> {
    let mut by_service: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for r in rows {
        by_service.entry(&r.service).or_default().push(r.id);
    }
    let mut n = 0;
    for (service, ids) in by_service {
        n += if replay {
            outbox.replay_dead(conn, service, &ids).await?
        } else {
            outbox.discard_dead(conn, service, &ids).await?
        };
    }
    Ok(n)
}

fn report(json_out: bool, what: &str, n: u64) -> Result<(), BoxError> {
    if json_out {
        println!("{}", json!({ what: n }));
    } else {
        println!("{what} {n} rows");
    }
    Ok(())
}

fn print_rows(rows: &[OutboxRow], json_out: bool) -> Result<(), BoxError> {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows.iter().map(row_json).collect::<Vec<_>>())?
        );
        return Ok(());
    }
    println!(
        "{:<14} {:>6}  {:<32} {:>2}  {:<20} last error",
        "service", "id", "event type", "v", "reason"
    );
    for r in rows {
        let err = r.last_error.as_deref().unwrap_or("");
        let err: String = err.chars().take(70).collect();
        let line = format!(
            "{:<14} {:>6}  {:<32} {:>2}  {:<20} {err}",
            r.service,
            r.id,
            r.event_type,
            r.event_version,
            r.dead_reason.as_deref().unwrap_or("-")
        );
        println!("{}", line.trim_end());
    }
    Ok(())
}

async fn relay<DB: Backend>(
    outbox: Outbox<DB>,
    pool: Pool<DB>,
    brokers: String,
    metrics_addr: Option<String>,
    config: &Config,
    database_url: &str,
) -> Result<(), BoxError> {
    let exporter = prometheus::exporter()?;
    match &metrics_addr {
        Some(addr) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|e| format!("--metrics-addr `{addr}`: {e}"))?;
            exporter
                .with_http_listener(addr)
                .install()
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
            eprintln!("outbox: metrics on http://{addr}/metrics");
        }
        None => {
            exporter
                .install_recorder()
                .map_err(|e| format!("metrics: {e}"))?;
        }
    }
    let (kafka, relay) = relay_settings(config, &brokers, &outbox, Some(database_url))?;
    let services: Vec<String> = outbox
        .catalog()
        .services()
        .map(|r| r.service.clone())
        .collect();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("outbox: stopping; finishing the batch in flight");
    };
    eprintln!("outbox: relaying {}", services.join(", "));
    // Runs until SIGTERM or Ctrl-C, or until the relay fails: then the error is the exit.
    Engine::builder(pool, kafka)
        .outbox(outbox)
        .relay(relay)
        .run(stop)
        .await?;
    eprintln!("outbox: stopped");
    Ok(())
}

/// The relay daemon's Kafka and relay settings from the config file.
fn relay_settings<DB: Backend>(
    config: &Config,
    brokers: &str,
    outbox: &Outbox<DB>,
    database_url: Option<&str>,
) -> Result<(KafkaConfig, RelayConfig), BoxError> {
    let mut kafka = KafkaConfig::new(brokers);
    for (k, v) in &config.kafka {
        kafka = kafka.set(k, v);
    }
    let r = &config.relay;
    for (key, value) in [
        ("topic_partitions", r.topic_partitions),
        ("topic_replication", r.topic_replication),
    ] {
        if let Some(n) = value.filter(|n| *n < 1) {
            return Err(format!("relay.{key} must be at least 1, not {n}").into());
        }
    }
    if let Some(n) = r.topic_partitions {
        kafka = kafka.partitions(n);
    }
    if let Some(n) = r.topic_replication {
        kafka = kafka.replication(n);
    }
    if let Some(create) = r.create_topics {
        kafka = kafka.create_topics(create);
    }
    let mut relay = RelayConfig::default();
    if let Some(batch) = r.batch {
        relay = relay.batch(batch);
    }
    if let Some(secs) = r.lease_secs {
        relay = relay.lease(Duration::from_secs(secs));
    }
    if let Some(ms) = r.poll_ms {
        relay = relay.poll_interval(Duration::from_millis(ms));
    }
    if let Some(spelling) = r.version_format {
        relay = relay.version_format(spelling.into());
    }
    for (service, spelling) in &r.version_formats {
        if outbox.catalog().service(service).is_none() {
            return Err(format!(
                "relay.version_formats names service `{service}`, which is not configured"
            )
            .into());
        }
        relay = relay.service_version_format(service, (*spelling).into());
    }
    if let Some(read) = r.wal_read {
        relay = relay.wal_read(match read {
            WalReadFile::Stream => WalRead::Stream,
            WalReadFile::Sql => WalRead::Sql,
        });
    }
    // The pool does not tell its password: the stream takes it from the URL.
    let replication = r
        .replication_url
        .as_deref()
        .or(database_url.filter(|u| u.starts_with("postgres")));
    if let Some(url) = replication {
        relay = relay.replication_url(url);
    }
    Ok((kafka, relay))
}

/// `url` with its password (in the authority or a `password=` parameter) replaced by `***`, for
/// messages.
fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

fn schema_check(base: &PathBuf, head: &PathBuf, json_out: bool) -> Result<(), BoxError> {
    for dir in [base, head] {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory of schemas", dir.display()).into());
        }
    }
    let breaks = outbox_runtime::schema::compare(base, head)?;
    if json_out {
        let out: Vec<_> = breaks
            .iter()
            .map(|b| json!({ "event_type": b.event_type, "version": b.version, "path": b.path, "change": b.change }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if breaks.is_empty() {
        println!("compatible: no existing event version changed incompatibly");
    } else {
        for b in &breaks {
            println!("BREAK {b}");
        }
    }
    if breaks.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} incompatible change(s); publish the new shape as a new version instead",
            breaks.len()
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_turns_topic_creation_off_and_sets_version_spellings_per_service() {
        let config: Config = serde_json::from_value(json!({
            "relay": {
                "create_topics": false,
                "version_format": "prefixed",
                "version_formats": { "notification": "number" }
            }
        }))
        .unwrap();
        let catalog = Catalog::builder(RouteConfig::new())
            .service_by_name("notification")
            .unwrap()
            .service_by_name("task")
            .unwrap()
            .build();
        let outbox = Outbox::<outbox_runtime::sqlx::Sqlite>::new(catalog);
        let (kafka, relay) = relay_settings(&config, "b:9092", &outbox, None).unwrap();
        assert!(
            format!("{kafka:?}").contains("create_topics: false"),
            "{kafka:?}"
        );
        assert_eq!(relay.version_format_of("task"), VersionFormat::Prefixed);
        assert_eq!(
            relay.version_format_of("notification"),
            VersionFormat::Number
        );

        let unknown: Config = serde_json::from_value(json!({
            "relay": { "version_formats": { "billing": "prefixed" } }
        }))
        .unwrap();
        let err = relay_settings(&unknown, "b:9092", &outbox, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "relay.version_formats names service `billing`, which is not configured"
        );
        let bad = serde_json::from_value::<Config>(json!({ "relay": { "version_format": "v" } }));
        assert!(bad.is_err());
    }

    #[test]
    fn the_relay_streams_wal_services_with_the_database_urls_credentials_unless_told_otherwise() {
        let catalog = Catalog::builder(RouteConfig::new())
            .service_by_name("task")
            .unwrap()
            .build();
        let outbox = Outbox::<outbox_runtime::sqlx::Sqlite>::new(catalog);
        let url = Some("postgres://relay:s3cret@db/app");
        let (_, relay) = relay_settings(&Config::default(), "b:9092", &outbox, url).unwrap();
        let shown = format!("{relay:?}");
        assert!(shown.contains("wal_read: Stream"), "{shown}");
        assert!(shown.contains("replication_url: Some"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        // Not a PostgreSQL URL: no replication stream.
        let sqlite = relay_settings(&Config::default(), "b:9092", &outbox, Some("sqlite://x.db"));
        assert!(format!("{:?}", sqlite.unwrap().1).contains("replication_url: None"));
        let config: Config = serde_json::from_value(json!({
            "relay": { "wal_read": "sql", "replication_url": "postgres://other@db/app" }
        }))
        .unwrap();
        let (_, relay) = relay_settings(&config, "b:9092", &outbox, url).unwrap();
        let shown = format!("{relay:?}");
        assert!(shown.contains("wal_read: Sql"), "{shown}");
        assert!(
            serde_json::from_value::<Config>(json!({ "relay": { "wal_read": "peek" } })).is_err()
        );
    }

    #[test]
    fn database_urls_lose_their_passwords_in_messages() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/test?password=hunter2&x=1"),
            "mysql://root@127.0.0.1/test?password=***&x=1"
        );
        assert_eq!(redact_url("sqlite://app.db"), "sqlite://app.db");
        assert_eq!(
            redact_url("oracle://u:p@w:rd@h/db"),
            "oracle://u:***@h/db",
            "the last @ ends the user info"
        );
    }
}
