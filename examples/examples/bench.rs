//! Throughput and latency of each stage, against the limits of the database and the broker, and
//! against the Go system's algorithm, in one run.
//!
//! `cargo run --release -p examples --example bench -- [--backend postgres|mysql|sqlite]
//!  [--database-url URL] [--brokers HOSTS] [--events N] [--writers C] [--backlog N]
//!  [--only SCENARIO,...] [--rounds R] [--json]`
//!
//! Without `--brokers` it uses rdkafka's in-process mock cluster. With `--rounds R` it runs the
//! chosen scenarios R times, one round after another, prints each round, then each scenario's
//! median and range and, for each ratio the project sets a target on, the ratio in every round
//! and its median: on a machine whose rates move by a fifth from one minute to the next, one
//! round decides little near a target. Each row gives, on Linux, the CPU an event cost (the
//! machine's, the database server's, this process's) and the share the host took back (steal),
//! and each targeted ratio is given by CPU per event too (see [`CpuUse`]). Scenarios:
//! - `raw_produce`: the producer alone, envelope-sized messages: the broker's limit;
//! - `raw_insert`: single-row insert transactions from C writers: the database's limit;
//! - `enqueue`: a business row plus one event per transaction, C writers;
//! - `relay`: a backlog of N published by one relay;
//! - `e2e`: writers at full speed with a relay and a consumer running: consumed per second and
//!   enqueue-to-consumed latency;
//! - `e2e_writers`, `e2e_writers_relay`: `e2e`'s writers alone (an event per transaction, no
//!   business row), and with a relay running beside them: what of `e2e`'s cost is the
//!   writers', and what the relay's;
//! - `e2e_inbox`: the same with the consumer recording applied events in the inbox
//!   (`Dedupe::Inbox`, the mode of a consumer with its own database), beside `e2e`'s consumer in
//!   the shared database: latency is enqueue to the inbox record;
//! - `e2e_calls`: the same with a handler that runs outside any transaction (claim, commit,
//!   call, mark);
//! - `seed_mode`: the same end to end with the Go system's algorithm (one row at a time: select
//!   due, synchronous produce, update; one consumer transaction per message);
//! - `wal_enqueue`, `wal_e2e` (PostgreSQL): `enqueue`, and end to end with `raw_insert`'s
//!   writers and an inbox consumer in a database of its own on the same server
//!   (`outbox_bench_consumer`, made when missing), for a service relayed from the write-ahead
//!   log (its events emitted into the log, no row, the relay streaming the slot);
//!   `wal_relay`: the relay daemon draining a backlog of `--backlog` events (100,000 by
//!   default) by streaming the slot, and `wal_relay_sql` the same through the SQL interface,
//!   one round after another;
//!   `wal_enqueue_read`: `wal_enqueue` while a reader that publishes nothing streams the slot,
//!   the server's share of `wal_e2e`'s cost (its WAL sender decodes each transaction);
//! - `relay_backlog`: one relay draining a backlog of `--backlog` rows (1,000,000 by default
//!   with `--brokers`, 200,000 with the mock cluster), with the process's peak memory while it
//!   does (with the mock cluster, that includes the in-process broker holding every message).
#![allow(clippy::print_stdout, clippy::print_stderr)]

/// The allocator of the `outbox` daemon, jemalloc, so that the relay runs here as it runs
/// there; `--no-default-features` measures on the system's allocator.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use contracts::task::TaskUrgencyPromoteRequested;
use contracts::{TaskEvents, TaskEventsHandler, samples};
use outbox_runtime::bus::{KafkaBus, KafkaConfig, Outgoing, Publish, Sent};
use outbox_runtime::consumer::{Call, ConsumerConfig, Context, Dedupe};
use outbox_runtime::envelope::{self, VersionFormat};
use outbox_runtime::relay::{Relay, RelayConfig, Shutdown};
use outbox_runtime::route::RouteOverride;
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::{Arg, Backend};
use outbox_runtime::{Catalog, Engine, HandlerError, Outbox, RouteConfig, Status};
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
use examples::Mock;

struct Options {
    backend: String,
    url: Option<String>,
    brokers: Option<String>,
    events: usize,
    writers: usize,
    /// `None`: the default for the broker.
    backlog: Option<usize>,
    /// Scenarios to run; empty: all.
    only: Vec<String>,
    /// How many times to run the chosen scenarios.
    rounds: usize,
    json: bool,
}

impl Options {
    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// One result line.
struct Row {
    scenario: &'static str,
    events_per_sec: f64,
    latencies_ms: Vec<f64>,
    /// Peak memory of the process during this scenario.
    peak_rss_mb: Option<f64>,
    /// The CPU the machine spent per event while it ran (Linux).
    cpu: Option<CpuUse>,
}

fn options() -> Result<Options, BoxError> {
    let mut o = Options {
        backend: "sqlite".into(),
        url: None,
        brokers: None,
        events: 5000,
        writers: 4,
        backlog: None,
        only: Vec::new(),
        rounds: 1,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--backend" => o.backend = value()?,
            "--database-url" => o.url = Some(value()?),
            "--brokers" => o.brokers = Some(value()?),
            "--events" => o.events = value()?.parse()?,
            "--writers" => o.writers = value()?.parse()?,
            "--backlog" => o.backlog = Some(value()?.parse()?),
            "--only" => o.only = value()?.split(',').map(str::to_owned).collect(),
            "--rounds" => o.rounds = value()?.parse::<usize>()?.max(1),
            "--json" => o.json = true,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let o = options()?;
    let (brokers, mock) = examples::brokers(o.brokers.as_deref())?;
    let rows = match o.backend.as_str() {
        "postgres" => {
            let url = o
                .url
                .clone()
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(16)
                .connect_with(options.clone())
                .await?;
            // Made only for the scenario that uses it.
            let consumer = if o.runs("wal_e2e") {
                Some(consumer_database(&pool, options).await?)
            } else {
                None
            };
            rounds(pool, consumer, &brokers, mock.as_ref(), &o).await?
        }
        "mysql" => {
            let url = o
                .url
                .clone()
                .unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".into());
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(16)
                .connect(&url)
                .await?;
            rounds(pool, None, &brokers, mock.as_ref(), &o).await?
        }
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("outbox-bench-{}.db", std::process::id()));
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
            let pool = examples::sqlite_pool(options).await?;
            let rows = rounds(pool, None, &brokers, mock.as_ref(), &o).await;
            examples::remove_sqlite(&path);
            rows?
        }
        other => return Err(format!("unknown backend `{other}`").into()),
    };
    if !o.json {
        summary(&rows);
    }
    Ok(())
}

/// The database of `wal_e2e`'s consumer, on the server of `pool` (made when missing): a
/// consumer with a database of its own, as a WAL service's consumers are. The server's WAL
/// sender skips its changes, as it would another server's.
async fn consumer_database(
    pool: &Pool<sqlx::Postgres>,
    options: sqlx::postgres::PgConnectOptions,
) -> Result<Pool<sqlx::Postgres>, BoxError> {
    const NAME: &str = "outbox_bench_consumer";
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(NAME)
        .fetch_optional(pool)
        .await?;
    if exists.is_none() {
        sqlx::query(&format!("CREATE DATABASE {NAME}"))
            .execute(pool)
            .await?;
    }
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.database(NAME))
        .await?)
}

