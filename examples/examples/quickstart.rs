//! The quickstart: three services of the reference contracts exchange a few thousand events
//! through the outbox and Kafka, exactly once in effect, with the usual troubles mixed in:
//! a malformed payload, a version no consumer accepts, and a handler that fails twice before
//! it succeeds.
//!
//! `cargo run --release -p examples --example quickstart` runs on the embedded default: a SQLite
//! file and rdkafka's in-process mock cluster, no servers. Options:
//!
//! - `--database-url URL`: `postgres://…`, `mysql://…` or `sqlite://…` instead of the file;
//! - `--brokers HOST:PORT,…`: a real Kafka-compatible broker instead of the mock cluster;
//! - `--events N`: how many events to write (default 3000).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use contracts::notification::{FeishuRequested, FeishuRequestedV2};
use contracts::task::TaskUrgencyPromoteRequested;
use contracts::token_store::{CreditChargeRequested, ForumPostImported, ForumPostLiked};
use contracts::{
    NotificationEvents, NotificationEventsHandler, TaskEvents, TaskEventsHandler, TokenStoreEvents,
    TokenStoreEventsHandler, samples,
};
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::{Arg, Backend, StoreConfig};
use outbox_runtime::{Catalog, HandlerError, Outbox, RouteConfig, Status};
use outbox_runtime::{ConsumerConfig, Context, Engine, KafkaConfig, RelayConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The preview whose handler fails twice before it succeeds.
const FLAKY: &str = "pv-flaky";

struct Notifier {
    flaky_failures: AtomicU32,
}

impl<DB: Backend> NotificationEventsHandler<Context<DB>> for Notifier {
    async fn feishu_requested(
        &self,
        ctx: &mut Context<DB>,
        e: FeishuRequested,
    ) -> Result<(), HandlerError> {
        if e.preview_id == FLAKY && self.flaky_failures.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(HandlerError::retry("feishu api answered 502"));
        }
        record(ctx, "feishu", &e.preview_id).await
    }

    async fn feishu_requested_v2(
        &self,
        ctx: &mut Context<DB>,
        e: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        record(ctx, "feishu-card", &e.preview_id).await
    }
}

struct Tasks;

impl<DB: Backend> TaskEventsHandler<Context<DB>> for Tasks {
    async fn task_urgency_promote_requested(
        &self,
        ctx: &mut Context<DB>,
        e: TaskUrgencyPromoteRequested,
    ) -> Result<(), HandlerError> {
        record(ctx, "promote", &e.user_id.to_string()).await
    }
}

struct Ledger;

impl<DB: Backend> TokenStoreEventsHandler<Context<DB>> for Ledger {
    async fn forum_post_liked(
        &self,
        ctx: &mut Context<DB>,
        e: ForumPostLiked,
    ) -> Result<(), HandlerError> {
        record(ctx, "reward-like", &e.event_id).await
    }

    async fn forum_post_imported(
        &self,
        ctx: &mut Context<DB>,
        e: ForumPostImported,
    ) -> Result<(), HandlerError> {
        record(ctx, "reward-import", &e.event_id).await
    }

    async fn credit_charge_requested(
        &self,
        ctx: &mut Context<DB>,
        e: CreditChargeRequested,
    ) -> Result<(), HandlerError> {
        record(ctx, "charge", &e.event_id).await
    }
}

/// The handlers' effect: one row in `quickstart_effects`, in the transaction that marks the
/// event consumed. Its primary key is the event id, so a second effect would fail loudly.
async fn record<DB: Backend>(
    ctx: &mut Context<DB>,
    kind: &str,
    what: &str,
) -> Result<(), HandlerError> {
    let sql = DB::dialect_sql(
        "INSERT INTO quickstart_effects (event_id, kind, what) VALUES ($1, $2, $3)",
    );
    let args = vec![
        Arg::Str(ctx.meta().event_id.clone()),
        Arg::Str(kind.to_owned()),
        Arg::Str(what.to_owned()),
    ];
    DB::execute(ctx.tx(), &sql, args).await?;
    Ok(())
}

struct Options {
    database_url: Option<String>,
    brokers: Option<String>,
    events: usize,
}

