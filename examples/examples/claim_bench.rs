//! Claim throughput of the outbox store: rows per second through claim (batch 500) and
//! mark-published, with one claimer and with four, on each backend.
//!
//! `cargo run --release -p examples --example claim_bench -- [--rows N] [--backend NAME]...`
//!
//! Backends: `postgres` (`OUTBOX_BENCH_POSTGRES_URL`, default the local server's `test`
//! database), `mysql` (`OUTBOX_BENCH_MYSQL_URL`, default the local MariaDB's `test` database),
//! `sqlite` (a file in the temp directory). All three by default.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::Backend;
use outbox_runtime::{Catalog, Outbox, RouteConfig};

const BATCH: usize = 500;
const LEASE: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut rows = 50_000usize;
    let mut backends = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => rows = args.next().ok_or("--rows needs a number")?.parse()?,
            "--backend" => backends.push(args.next().ok_or("--backend needs a name")?),
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    if backends.is_empty() {
        backends = vec!["postgres".into(), "mysql".into(), "sqlite".into()];
    }
    println!("claim throughput, batch {BATCH}, {rows} rows per run");
    println!("{:<10} {:>9} {:>14}", "backend", "claimers", "rows/s");
    for backend in backends {
        match backend.as_str() {
            "postgres" => {
                let url = std::env::var("OUTBOX_BENCH_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(8)
                    .connect(&url)
                    .await?;
                run("postgres", pool, rows).await?;
            }
            "mysql" => {
                let url = std::env::var("OUTBOX_BENCH_MYSQL_URL")
                    .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(8)
                    .connect(&url)
                    .await?;
                run("mysql", pool, rows).await?;
            }
            "sqlite" => {
                let path =
                    std::env::temp_dir().join(format!("outbox-bench-{}.db", std::process::id()));
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
                run("sqlite", examples::sqlite_pool(options).await?, rows).await?;
                examples::remove_sqlite(&path);
            }
            other => return Err(format!("unknown backend `{other}`").into()),
        }
    }
    Ok(())
}

async fn run<DB: Backend>(name: &str, pool: Pool<DB>, rows: usize) -> Result<(), BoxError> {
    for claimers in [1usize, 4] {
        let table = format!("bench_{}_outbox", std::process::id());
        let over = RouteOverride::default().table(table.clone());
        let routes = RouteConfig::new().override_service("task", over)?;
        let catalog = Catalog::builder(routes)
            .service::<contracts::TaskEvents>()?
            .build();
        let outbox = Outbox::<DB>::new(catalog);
        let mut conn = pool.acquire().await?;
        DB::execute(
            &mut conn,
            &format!("DROP TABLE IF EXISTS {table}"),
            Vec::new(),
        )
        .await?;
        outbox.migrate(&mut conn).await?;
        drop(conn);
        // Many keys, as in production: per-key order holds back at most one row per key.
        let events: Vec<_> = (0..rows as u64)
            .map(|n| {
                let mut e = contracts::samples::urgency(n);
                e.user_id = 1 + n;
                e
            })
            .collect();
        for chunk in events.chunks(1000) {
            let mut tx = pool.begin().await?;
            outbox.enqueue_all(&mut *tx, chunk).await?;
            tx.commit().await?;
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..claimers {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            tasks.push(tokio::spawn(async move {
                let owner = format!("bench-{c}");
                let mut done = 0usize;
                loop {
                    let mut conn = pool.acquire().await?;
                    let claimed = outbox
                        .claim(&mut conn, "task", &owner, BATCH, LEASE)
                        .await?;
                    if claimed.is_empty() {
                        return Ok::<usize, outbox_runtime::Error>(done);
                    }
                    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
                    outbox
                        .mark_published(&mut conn, "task", &owner, &ids)
                        .await?;
                    done += ids.len();
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        if total != rows {
            return Err(format!("{name}: claimed {total} of {rows} rows").into());
        }
        println!("{name:<10} {claimers:>9} {:>14.0}", total as f64 / secs);
        let mut conn = pool.acquire().await?;
        DB::execute(
            &mut conn,
            &format!("DROP TABLE IF EXISTS {table}"),
            Vec::new(),
        )
        .await?;
    }
    Ok(())
}