/// Runs the chosen scenarios `--rounds` times, printing each round as it ends. `consumer` is
/// the database of `wal_e2e`'s consumer (PostgreSQL).
async fn rounds<DB: Backend>(
    pool: Pool<DB>,
    consumer: Option<Pool<DB>>,
    brokers: &str,
    mock: Option<&Mock>,
    o: &Options,
) -> Result<Vec<Vec<Row>>, BoxError> {
    let mut all = Vec::with_capacity(o.rounds);
    for round in 1..=o.rounds {
        if o.rounds > 1 && !o.json {
            println!("round {round} of {}", o.rounds);
        }
        let rows = run(pool.clone(), consumer.as_ref(), brokers, mock, o).await?;
        print(o, round, &rows);
        all.push(rows);
    }
    Ok(all)
}

/// The ratios the project sets targets on (issue 15), each a scenario against its reference.
const RATIOS: [(&str, &str); 9] = [
    ("enqueue", "raw_insert"),
    ("e2e", "raw_insert"),
    ("e2e_inbox", "raw_insert"),
    ("wal_enqueue", "raw_insert"),
    ("wal_enqueue_read", "raw_insert"),
    ("wal_e2e", "raw_insert"),
    ("wal_relay", "raw_produce"),
    ("backlog_10_keys", "relay_backlog"),
    ("backlog_1_key", "relay_backlog"),
];

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Over several rounds, each scenario's median and range. Then each targeted ratio in every
/// round (both scenarios of a ratio ran in the same round, minutes apart at most) with its
/// median, of the rates and of the CPU per event (the reference's cost over the scenario's:
/// the ratio the rates would have on the same cores if both kept them busy).
fn summary(rounds: &[Vec<Row>]) {
    let find = |round: &[Row], scenario: &str| {
        round
            .iter()
            .find(|r| r.scenario == scenario)
            .map(|r| (r.events_per_sec, r.cpu))
    };
    let rate = |round: &[Row], scenario: &str| find(round, scenario).map(|(rate, _)| rate);
    let cost = |round: &[Row], scenario: &str| {
        find(round, scenario)
            .and_then(|(_, cpu)| cpu)
            .map(|c| c.busy_us)
            .filter(|&us| us > 0.0)
    };
    if rounds.len() > 1 {
        println!("over {} rounds", rounds.len());
        println!(
            "{:<16} {:>10} {:>10} {:>10}",
            "scenario", "median/s", "lowest/s", "highest/s"
        );
        for row in rounds.first().map(Vec::as_slice).unwrap_or_default() {
            let v: Vec<f64> = rounds
                .iter()
                .filter_map(|round| rate(round, row.scenario))
                .collect();
            let (low, high) = v
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                    (l.min(*x), h.max(*x))
                });
            println!(
                "{:<16} {:>10.0} {:>10.0} {:>10.0}",
                row.scenario,
                median(&v),
                low,
                high
            );
        }
    }
    // Whether either scenario of a ratio ran disturbed in that round.
    let disturbed = |round: &[Row], scenarios: &[&str]| {
        round
            .iter()
            .any(|r| scenarios.contains(&r.scenario) && r.disturbed())
    };
    let percent = |r: f64| format!("{:.0}%", r * 100.0);
    for (scenario, reference) in RATIOS {
        let of_round = |round: &Vec<Row>, ratio: Option<f64>| {
            Some((ratio?, disturbed(round, &[scenario, reference])))
        };
        let ratios: Vec<(f64, bool)> = rounds
            .iter()
            .filter_map(|round| {
                of_round(
                    round,
                    Some(rate(round, scenario)? / rate(round, reference)?),
                )
            })
            .collect();
        let by_cpu: Vec<(f64, bool)> = rounds
            .iter()
            .filter_map(|round| {
                of_round(
                    round,
                    Some(cost(round, reference)? / cost(round, scenario)?),
                )
            })
            .collect();
        if let Some(line) = over_rounds(&ratios, percent) {
            println!("{scenario} / {reference}: {line}");
        }
        if let Some(line) = over_rounds(&by_cpu, percent) {
            println!("  by CPU per event: {line}");
        }
    }
    // 10x the rows in how many times the time: 10 x the tenth's rate / the whole's rate (one
    // round prints it as it ends).
    let growth: Vec<(f64, bool)> = rounds
        .iter()
        .filter_map(|round| {
            let (small, big) = ("backlog_1_key/10", "backlog_1_key");
            Some((
                10.0 * rate(round, small)? / rate(round, big)?,
                disturbed(round, &[small, big]),
            ))
        })
        .collect();
    if rounds.len() > 1
        && let Some(line) = over_rounds(&growth, |g| format!("{g:.1}x"))
    {
        println!("1 key, 10x the backlog, in how many times the time: {line}");
    }
    if rounds.iter().flatten().any(Row::disturbed) {
        println!("* in a round where a scenario of the ratio ran disturbed (steal)");
    }
}

/// `median M (rounds: a, b*, …; without *: N)`, each value written by `show`, marked `*` when
/// its round ran disturbed (with the median of the others); the value alone for one round;
/// `None` for none.
fn over_rounds(values: &[(f64, bool)], show: impl Fn(f64) -> String) -> Option<String> {
    let shown = |&(v, disturbed): &(f64, bool)| show(v) + if disturbed { "*" } else { "" };
    match values {
        [] => return None,
        [one] => return Some(shown(one)),
        _ => {}
    }
    let all: Vec<f64> = values.iter().map(|&(v, _)| v).collect();
    let calm: Vec<f64> = values.iter().filter(|(_, d)| !d).map(|&(v, _)| v).collect();
    let each: Vec<String> = values.iter().map(shown).collect();
    let without = if calm.len() < all.len() && !calm.is_empty() {
        format!("; without *: {}", show(median(&calm)))
    } else {
        String::new()
    };
    Some(format!(
        "median {} (rounds: {}{without})",
        show(median(&all)),
        each.join(", ")
    ))
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
}

fn print(o: &Options, round: usize, rows: &[Row]) {
    let rss = peak_rss_mb();
    if !o.json {
        println!(
            "backend {}, {} events, {} writers, brokers {}",
            o.backend,
            o.events,
            o.writers,
            o.brokers.as_deref().unwrap_or("mock cluster")
        );
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>7} {:>7}",
            "scenario",
            "events/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "peak MB",
            "cpu µs/ev",
            "of it db",
            "here",
            "busy %",
            "steal %"
        );
    }
    for r in rows {
        let mut l = r.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        if o.json {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": r.scenario, "round": round, "backend": o.backend, "events_per_sec": r.events_per_sec.round(),
                    "p50_ms": pct(&l, 0.5), "p99_ms": pct(&l, 0.99), "max_ms": l.last(), "peak_rss_mb": r.peak_rss_mb.unwrap_or(rss),
                    "cpu_us_per_event": r.cpu.map(|c| c.busy_us.round()), "db_us_per_event": r.cpu.and_then(|c| c.db_us).map(f64::round), "here_us_per_event": r.cpu.map(|c| c.here_us.round()),
                    "busy_pct": r.cpu.map(|c| c.busy_pct.round()), "steal_pct": r.cpu.map(|c| c.steal_pct.round()), "disturbed": r.disturbed(),
                })
            );
        } else {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            let whole = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "{:<16} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>7} {:>7}",
                r.scenario,
                r.events_per_sec,
                f(pct(&l, 0.5)),
                f(pct(&l, 0.99)),
                f(l.last().copied()),
                f(r.peak_rss_mb),
                whole(r.cpu.map(|c| c.busy_us)),
                whole(r.cpu.and_then(|c| c.db_us)),
                whole(r.cpu.map(|c| c.here_us)),
                whole(r.cpu.map(|c| c.busy_pct)),
                whole(r.cpu.map(|c| c.steal_pct)) + if r.disturbed() { "*" } else { "" },
            );
        }
    }
    if !o.json {
        if rows.iter().any(Row::disturbed) {
            println!(
                "* the host took {DISTURBED_STEAL_PCT}% or more of the cores (steal): such a \
                 row's rate and cost are not comparable with another's"
            );
        }
        println!("peak RSS of this process: {rss:.0} MB");
    }
}

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Starts the peak (`VmHWM`) again from the current resident size (Linux 4.0 and later).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("peak memory not reset ({e}): the figure is the process's peak so far");
    }
}