fn options() -> Result<Options, BoxError> {
    let mut o = Options {
        database_url: None,
        brokers: None,
        events: 3000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--database-url" => o.database_url = Some(value()?),
            "--brokers" => o.brokers = Some(value()?),
            "--events" => o.events = value()?.parse()?,
            "-h" | "--help" => {
                println!("usage: quickstart [--database-url URL] [--brokers HOSTS] [--events N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option `{other}`; see --help").into()),
        }
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let o = options()?;
    let (kafka, brokers) = match o.brokers.as_deref() {
        Some(b) => (KafkaConfig::new(b), b),
        None => (KafkaConfig::mock(), "rdkafka's mock cluster"),
    };
    // The embedded default: a SQLite file, removed at the end.
    let default_db =
        std::env::temp_dir().join(format!("outbox-quickstart-{}.db", std::process::id()));
    let url = o
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", default_db.display()));
    println!(
        "outbox quickstart: {} events, database {url}, brokers {brokers}",
        o.events
    );
    if url.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await?;
        run(pool, kafka.clone(), o.events).await
    } else if url.starts_with("mysql") {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await?;
        run(pool, kafka.clone(), o.events).await
    } else if url.starts_with("sqlite") {
        use std::str::FromStr;
        let pool =
            examples::sqlite_pool(sqlx::sqlite::SqliteConnectOptions::from_str(&url)?).await?;
        let result = run(pool, kafka.clone(), o.events).await;
        if o.database_url.is_none() {
            examples::remove_sqlite(&default_db);
        }
        result
    } else {
        Err(format!("unsupported database URL `{url}`").into())
    }
}