/// The CPU a scenario cost per event, from Linux's counters (ticks of 10 ms, summed over the
/// cores): the whole machine's, the database server's (when it runs on this machine) and this
/// process's, and how busy the machine was. A scenario that keeps the cores busy runs at the
/// cores it had over its cost per event, so for two such scenarios the ratio of their costs is
/// the ratio their rates would have on the same cores; one that leaves the cores partly idle
/// (writers waiting for their commits' flushes) runs faster than its cost alone says. On a
/// machine whose rates move from one minute to the next, the costs move less. Not when the
/// host of a virtual machine takes back a share of its cores (steal): each event then costs
/// more, and more the more is taken, so a row with [`DISTURBED_STEAL_PCT`] or more of steal is
/// marked, and compares with no other.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    /// Busy (user, system, interrupts; not idle, waiting for I/O or stolen), every process.
    busy_us: f64,
    /// Of it, the database server's processes on this machine (PostgreSQL's, MariaDB's or
    /// MySQL's); `None` when none runs here (SQLite runs in this process).
    db_us: Option<f64>,
    /// Of it, this process: the writers' client side, relays and consumers.
    here_us: f64,
    /// The share of the machine's time (every core's, steal included) that was busy.
    busy_pct: f64,
    /// The share of the machine's time its host took while the scenario ran.
    steal_pct: f64,
}

/// The share of steal from which a row's rate and cost are marked as disturbed.
const DISTURBED_STEAL_PCT: f64 = 5.0;

impl CpuUse {
    fn disturbed(&self) -> bool {
        self.steal_pct >= DISTURBED_STEAL_PCT
    }
}

/// The counters [`CpuUse`] is worked out from.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    busy: u64,
    steal: u64,
    all: u64,
    db: Option<u64>,
    here: u64,
}

/// A process's `/proc/PID/stat` fields after its command: utime, stime, and its reaped
/// children's cutime and cstime are the 12th to the 15th.
fn process_ticks(stat: &str, children: bool) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let last = if children { 14 } else { 12 };
    (11..=last)
        .map(|i| fields.get(i)?.parse::<u64>().ok())
        .sum()
}

/// The names of `DB`'s server processes (none for SQLite, which runs in this process).
fn server_processes<DB: Backend>() -> &'static [&'static str] {
    match <DB as sqlx::Database>::NAME {
        "PostgreSQL" => &["postgres"],
        "MySQL" => &["mariadbd", "mysqld"],
        _ => &[],
    }
}

/// The processes named `names` on this machine, with the children they reaped (a PostgreSQL
/// backend that ended during the scenario is counted in its postmaster's); `None` when there
/// are none.
fn database_ticks(names: &[&str]) -> Option<u64> {
    if names.is_empty() {
        return None;
    }
    let dir = std::fs::read_dir("/proc").ok()?;
    let ticks: Vec<u64> = dir
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            names
                .contains(&comm.trim())
                .then(|| std::fs::read_to_string(e.path().join("stat")).ok())
                .flatten()
                .and_then(|stat| process_ticks(&stat, true))
        })
        .collect();
    (!ticks.is_empty()).then(|| ticks.iter().sum())
}

impl CpuTicks {
    /// Now, the database server's processes among them, or `None` off Linux.
    fn now(db: &[&str]) -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // cpu user nice system idle iowait irq softirq steal ...
        let t: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = t[..] else {
            return None;
        };
        let here = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?, false)?;
        let busy = user + nice + system + irq + softirq;
        Some(Self {
            busy,
            steal,
            all: busy + idle + iowait + steal,
            db: database_ticks(db),
            here,
        })
    }
}

/// A scenario's timed part: its wall time and the CPU spent over it.
struct Clock {
    started: Instant,
    ticks: Option<CpuTicks>,
    db: &'static [&'static str],
}

/// What a [`Clock`] measured.
struct Timed {
    secs: f64,
    cpu: Option<CpuUse>,
}

impl Clock {
    /// Starts timing a scenario on `DB`.
    fn start<DB: Backend>() -> Self {
        let db = server_processes::<DB>();
        Self {
            ticks: CpuTicks::now(db),
            started: Instant::now(),
            db,
        }
    }

    /// The seconds since the start, and the CPU per event for `events` events.
    fn stop(&self, events: usize) -> Timed {
        let secs = self.started.elapsed().as_secs_f64();
        let cpu = self.ticks.zip(CpuTicks::now(self.db)).and_then(|(a, b)| {
            // A tick is 10 ms: 10,000 µs.
            let per_event = |ticks: u64| ticks as f64 * 10_000.0 / events as f64;
            (events > 0 && b.all > a.all).then(|| CpuUse {
                busy_us: per_event(b.busy.saturating_sub(a.busy)),
                db_us: a.db.zip(b.db).map(|(a, b)| per_event(b.saturating_sub(a))),
                here_us: per_event(b.here.saturating_sub(a.here)),
                busy_pct: 100.0 * b.busy.saturating_sub(a.busy) as f64 / (b.all - a.all) as f64,
                steal_pct: 100.0 * b.steal.saturating_sub(a.steal) as f64 / (b.all - a.all) as f64,
            })
        });
        Timed { secs, cpu }
    }
}

impl Row {
    fn disturbed(&self) -> bool {
        self.cpu.is_some_and(|c| c.disturbed())
    }

    fn timed(
        scenario: &'static str,
        events: usize,
        timed: Timed,
        latencies_ms: Vec<f64>,
        peak_rss_mb: Option<f64>,
    ) -> Self {
        Self {
            scenario,
            events_per_sec: events as f64 / timed.secs,
            latencies_ms,
            peak_rss_mb,
            cpu: timed.cpu,
        }
    }
}

/// Counts what a stage did in this process, and says when the count reached what a scenario
/// waits for. A scenario waits on it, and asks the database only once it is reached, to confirm
/// that the last of it committed: asking every few milliseconds while the stages run (a count
/// over the whole table) would take a share of the two cores the scenario measures, and a
/// growing share as the table grows.
struct Progress {
    done: std::sync::atomic::AtomicUsize,
    reached: tokio::sync::Notify,
    want: usize,
}

impl Progress {
    fn new(want: usize) -> Arc<Self> {
        Arc::new(Self {
            done: std::sync::atomic::AtomicUsize::new(0),
            reached: tokio::sync::Notify::new(),
            want,
        })
    }

    fn count(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self, k: usize) {
        let before = self.done.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
        if before < self.want && before + k >= self.want {
            self.reached.notify_waiters();
        }
    }

    /// Waits until the count reached `want` (at most `limit`).
    async fn reached(&self, limit: Duration) -> Result<(), BoxError> {
        let reached = self.reached.notified();
        tokio::pin!(reached);
        reached.as_mut().enable();
        if self.count() < self.want {
            tokio::time::timeout(limit, reached).await.map_err(|_| {
                format!("{} of {} in {} s", self.count(), self.want, limit.as_secs())
            })?;
        }
        Ok(())
    }
}

/// The scenarios' handler: applies nothing, counts its calls.
#[derive(Clone)]
struct Counter(Arc<Progress>);

impl<DB: Backend> TaskEventsHandler<Context<DB>> for Counter {
    async fn task_urgency_promote_requested(
        &self,
        _: &mut Context<DB>,
        _: TaskUrgencyPromoteRequested,
    ) -> Result<(), HandlerError> {
        self.0.add(1);
        Ok(())
    }
}

impl TaskEventsHandler<Call> for Counter {
    async fn task_urgency_promote_requested(
        &self,
        _: &mut Call,
        _: TaskUrgencyPromoteRequested,
    ) -> Result<(), HandlerError> {
        self.0.add(1);
        Ok(())
    }
}

/// A fresh outbox with its own table and topic for one scenario.
async fn fresh<DB: Backend>(
    pool: &Pool<DB>,
    name: &str,
    mock: Option<&Mock>,
    bus: &KafkaBus,
) -> Result<Outbox<DB>, BoxError> {
    fresh_in(pool, name, mock, bus, false).await
}

/// [`fresh`], the service relayed from the write-ahead log when `wal` (PostgreSQL).
async fn fresh_in<DB: Backend>(
    pool: &Pool<DB>,
    name: &str,
    mock: Option<&Mock>,
    bus: &KafkaBus,
    wal: bool,
) -> Result<Outbox<DB>, BoxError> {
    let tag = format!("{name}{:06x}", fastrand::u32(..1 << 24));
    let routes = RouteConfig::new()
        .prefix(&format!("bench-{tag}"))?
        .override_service(
            "task",
            RouteOverride::default().table(format!("b{tag}_outbox")),
        )?;
    let mut outbox =
        Outbox::<DB>::builder(Catalog::builder(routes).service::<TaskEvents>()?.build());
    if wal {
        outbox = outbox.wal("task")?;
    }
    let outbox = outbox.build();
    let mut conn = pool.acquire().await?;
    outbox.migrate(&mut conn).await?;
    let topic = outbox
        .catalog()
        .service("task")
        .map(|r| r.topic.clone())
        .ok_or("no route")?;
    match mock {
        Some(mock) => mock.create_topic(&topic, 3, 1)?,
        None => bus.ensure_topics(&[topic]).await?,
    }
    Ok(outbox)
}

async fn drop_table<DB: Backend>(pool: &Pool<DB>, outbox: &Outbox<DB>) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    // A slot left behind keeps the server's WAL.
    for service in outbox.wal_services() {
        DB::execute(
            &mut conn,
            "SELECT pg_drop_replication_slot($1)::TEXT",
            vec![Arg::Str(outbox.wal_slot(service)?)],
        )
        .await?;
    }
    for r in outbox.catalog().services() {
        DB::execute(
            &mut conn,
            &format!("DROP TABLE IF EXISTS {}", r.table),
            Vec::new(),
        )
        .await?;
    }
    Ok(())
}

/// On PostgreSQL, what a table-mode scenario left in the task table: dead tuples (as the
/// statistics report them) and its size with indexes. Elsewhere nothing.
async fn table_cost<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    scenario: &str,
    o: &Options,
) -> Result<(), BoxError> {
    if o.backend != "postgres" || o.json {
        return Ok(());
    }
    let table = &outbox.catalog().service("task").ok_or("no route")?.table;
    let mut conn = pool.acquire().await?;
    // Statistics reach the shared counters when each backend flushes them; the relay's
    // connections are idle by now, so a moment's wait covers their last flush.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut one = async |sql: String| -> Result<i64, BoxError> {
        let got = DB::fetch_ints(&mut conn, &sql, Vec::new()).await?;
        Ok(got.first().copied().flatten().unwrap_or(0))
    };
    let dead = one(format!(
        "SELECT COALESCE(MAX(n_dead_tup), 0) FROM pg_stat_user_tables WHERE relname = '{table}'"
    ))
    .await?;
    let bytes = one(format!("SELECT pg_total_relation_size('{table}')")).await?;
    println!(
        "{scenario}: table {table}: {dead} dead tuples, {:.1} MB with indexes",
        bytes as f64 / 1e6
    );
    Ok(())
}

/// The consumer of an end-to-end scenario.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// In the transaction that marks the producer's row consumed.
    Shared,
    /// Recording applied events in the inbox (`Dedupe::Inbox`), as a consumer with its own
    /// database does.
    Inbox,
    /// Outside any transaction: claim, commit, call, mark.
    Calls,
}

impl Kind {
    fn scenario(self) -> &'static str {
        match self {
            Kind::Shared => "e2e",
            Kind::Inbox => "e2e_inbox",
            Kind::Calls => "e2e_calls",
        }
    }
}

/// Writers at full speed with a relay and a consumer of `kind` running: applied per second, and
/// enqueue-to-applied latency.
async fn end_to_end<DB: Backend>(
    pool: &Pool<DB>,
    bus: &Arc<KafkaBus>,
    mock: Option<&Mock>,
    o: &Options,
    n: usize,
    kind: Kind,
) -> Result<Row, BoxError> {
    let tag = match kind {
        Kind::Shared => "e",
        Kind::Inbox => "i",
        Kind::Calls => "c",
    };
    let outbox = fresh(pool, tag, mock, bus).await?;
    let group = outbox
        .catalog()
        .service("task")
        .map(|r| r.group.clone())
        .ok_or("no route")?;
    let progress = Progress::new(n);
    let counter = Counter(progress.clone());
    let engine = Engine::builder(pool.clone(), bus.clone())
        .outbox(outbox.clone())
        .relay(RelayConfig::default().poll_interval(Duration::from_millis(50)));
    let engine = match kind {
        Kind::Shared => engine.consumer::<TaskEvents, _>(counter),
        Kind::Inbox => engine.consumer_with::<TaskEvents, _>(
            counter,
            ConsumerConfig::default().dedupe(Dedupe::Inbox),
        ),
        Kind::Calls => engine.call_consumer::<TaskEvents, _>(counter),
    };
    let running = engine.start().await?;
    if !running.ready(Duration::from_secs(60)).await {
        return Err("the consumer did not join its group".into());
    }
    from_checkpoint(pool).await?;
    let clock = Clock::start::<DB>();
    write_events(pool, &outbox, n, o.writers).await?;
    progress.reached(Duration::from_secs(300)).await?;
    match kind {
        Kind::Inbox => wait_for_inbox(pool, &group, n).await?,
        _ => wait_for(pool, &outbox, Status::Consumed, n).await?,
    }
    let timed = clock.stop(n);
    running.shutdown().await?;
    let latencies_ms = match kind {
        Kind::Inbox => inbox_latencies(pool, &outbox, &group).await?,
        _ => latencies(pool, &outbox).await?,
    };
    if let Kind::Shared = kind {
        table_cost(pool, &outbox, "e2e", o).await?;
    }
    drop_table(pool, &outbox).await?;
    if let Kind::Inbox = kind {
        let mut conn = pool.acquire().await?;
        let forget = DB::dialect_sql("DELETE FROM outbox_inbox WHERE consumer_group = $1");
        DB::execute(&mut conn, &forget, vec![Arg::Str(group)]).await?;
    }
    Ok(Row::timed(kind.scenario(), n, timed, latencies_ms, None))
}