async fn run<DB: Backend>(
    pool: Pool<DB>,
    kafka: KafkaConfig,
    total: usize,
) -> Result<(), BoxError> {
    let run_id = format!("{:06x}", fastrand::u32(..1 << 24));
    // Fresh tables and topics per run, so runs against a shared server do not mix.
    let mut routes = RouteConfig::new().prefix(&format!("quickstart-{run_id}"))?;
    for service in ["notification", "task", "token-store"] {
        let table = format!("q{run_id}_{}_outbox", service.replace('-', "_"));
        routes = routes.override_service(
            service,
            outbox_runtime::route::RouteOverride::default().table(table),
        )?;
    }
    let catalog = Catalog::builder(routes)
        .service::<NotificationEvents>()?
        .service::<TaskEvents>()?
        .service::<TokenStoreEvents>()?
        .build();
    let outbox = Outbox::<DB>::builder(catalog)
        .config(StoreConfig::default().backoff_base(Duration::from_millis(200)))
        .build();
    {
        let mut conn = pool.acquire().await?;
        outbox.migrate(&mut conn).await?;
        DB::execute(
            &mut conn,
            "DROP TABLE IF EXISTS quickstart_effects",
            Vec::new(),
        )
        .await?;
        DB::execute(
            &mut conn,
            "CREATE TABLE quickstart_effects (event_id VARCHAR(36) PRIMARY KEY, kind VARCHAR(32) NOT NULL, what VARCHAR(200) NOT NULL)",
            Vec::new(),
        )
        .await?;
    }

    let consumers = ConsumerConfig::default().dlq(true);
    let joining = Instant::now();
    let running = Engine::builder(pool.clone(), kafka)
        .outbox(outbox.clone())
        .relay(RelayConfig::default().poll_interval(Duration::from_millis(200)))
        .consumer_with::<NotificationEvents, _>(
            Notifier {
                flaky_failures: AtomicU32::new(0),
            },
            consumers.clone(),
        )
        .consumer_with::<TaskEvents, _>(Tasks, consumers.clone())
        .consumer_with::<TokenStoreEvents, _>(Ledger, consumers)
        .start()
        .await?;
    if !running.ready(Duration::from_secs(30)).await {
        return Err("the consumers did not join their groups within 30 s".into());
    }
    println!(
        "relay and 3 consumers running (groups joined in {:.1} s)",
        joining.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let writers = 4;
    let per_writer = total / writers;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        tasks.spawn(async move {
            for i in 0..per_writer {
                let n = (w * per_writer + i) as u64;
                let mut tx = pool.begin().await?;
                match n % 6 {
                    0 => outbox.enqueue(&mut *tx, &samples::feishu(n)).await?,
                    1 => outbox.enqueue(&mut *tx, &samples::feishu_v2(n)).await?,
                    2 => outbox.enqueue(&mut *tx, &samples::urgency(n)).await?,
                    3 => outbox.enqueue(&mut *tx, &samples::liked(n)).await?,
                    4 => outbox.enqueue(&mut *tx, &samples::imported(n)).await?,
                    _ => outbox.enqueue(&mut *tx, &samples::charge(n)).await?,
                };
                tx.commit().await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    // The troublemakers.
    let mut flaky = samples::feishu(1_000_000);
    flaky.preview_id = FLAKY.into();
    let mut conn = pool.acquire().await?;
    outbox.enqueue(&mut conn, &flaky).await?;
    let table = outbox
        .catalog()
        .service("notification")
        .map(|r| r.table.clone())
        .unwrap_or_default();
    let topic = outbox
        .catalog()
        .service("notification")
        .map(|r| r.topic.clone())
        .unwrap_or_default();
    raw_insert::<DB>(&mut conn, &table, &topic, 1, "{\"user_id\": \"seven\"}").await?;
    raw_insert::<DB>(
        &mut conn,
        &table,
        &topic,
        7,
        &String::from_utf8(outbox_runtime::OutboxEvent::to_payload(&samples::feishu(
            3,
        ))?)?,
    )
    .await?;
    drop(conn);
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let expected = (per_writer * writers + 3) as i64;

    // Progress until every event is consumed or dead.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut shown = -1;
    loop {
        let mut conn = pool.acquire().await?;
        let stats = outbox.stats(&mut conn).await?;
        drop(conn);
        let done: i64 = stats
            .iter()
            .map(|s| s.counts[&Status::Consumed] + s.counts[&Status::Dead])
            .sum();
        if done != shown {
            progress(done, expected);
            shown = done;
        }
        if done >= expected {
            break;
        }
        if Instant::now() > deadline {
            println!();
            return Err(format!("only {done} of {expected} events finished in 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    println!();
    let stopping = Instant::now();
    running.shutdown().await?;
    println!("shut down in {:.1} s", stopping.elapsed().as_secs_f64());
    report(&outbox, &pool, expected, elapsed).await
}

/// A row written by hand, as a buggy or legacy producer would: no validation.
async fn raw_insert<DB: Backend>(
    conn: &mut DB::Connection,
    table: &str,
    topic: &str,
    version: i64,
    payload: &str,
) -> Result<(), BoxError> {
    let now = outbox_runtime::store::Clock::now_ms(&outbox_runtime::store::SystemClock);
    let sql = format!(
        "INSERT INTO {table} (event_id, event_type, event_version, service_name, topic, message_key, aggregate_id, payload, headers, status, attempts, max_attempts, next_attempt_at, created_at, updated_at) VALUES ($1, 'notification.feishu.requested', $2, 'notification', $3, NULL, NULL, $4, '{{}}', 'pending', 0, 20, $5, $6, $7)"
    );
    let sql = DB::dialect_sql(&sql);
    let event_id = format!("0190c3c0-0000-7000-8000-{:012x}", fastrand::u64(..1 << 48));
    let args = vec![
        Arg::Str(event_id),
        Arg::I64(version),
        Arg::Str(topic.to_owned()),
        Arg::Str(payload.to_owned()),
        Arg::I64(now),
        Arg::I64(now),
        Arg::I64(now),
    ];
    DB::execute(conn, &sql, args).await?;
    Ok(())
}

fn progress(done: i64, total: i64) {
    let width = 40;
    let filled = (done.min(total) * width / total.max(1)) as usize;
    print!(
        "\r[{}{}] {done}/{total} events consumed or dead",
        "#".repeat(filled),
        ".".repeat(width as usize - filled)
    );
    let _ = std::io::stdout().flush();
}

async fn report<DB: Backend>(
    outbox: &Outbox<DB>,
    pool: &Pool<DB>,
    total: i64,
    elapsed: Duration,
) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    let stats = outbox.stats(&mut conn).await?;
    println!(
        "\n{:<14} {:>9} {:>9} {:>8} {:>5}  {:>8} {:>8}  dead reasons",
        "service", "published", "consumed", "retried", "dead", "p50 ms", "p99 ms"
    );
    for s in &stats {
        let table = &s.table;
        let mut latencies: Vec<i64> = DB::fetch_ints(
            &mut conn,
            &format!("SELECT consumed_at - created_at FROM {table} WHERE status = 'consumed'"),
            Vec::new(),
        )
        .await?
        .into_iter()
        .flatten()
        .collect();
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let retried: i64 = DB::fetch_ints(
            &mut conn,
            // `id - id` makes the column BIGINT on every backend (`attempts` is INTEGER).
            &format!("SELECT id - id + attempts - 1 FROM {table} WHERE attempts > 1"),
            Vec::new(),
        )
        .await?
        .into_iter()
        .flatten()
        .sum();
        let published: i64 = DB::fetch_ints(
            &mut conn,
            &format!(
                "SELECT COUNT(*) FROM {table} WHERE published_at IS NOT NULL OR status = 'consumed'"
            ),
            Vec::new(),
        )
        .await?
        .into_iter()
        .flatten()
        .sum();
        let reasons: Vec<String> = s
            .dead_by_reason
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        println!(
            "{:<14} {:>9} {:>9} {:>8} {:>5}  {:>8} {:>8}  {}",
            s.service,
            published,
            s.counts[&Status::Consumed],
            retried,
            s.counts[&Status::Dead],
            pct(0.5),
            pct(0.99),
            reasons.join(", ")
        );
    }
    let effects: i64 = DB::fetch_ints(
        &mut conn,
        "SELECT COUNT(*) FROM quickstart_effects",
        Vec::new(),
    )
    .await?
    .into_iter()
    .flatten()
    .sum();
    let consumed: i64 = stats.iter().map(|s| s.counts[&Status::Consumed]).sum();
    println!(
        "\n{total} events in {:.1} s ({:.0} events/s end to end); {effects} effects for {consumed} consumed events{}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        if effects == consumed {
            ", none twice"
        } else {
            " (MISMATCH)"
        }
    );
    if effects != consumed {
        return Err("effects and consumed events differ".into());
    }
    Ok(())
}