fn event(n: u64) -> TaskUrgencyPromoteRequested {
    let mut e = samples::urgency(n);
    e.user_id = 1 + n % 1000;
    e
}

async fn run<DB: Backend>(
    pool: Pool<DB>,
    consumer: Option<&Pool<DB>>,
    brokers: &str,
    mock: Option<&Mock>,
    o: &Options,
) -> Result<Vec<Row>, BoxError> {
    let mut rows = Vec::new();
    let n = o.events;
    // The mock cluster makes its topics through its own API (`fresh`), not the admin API.
    let bus = Arc::new(KafkaBus::new(
        KafkaConfig::new(brokers).create_topics(mock.is_none()),
    )?);

    // raw_produce
    if o.runs("raw_produce") {
        let outbox = fresh(&pool, "p", mock, &bus).await?;
        let route = outbox
            .catalog()
            .service("task")
            .cloned()
            .ok_or("no route")?;
        let value = envelope_sized();
        let clock = Clock::start::<DB>();
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let records: Vec<Outgoing> = chunk
                .iter()
                .map(|i| Outgoing {
                    topic: route.topic.clone(),
                    key: Some((i % 1000).to_string()),
                    value: value.clone(),
                    headers: Vec::new(),
                })
                .collect();
            for r in bus.send_all(&records).await {
                r.into_result()?;
            }
        }
        rows.push(Row::timed(
            "raw_produce",
            n,
            clock.stop(n),
            Vec::new(),
            None,
        ));
        drop_table(&pool, &outbox).await?;
    }

    // raw_insert and enqueue
    for (scenario, with_outbox, wal) in [
        ("raw_insert", false, false),
        ("enqueue", true, false),
        ("wal_enqueue", true, true),
        ("wal_enqueue_read", true, true),
    ] {
        if !o.runs(scenario) || (wal && o.backend != "postgres") {
            continue;
        }
        let outbox = fresh_in(&pool, "i", mock, &bus, wal).await?;
        let table = business_table(&pool, &outbox).await?;
        let reader = match scenario {
            "wal_enqueue_read" => Some(SlotReader::start(&pool, &outbox, o).await?),
            _ => None,
        };
        from_checkpoint(&pool).await?;
        let clock = Clock::start::<DB>();
        let written =
            business_writers(&pool, with_outbox.then_some(&outbox), &table, n, o.writers).await?;
        if let Some(reader) = reader {
            reader.stop().await?;
        }
        let timed = clock.stop(written.len());
        rows.push(Row::timed(
            scenario,
            written.len(),
            timed,
            written.into_iter().map(|w| w.latency_ms).collect(),
            None,
        ));
        let mut conn = pool.acquire().await?;
        DB::execute(&mut conn, &format!("DROP TABLE {table}"), Vec::new()).await?;
        drop(conn);
        drop_table(&pool, &outbox).await?;
    }

    // What bounds e2e: its writers alone, then with a relay running beside them.
    for (scenario, with_relay) in [("e2e_writers", false), ("e2e_writers_relay", true)] {
        if !o.runs(scenario) {
            continue;
        }
        let outbox = fresh(&pool, "x", mock, &bus).await?;
        let engine = Engine::builder(pool.clone(), bus.clone()).outbox(outbox.clone());
        let engine = if with_relay {
            engine.relay(RelayConfig::default().poll_interval(Duration::from_millis(50)))
        } else {
            engine.without_relay()
        };
        let running = engine.start().await?;
        from_checkpoint(&pool).await?;
        let clock = Clock::start::<DB>();
        write_events(&pool, &outbox, n, o.writers).await?;
        rows.push(Row::timed(scenario, n, clock.stop(n), Vec::new(), None));
        running.shutdown().await?;
        drop_table(&pool, &outbox).await?;
    }

    // relay: a pre-filled backlog.
    if o.runs("relay") {
        let outbox = fresh(&pool, "r", mock, &bus).await?;
        let events: Vec<_> = (0..n as u64).map(event).collect();
        for chunk in events.chunks(500) {
            let mut tx = pool.begin().await?;
            outbox.enqueue_all(&mut *tx, chunk).await?;
            tx.commit().await?;
        }
        let timed = drain(&pool, &outbox, &bus, n).await?;
        rows.push(Row::timed("relay", n, timed, Vec::new(), None));
        table_cost(&pool, &outbox, "relay", o).await?;
        drop_table(&pool, &outbox).await?;
    }

    // e2e, then the same with the other kinds of consumer.
    for kind in [Kind::Shared, Kind::Inbox, Kind::Calls] {
        if o.runs(kind.scenario()) {
            rows.push(end_to_end(&pool, &bus, mock, o, n, kind).await?);
        }
    }

    // The write-ahead-log relay (PostgreSQL): end to end, and a backlog.
    if o.backend == "postgres" {
        if o.runs("wal_e2e") {
            let consumer = consumer.ok_or("wal_e2e needs the consumer's database")?;
            rows.push(wal_end_to_end(&pool, consumer, &bus, mock, o, n).await?);
        }
        if o.runs("wal_relay") {
            rows.push(wal_backlog(&pool, &bus, mock, o, false).await?);
        }
        if o.runs("wal_relay_sql") {
            rows.push(wal_backlog(&pool, &bus, mock, o, true).await?);
        }
    }

    // seed_mode: the Go algorithm.
    if o.runs("seed_mode") {
        let outbox = fresh(&pool, "s", mock, &bus).await?;
        let route = outbox
            .catalog()
            .service("task")
            .cloned()
            .ok_or("no route")?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = Progress::new(n);
        let relay = tokio::spawn(seed_relay(
            pool.clone(),
            route.table.clone(),
            bus.clone(),
            stop.clone(),
        ));
        let consumer = tokio::spawn(seed_consumer(
            pool.clone(),
            route.clone(),
            brokers.to_owned(),
            outbox.clone(),
            progress.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await; // let the consumer join
        from_checkpoint(&pool).await?;
        let clock = Clock::start::<DB>();
        write_events(&pool, &outbox, n, o.writers).await?;
        progress.reached(Duration::from_secs(600)).await?;
        wait_for(&pool, &outbox, Status::Consumed, n).await?;
        let timed = clock.stop(n);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        relay.await??;
        consumer.await??;
        let lat = latencies(&pool, &outbox).await?;
        rows.push(Row::timed("seed_mode", n, timed, lat, None));
        drop_table(&pool, &outbox).await?;
    }

    // relay_backlog: a large backlog, drained by one relay; its memory must not grow with it.
    // The mock cluster keeps every message in this process, and past a few hundred thousand it,
    // not the relay, sets the pace; a real broker takes the full million. Then the same backlog
    // on 10 keys and on 1 key (hot keys: per-key order must not cost the rate), and a tenth of
    // it on 1 key (the cost must grow with the backlog, not with its square).
    let backlog = o
        .backlog
        .unwrap_or(if mock.is_some() { 200_000 } else { 1_000_000 });
    let shapes: [(&'static str, usize, usize); 4] = [
        ("relay_backlog", backlog, 1000),
        ("backlog_10_keys", backlog, 10),
        ("backlog_1_key", backlog, 1),
        ("backlog_1_key/10", backlog / 10, 1),
    ];
    let mut secs_of = std::collections::HashMap::new();
    for (scenario, size, keys) in shapes {
        if size == 0 || !(o.runs("relay_backlog") || o.runs(scenario)) {
            continue;
        }
        let outbox = fresh(&pool, "m", mock, &bus).await?;
        fill(&pool, &outbox, size, keys, o.backend == "mysql").await?;
        let before = rss_mb();
        reset_peak_rss();
        let timed = drain(&pool, &outbox, &bus, size).await?;
        let secs = timed.secs;
        secs_of.insert(scenario, secs);
        rows.push(Row::timed(
            scenario,
            size,
            timed,
            Vec::new(),
            Some(peak_rss_mb()),
        ));
        if !o.json {
            println!(
                "{scenario}: {size} rows on {keys} keys in {secs:.1} s; resident {before:.0} MB \
                 before the relay started{}",
                if mock.is_some() {
                    "; the peak includes the in-process mock broker holding every message"
                } else {
                    ""
                }
            );
        }
        table_cost(&pool, &outbox, scenario, o).await?;
        drop_table(&pool, &outbox).await?;
    }
    if let (Some(big), Some(small)) = (
        secs_of.get("backlog_1_key"),
        secs_of.get("backlog_1_key/10"),
    ) && !o.json
    {
        println!(
            "1 key: 10x the backlog took {:.1}x the time (target: at most 12x)",
            big / small
        );
    }
    Ok(rows)
}

fn envelope_sized() -> Vec<u8> {
    let mut v = br#"{"outbox_id":1,"event_id":"0190c3c0-0000-7000-8000-000000000001","event_type":"task.urgency.promote.requested","event_version":"1","service_name":"task","aggregate_id":"7","payload":"#.to_vec();
    v.extend_from_slice(
        format!(
            "{{\"user_id\":7,\"task_ids\":[1,2,3],\"pad\":\"{}\"}}}}",
            "x".repeat(300)
        )
        .as_bytes(),
    );
    v
}

/// `writers` tasks writing `n` transactions in all, each an event and nothing else, begun
/// with it ([`Outbox::begin_with`]).
async fn write_events<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    n: usize,
    writers: usize,
) -> Result<(), BoxError> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        let per = n / writers + usize::from(w < n % writers);
        let base = w * (n / writers + 1);
        tasks.spawn(async move {
            for i in 0..per {
                // A connection from the pool per transaction, as `business_writers` takes
                // (the pool tests it with a round trip before it hands it over).
                let mut conn = pool.acquire().await?;
                let (tx, _) = outbox
                    .begin_with(&mut *conn, [&event((base + i) as u64)])
                    .await?;
                tx.commit().await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Runs one relay until `n` rows are published (the broker acknowledged them, counted as it
/// does, and their marks committed), then stops it: the seconds it took, and the CPU.
async fn drain<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    bus: &Arc<KafkaBus>,
    n: usize,
) -> Result<Timed, BoxError> {
    let (trigger, shutdown) = Shutdown::new();
    let counted = Arc::new(Counted {
        bus: bus.clone(),
        progress: Progress::new(n),
    });
    let relay = Relay::new(
        outbox.clone(),
        pool.clone(),
        counted.clone(),
        RelayConfig::default(),
    );
    from_checkpoint(pool).await?;
    let clock = Clock::start::<DB>();
    let task = tokio::spawn(relay.run(shutdown));
    counted.progress.reached(Duration::from_secs(600)).await?;
    wait_for(pool, outbox, Status::Published, n).await?;
    let timed = clock.stop(n);
    trigger.trigger();
    task.await??;
    Ok(timed)
}

/// Waits until `n` rows reached `status` (or a later one), looking every 5 ms: a scenario's
/// confirmation once its [`Progress`] said so.
async fn wait_for<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    status: Status,
    n: usize,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut conn = pool.acquire().await?;
        let stats = outbox.stats(&mut conn).await?;
        let done: i64 = stats
            .iter()
            .map(|s| {
                s.counts[&status]
                    + if status == Status::Published {
                        s.counts[&Status::Consumed]
                    } else {
                        0
                    }
            })
            .sum();
        if done as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {n} events reached {status}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `n` pending rows straight into the outbox table, many per statement: a backlog as
/// a stopped relay would leave it.
async fn fill<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    n: usize,
    keys: usize,
    mysql: bool,
) -> Result<(), BoxError> {
    let route = outbox
        .catalog()
        .service("task")
        .cloned()
        .ok_or("no route")?;
    let now = outbox.now_ms();
    // One statement text for every chunk (only a short last one differs), so that the
    // connection's statement cache holds one prepared insert, not a thousand.
    let insert = |rows: usize| {
        let values: Vec<String> = (0..rows)
            .map(|r| {
                let p = r * 4;
                format!(
                    "(${}, 'task.urgency.promote.requested', 1, 'task', '{topic}', ${}, ${}, ${}, \
                     '{{}}', 'pending', 0, 20, {now}, {now}, {now})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    topic = route.topic,
                )
            })
            .collect();
        DB::dialect_sql(&format!(
            "INSERT INTO {} (event_id, event_type, event_version, service_name, topic, \
             message_key, aggregate_id, payload, headers, status, attempts, max_attempts, \
             next_attempt_at, created_at, updated_at) VALUES {}",
            route.table,
            values.join(", ")
        ))
        .into_owned()
    };
    let full = insert(1000);
    let rows: Vec<usize> = (0..n).collect();
    for chunk in rows.chunks(1000) {
        let sql = if chunk.len() == 1000 {
            full.clone()
        } else {
            insert(chunk.len())
        };
        let mut args = Vec::with_capacity(chunk.len() * 4);
        for i in chunk {
            let key = (1 + i % keys.max(1)).to_string();
            args.push(Arg::Str(format!("backlog-{i}")));
            args.push(Arg::Str(key.clone()));
            args.push(Arg::Str(key.clone()));
            args.push(Arg::Str(format!(
                "{{\"user_id\":{key},\"task_ids\":[{i}],\"triggered_at\":\"2026-11-23T09:00:00Z\"}}"
            )));
        }
        let mut conn = pool.acquire().await?;
        DB::execute(&mut conn, &sql, args).await?;
    }
    // The planner's statistics, as a backlog that built up over time would have them.
    let analyze = if mysql {
        format!("ANALYZE TABLE {}", route.table)
    } else {
        format!("ANALYZE {}", route.table)
    };
    let mut conn = pool.acquire().await?;
    DB::execute(&mut conn, &analyze, Vec::new()).await?;
    Ok(())
}

/// Waits until consumer group `group` has `n` inbox records, looking every 5 ms: a scenario's
/// confirmation once its [`Progress`] said so.
async fn wait_for_inbox<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
    n: usize,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let sql = DB::dialect_sql("SELECT COUNT(*) FROM outbox_inbox WHERE consumer_group = $1");
    loop {
        let mut conn = pool.acquire().await?;
        let done = DB::fetch_ints(&mut conn, &sql, vec![Arg::Str(group.to_owned())])
            .await?
            .first()
            .copied()
            .flatten()
            .unwrap_or(0);
        if done as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {n} events in the inbox").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Enqueue to inbox record, per event (ms).
async fn inbox_latencies<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
    group: &str,
) -> Result<Vec<f64>, BoxError> {
    let table = outbox
        .catalog()
        .service("task")
        .map(|r| r.table.clone())
        .unwrap_or_default();
    let mut conn = pool.acquire().await?;
    // MySQL keeps inbox keys in a binary collation: read as text.
    let id = if DB::NAME == "MySQL" {
        "CAST(event_id AS CHAR)"
    } else {
        "event_id"
    };
    let created: std::collections::HashMap<String, i64> = DB::fetch_pairs(
        &mut conn,
        &format!("SELECT event_id, created_at FROM {table}"),
        Vec::new(),
    )
    .await?
    .into_iter()
    .collect();
    let sql = DB::dialect_sql(&format!(
        "SELECT {id}, consumed_at FROM outbox_inbox WHERE consumer_group = $1"
    ))
    .into_owned();
    Ok(
        DB::fetch_pairs(&mut conn, &sql, vec![Arg::Str(group.to_owned())])
            .await?
            .into_iter()
            .filter_map(|(id, at)| created.get(&id).map(|c| (at - c) as f64))
            .collect(),
    )
}

async fn latencies<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
) -> Result<Vec<f64>, BoxError> {
    let table = outbox
        .catalog()
        .service("task")
        .map(|r| r.table.clone())
        .unwrap_or_default();
    let mut conn = pool.acquire().await?;
    Ok(DB::fetch_ints(
        &mut conn,
        &format!("SELECT consumed_at - created_at FROM {table} WHERE status = 'consumed'"),
        Vec::new(),
    )
    .await?
    .into_iter()
    .flatten()
    .map(|ms| ms as f64)
    .collect())
}

/// The Go relay (seed §4): every tick, select up to 100 due rows, and for each: build the
/// envelope, produce synchronously, mark published.
async fn seed_relay<DB: Backend>(
    pool: Pool<DB>,
    table: String,
    bus: Arc<KafkaBus>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), BoxError> {
    let select = format!("SELECT id FROM {table} WHERE status = 'pending' ORDER BY id LIMIT 100");
    let get = DB::dialect_sql(&format!(
        "SELECT id, event_id, event_type, event_version, service_name, topic, message_key, aggregate_id, payload, headers, status, attempts, max_attempts, next_attempt_at, lease_owner, lease_until, last_error, dead_reason, published_at, consumed_at, created_at, updated_at FROM {table} WHERE id = $1"
    ))
    .into_owned();
    let mark = DB::dialect_sql(&format!("UPDATE {table} SET status = 'published', published_at = $1 WHERE id = $2 AND status = 'pending'")).into_owned();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut conn = pool.acquire().await?;
        let ids: Vec<i64> = DB::fetch_ints(&mut conn, &select, Vec::new())
            .await?
            .into_iter()
            .flatten()
            .collect();
        if ids.is_empty() {
            drop(conn);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for id in ids {
            let Some(row) = DB::fetch_rows(&mut conn, &get, vec![Arg::I64(id)])
                .await?
                .into_iter()
                .next()
            else {
                continue;
            };
            let record = Outgoing {
                topic: row.topic.clone(),
                key: row.message_key.clone(),
                value: envelope::encode(&row, VersionFormat::Number)?,
                headers: Vec::new(),
            };
            bus.send(&record).await?;
            let now = outbox_runtime::store::Clock::now_ms(&outbox_runtime::store::SystemClock);
            DB::execute(&mut conn, &mark, vec![Arg::I64(now), Arg::I64(id)]).await?;
        }
    }
    Ok(())
}

/// The Go consumer (seed §5): one message at a time, one transaction each (lock the row, mark
/// consumed), then a synchronous offset commit.
async fn seed_consumer<DB: Backend>(
    pool: Pool<DB>,
    route: outbox_runtime::ServiceRoute,
    brokers: String,
    outbox: Outbox<DB>,
    progress: Arc<Progress>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), BoxError> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{}-seed", route.group))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[&route.topic])?;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Err(_) => continue,
            Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Ok(Ok(m)) => m,
        };
        let env = envelope::decode(msg.payload().unwrap_or_default())?;
        let mut conn = pool.acquire().await?;
        outbox
            .consume(&mut conn, &route.service, &env.event_id, async |_| {
                Ok::<_, std::io::Error>(())
            })
            .await?;
        progress.add(1);
        consumer.commit_message(&msg, CommitMode::Sync)?;
    }
    Ok(())
}

/// The business table of a scenario: a row of 700 characters per transaction, as `raw_insert`
/// writes.
async fn business_table<DB: Backend>(
    pool: &Pool<DB>,
    outbox: &Outbox<DB>,
) -> Result<String, BoxError> {
    let table = format!(
        "{}_biz",
        outbox
            .catalog()
            .service("task")
            .map(|r| r.table.clone())
            .unwrap_or_default()
    );
    let mut conn = pool.acquire().await?;
    DB::execute(
        &mut conn,
        &format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, payload VARCHAR(700) NOT NULL)"),
        Vec::new(),
    )
    .await?;
    Ok(table)
}

/// One writer transaction of [`business_writers`].
struct Written {
    latency_ms: f64,
    event_id: Option<String>,
    committed_at_ms: i64,
}

/// `writers` tasks writing `n` transactions in all, each a business row of 700 characters in
/// `table` and, with `outbox`, an event, which begins the transaction ([`Outbox::begin_with`]).
async fn business_writers<DB: Backend>(
    pool: &Pool<DB>,
    outbox: Option<&Outbox<DB>>,
    table: &str,
    n: usize,
    writers: usize,
) -> Result<Vec<Written>, BoxError> {
    let insert = DB::dialect_sql(&format!(
        "INSERT INTO {table} (id, payload) VALUES ($1, $2)"
    ))
    .into_owned();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, outbox, insert) = (pool.clone(), outbox.cloned(), insert.clone());
        let per = n / writers;
        tasks.spawn(async move {
            let mut written = Vec::with_capacity(per);
            let payload = String::from_utf8(envelope_sized()).unwrap_or_default();
            for i in 0..per {
                let id = (w * per + i) as i64;
                let t = Instant::now();
                let mut conn = pool.acquire().await?;
                // The event begins the transaction: with the `BEGIN`, in one message, for a
                // service relayed from the write-ahead log.
                let (mut tx, event_id) = match &outbox {
                    Some(outbox) => {
                        let (tx, stored) =
                            outbox.begin_with(&mut *conn, [&event(id as u64)]).await?;
                        (tx, stored.into_iter().next().map(|e| e.event_id))
                    }
                    None => (sqlx::Connection::begin(&mut *conn).await?, None),
                };
                DB::execute(
                    &mut tx,
                    &insert,
                    vec![Arg::I64(id), Arg::Str(payload.clone())],
                )
                .await?;
                tx.commit().await?;
                written.push(Written {
                    latency_ms: t.elapsed().as_secs_f64() * 1000.0,
                    event_id,
                    committed_at_ms: now_ms(),
                });
            }
            Ok::<_, BoxError>(written)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(all)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `wal_e2e`: `raw_insert`'s writers (a business row per transaction) with an event each in the
/// write-ahead log, a relay reading the slot and a consumer recording applied events in the
/// inbox of its own database (`consumer`, on the same server): applied per second, and
/// enqueue-to-inbox latency.
async fn wal_end_to_end<DB: Backend>(
    pool: &Pool<DB>,
    consumer: &Pool<DB>,
    bus: &Arc<KafkaBus>,
    mock: Option<&Mock>,
    o: &Options,
    n: usize,
) -> Result<Row, BoxError> {
    let outbox = fresh_in(pool, "w", mock, bus, true).await?;
    let group = outbox
        .catalog()
        .service("task")
        .map(|r| r.group.clone())
        .ok_or("no route")?;
    // The consumer's side: the same contracts, its inbox in its own database.
    let inbox = Outbox::<DB>::builder(outbox.catalog().clone()).build();
    inbox.migrate(&mut *consumer.acquire().await?).await?;
    let table = business_table(pool, &outbox).await?;
    let progress = Progress::new(n / o.writers * o.writers);
    let relaying = Engine::builder(pool.clone(), bus.clone())
        .outbox(outbox.clone())
        .relay(relay_config(o).poll_interval(Duration::from_millis(50)))
        .start()
        .await?;
    let consuming = Engine::builder(consumer.clone(), bus.clone())
        .outbox(inbox.clone())
        .without_relay()
        .consumer_with::<TaskEvents, _>(
            Counter(progress.clone()),
            ConsumerConfig::default().dedupe(Dedupe::Inbox),
        )
        .start()
        .await?;
    if !consuming.ready(Duration::from_secs(60)).await {
        return Err("the consumer did not join its group".into());
    }
    from_checkpoint(pool).await?;
    let clock = Clock::start::<DB>();
    let written: std::collections::HashMap<String, i64> =
        business_writers(pool, Some(&outbox), &table, n, o.writers)
            .await?
            .into_iter()
            .filter_map(|w| Some((w.event_id?, w.committed_at_ms)))
            .collect();
    progress.reached(Duration::from_secs(300)).await?;
    wait_for_inbox(consumer, &group, written.len()).await?;
    let timed = clock.stop(written.len());
    consuming.shutdown().await?;
    relaying.shutdown().await?;
    let mut conn = consumer.acquire().await?;
    let sql =
        DB::dialect_sql("SELECT event_id, consumed_at FROM outbox_inbox WHERE consumer_group = $1");
    let latencies_ms = DB::fetch_pairs(&mut conn, &sql, vec![Arg::Str(group.clone())])
        .await?
        .into_iter()
        .filter_map(|(id, at)| written.get(&id).map(|c| (at - c).max(0) as f64))
        .collect();
    let forget = DB::dialect_sql("DELETE FROM outbox_inbox WHERE consumer_group = $1");
    DB::execute(&mut conn, &forget, vec![Arg::Str(group)]).await?;
    drop(conn);
    drop_table(consumer, &inbox).await?;
    let mut conn = pool.acquire().await?;
    DB::execute(&mut conn, &format!("DROP TABLE {table}"), Vec::new()).await?;
    drop(conn);
    table_cost(pool, &outbox, "wal_e2e", o).await?;
    drop_table(pool, &outbox).await?;
    Ok(Row::timed(
        "wal_e2e",
        written.len(),
        timed,
        latencies_ms,
        None,
    ))
}

/// `wal_relay`: a backlog in the write-ahead log (`--backlog` events, 100,000 by default, one
/// per transaction from the writers, keys as `relay_backlog`'s 1,000), drained by the relay
/// daemon streaming the slot, from its start until the broker acknowledged them all and it
/// stopped (its last acknowledgement on the server, the slot free). `wal_relay_sql`: the same
/// backlog drained round after round through the SQL interface ([`Relay::relay_once`]) until a
/// round finds nothing.
async fn wal_backlog<DB: Backend>(
    pool: &Pool<DB>,
    bus: &Arc<KafkaBus>,
    mock: Option<&Mock>,
    o: &Options,
    sql: bool,
) -> Result<Row, BoxError> {
    let scenario = if sql { "wal_relay_sql" } else { "wal_relay" };
    let size = o.backlog.unwrap_or(100_000);
    let outbox = fresh_in(pool, "v", mock, bus, true).await?;
    write_events(pool, &outbox, size, o.writers).await?;
    let counted = Arc::new(Counted {
        bus: bus.clone(),
        progress: Progress::new(size),
    });
    let relay = Relay::new(
        outbox.clone(),
        pool.clone(),
        counted.clone(),
        relay_config(o),
    )
    .services(["task"]);
    from_checkpoint(pool).await?;
    reset_peak_rss();
    let clock = Clock::start::<DB>();
    if sql {
        loop {
            if relay.relay_once("task").await? == 0 {
                break;
            }
        }
    } else {
        let (trigger, shutdown) = Shutdown::new();
        let running = tokio::spawn(relay.run(shutdown));
        counted
            .progress
            .reached(Duration::from_secs(600))
            .await
            .map_err(|e| format!("the relay did not publish the backlog: {e}"))?;
        trigger.trigger();
        running.await??;
    }
    let timed = clock.stop(size);
    let acked = counted.progress.count();
    if acked < size {
        return Err(format!("{scenario}: the broker acknowledged {acked} of {size} events").into());
    }
    if !o.json {
        println!("{scenario}: {size} events in {:.1} s", timed.secs);
    }
    drop_table(pool, &outbox).await?;
    Ok(Row::timed(
        scenario,
        size,
        timed,
        Vec::new(),
        Some(peak_rss_mb()),
    ))
}

/// `wal_enqueue_read`: the server's share of a WAL service's cost. The writers of
/// `wal_enqueue` while the slot is streamed to a reader that only acknowledges what it reads
/// (the WAL sender decodes every transaction of the database as it commits, and sends the
/// events): what of `wal_e2e`'s cost is not the relay's publishing nor the consumer's.
struct SlotReader {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), outbox_runtime::Error>>,
}

impl SlotReader {
    async fn start<DB: Backend>(
        pool: &Pool<DB>,
        outbox: &Outbox<DB>,
        o: &Options,
    ) -> Result<Self, BoxError> {
        let target = DB::replication_target(pool, o.url.as_deref())?.ok_or("no replication")?;
        let mut conn = pool.acquire().await?;
        let from = outbox
            .wal_slot_state(&mut conn, "task")
            .await?
            .and_then(|s| s.confirmed)
            .ok_or("no slot")?;
        let mut stream = outbox_runtime::store::WalStream::open(
            &target,
            "task",
            &outbox.wal_slot("task")?,
            outbox.wal_prefix("task")?,
            from,
            Duration::from_millis(100),
            10_000, // the relay's `wal_batch`
        )
        .await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = stream.wait() => got?,
                    _ = &mut stopped => break,
                }
                if let Some(end) = stream.read(usize::MAX).await?.end {
                    stream.confirm(end);
                }
            }
            stream.close().await;
            Ok(())
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(());
        Ok(self.task.await??)
    }
}

/// On PostgreSQL, a checkpoint: each timed scenario starts from one (as pgbench's runs do), as
/// the backlog's drains did before; one that fell inside a scenario would add its writes, and
/// the full pages logged after it, to that scenario alone.
async fn from_checkpoint<DB: Backend>(pool: &Pool<DB>) -> Result<(), BoxError> {
    if <DB as sqlx::Database>::NAME == "PostgreSQL" {
        let mut conn = pool.acquire().await?;
        DB::execute(&mut conn, "CHECKPOINT", Vec::new()).await?;
    }
    Ok(())
}

/// A bus that counts what the broker acknowledged.
struct Counted {
    bus: Arc<KafkaBus>,
    progress: Arc<Progress>,
}

impl Publish for Counted {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        let sent = self.bus.send_all(records).await;
        let acked = sent
            .iter()
            .filter(|s| matches!(s, Sent::Acked { .. }))
            .count();
        self.progress.add(acked);
        sent
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), outbox_runtime::Error> {
        self.bus.ensure_topics(topics).await
    }
}

/// The relay settings of the scenarios: the database URL for a replication stream.
fn relay_config(o: &Options) -> RelayConfig {
    match &o.url {
        Some(url) if o.backend == "postgres" => RelayConfig::default().replication_url(url),
        _ => RelayConfig::default(),
    }
}
