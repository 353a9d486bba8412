//! The driver: for each backend and scenario, fresh tables and topic, relay and consumer
//! processes, writers keeping a ledger, the fault, then — once the system is quiet — the
//! ledger checked against the tables.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_runtime::Outbox;
use outbox_runtime::bus::{KafkaBus, Publish as _};
use outbox_runtime::sqlx::{self, Pool};
use outbox_runtime::store::Arg;

use crate::BoxError;
use crate::contract::SERVICE;
use crate::ledger::{self, Entry, Side, Verdict};
use crate::procs::{self, Broker, RoleProc, Spawner};
use crate::world::{self, BackendKind, ChaosDb, Names};
use crate::writer::{Mix, Writer};

/// How long a killed consumer stays down: past its session, so that the broker has dropped it
/// by the time its replacement joins (see the kill loop).
const CONSUMER_RESTART: Duration = world::SESSION_TIMEOUT.saturating_add(Duration::from_secs(1));

/// The scenarios of issue 7, then those of issue 14 (the consumers in a database of their
/// own), in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    RelayKill,
    ConsumerKill,
    BrokerOutage,
    DbRestart,
    Poison,
    Race,
    Rollback,
    InboxConsumerKill,
    /// The consumers' own database restarted.
    InboxDbRestart,
    InboxPoison,
    InboxRace,
    /// The same faults on a service relayed from PostgreSQL's write-ahead log (its consumers
    /// in their own database, the inbox).
    WalRelayKill,
    WalConsumerKill,
    WalBrokerOutage,
    /// The producer's database (the slot's) restarted.
    WalDbRestart,
    WalPoison,
    WalRace,
    WalRollback,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 18] = [
        Scenario::RelayKill,
        Scenario::ConsumerKill,
        Scenario::BrokerOutage,
        Scenario::DbRestart,
        Scenario::Poison,
        Scenario::Race,
        Scenario::Rollback,
        Scenario::InboxConsumerKill,
        Scenario::InboxDbRestart,
        Scenario::InboxPoison,
        Scenario::InboxRace,
        Scenario::WalRelayKill,
        Scenario::WalConsumerKill,
        Scenario::WalBrokerOutage,
        Scenario::WalDbRestart,
        Scenario::WalPoison,
        Scenario::WalRace,
        Scenario::WalRollback,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::RelayKill => "relay-kill",
            Scenario::ConsumerKill => "consumer-kill",
            Scenario::BrokerOutage => "broker-outage",
            Scenario::DbRestart => "db-restart",
            Scenario::Poison => "poison",
            Scenario::Race => "race",
            Scenario::Rollback => "rollback",
            Scenario::InboxConsumerKill => "inbox-consumer-kill",
            Scenario::InboxDbRestart => "inbox-db-restart",
            Scenario::InboxPoison => "inbox-poison",
            Scenario::InboxRace => "inbox-race",
            Scenario::WalRelayKill => "wal-relay-kill",
            Scenario::WalConsumerKill => "wal-consumer-kill",
            Scenario::WalBrokerOutage => "wal-broker-outage",
            Scenario::WalDbRestart => "wal-db-restart",
            Scenario::WalPoison => "wal-poison",
            Scenario::WalRace => "wal-race",
            Scenario::WalRollback => "wal-rollback",
        }
    }

    /// The service is relayed from the write-ahead log (PostgreSQL only).
    pub(crate) fn wal(self) -> bool {
        matches!(
            self,
            Scenario::WalRelayKill
                | Scenario::WalConsumerKill
                | Scenario::WalBrokerOutage
                | Scenario::WalDbRestart
                | Scenario::WalPoison
                | Scenario::WalRace
                | Scenario::WalRollback
        )
    }

    /// The consumers run in a database of their own, on the other server (`Dedupe::Inbox`).
    pub(crate) fn own_db(self) -> bool {
        self != self.base()
    }

    /// The fault, whatever the consumers' database.
    fn base(self) -> Self {
        match self {
            Scenario::InboxConsumerKill => Scenario::ConsumerKill,
            Scenario::InboxDbRestart => Scenario::DbRestart,
            Scenario::InboxPoison => Scenario::Poison,
            Scenario::InboxRace => Scenario::Race,
            Scenario::WalRelayKill => Scenario::RelayKill,
            Scenario::WalConsumerKill => Scenario::ConsumerKill,
            Scenario::WalBrokerOutage => Scenario::BrokerOutage,
            Scenario::WalDbRestart => Scenario::DbRestart,
            Scenario::WalPoison => Scenario::Poison,
            Scenario::WalRace => Scenario::Race,
            Scenario::WalRollback => Scenario::Rollback,
            other => other,
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// What `chaos run` was asked.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) quick: bool,
    pub(crate) backends: Vec<BackendKind>,
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) seed: u64,
    pub(crate) port: u16,
    pub(crate) postgres_url: String,
    pub(crate) mysql_url: String,
    /// Events per scenario instead of the mode's default.
    pub(crate) events: Option<u64>,
    /// Kills per kill scenario instead of the mode's default.
    pub(crate) kills: Option<u32>,
    /// Keep the tables of passing runs too.
    pub(crate) keep: bool,
}

/// The fault a run injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    KillRelay(u32),
    KillConsumer(u32),
    /// Broker down for this long, from 30 % of the write window.
    Broker(Duration),
    /// Database down for this long, from 30 % of the write window.
    Database(Duration),
}

/// One run of a scenario.
#[derive(Debug, Clone, Copy)]
struct Plan {
    events: u64,
    /// Events per second (0: as fast as the writers go).
    rate: f64,
    writers: usize,
    relays: usize,
    consumers: usize,
    poison_every: u64,
    rollback: f64,
    fault: Fault,
    /// Write every event before the relays start, and time the relays and consumers alone
    /// from their start to the last healthy effect.
    backlog: bool,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
struct Outcome {
    verdict: Verdict,
    kills: u32,
    /// Healthy events per second, first write to last effect.
    throughput: f64,
    elapsed: Duration,
    quiet: bool,
    tag: String,
}

/// One line per scenario and backend, and the totals.
#[derive(Debug, Default)]
struct Totals {
    events: u64,
    kills: u64,
    lost: u64,
    stalled: u64,
    duplicate_effects: u64,
    dead: u64,
    expected_dead: u64,
    failed: Vec<String>,
}

fn seed_for(seed: u64, backend: BackendKind, scenario: Scenario) -> u64 {
    // FNV-1a over the names: a scenario's seed does not depend on which others run.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in backend.name().bytes().chain(scenario.name().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn plan(o: &RunOptions, scenario: Scenario) -> Plan {
    let q = o.quick;
    let events = o.events.unwrap_or(if q { 300 } else { 3000 });
    let kills = o.kills.unwrap_or(if q { 2 } else { 6 });
    // A stream long enough for the faults to land in it.
    let rate = if q { 50.0 } else { 100.0 };
    let base = Plan {
        events,
        rate,
        writers: 2,
        relays: 1,
        consumers: 1,
        poison_every: 0,
        rollback: 0.0,
        fault: Fault::None,
        backlog: false,
    };
    match scenario.base() {
        Scenario::RelayKill => Plan {
            fault: Fault::KillRelay(kills),
            ..base
        },
        Scenario::ConsumerKill => Plan {
            fault: Fault::KillConsumer(kills),
            ..base
        },
        Scenario::BrokerOutage => Plan {
            // Quick: 8 s down, so that the run stays short; full: the 20 s.
            fault: Fault::Broker(Duration::from_secs(if q { 8 } else { 20 })),
            ..base
        },
        Scenario::DbRestart => Plan {
            fault: Fault::Database(Duration::from_secs(2)),
            ..base
        },
        Scenario::Poison => Plan {
            // The full run compares throughput: a backlog long enough that the fixed cost of
            // the always-failing events' retries (their keys wait for them, in order: about
            // 0.3 s) is not what is measured. On the broker's memory storage 3,000 events drain
            // in under a second.
            events: o.events.unwrap_or(if q { 800 } else { 12_000 }),
            rate: 0.0,
            writers: 8,
            poison_every: 100,
            backlog: true,
            ..base
        },
        Scenario::Race => Plan {
            relays: 3,
            consumers: 3,
            rate: rate * 2.0,
            events: events * 2,
            ..base
        },
        Scenario::Rollback => Plan {
            rollback: 0.1,
            ..base
        },
        _ => unreachable!("`base` is a scenario of the shared database and the table"),
    }
}

/// Runs every asked scenario on every asked backend; true when all passed.
pub(crate) async fn run(o: RunOptions) -> Result<bool, BoxError> {
    let dir = std::env::temp_dir().join(format!("outbox-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    println!(
        "chaos: {} run, seed {}, scenarios {}, backends {}; logs in {}",
        if o.quick { "quick" } else { "full" },
        o.seed,
        o.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        o.backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(","),
        dir.display()
    );
    let mut servers: Vec<BackendKind> = o.backends.clone();
    if o.scenarios.iter().any(|s| s.own_db()) {
        servers.extend(o.backends.iter().map(|b| b.other()));
    }
    servers.dedup();
    for b in &servers {
        procs::ensure_up(*b)?;
    }
    let mut broker = Broker::start(o.port, &dir)?;
    let mut totals = Totals::default();
    let started = Instant::now();
    for &backend in &o.backends {
        let _servers = procs::ServerGuard(backend);
        for &scenario in &o.scenarios {
            if scenario.wal() && backend != BackendKind::Postgres {
                // Not a skip: the write-ahead-log relay is PostgreSQL's, and its scenarios are
                // in the postgres backend's matrix.
                continue;
            }
            let seed = seed_for(o.seed, backend, scenario);
            let outage = scenario.base() == Scenario::BrokerOutage;
            if let Err(e) = broker.storage(outage) {
                println!("scenario={} broker error: {e} FAIL", scenario.name());
                totals.failed.push(scenario.name().to_owned());
                continue;
            }
            let ctx = Ctx {
                options: &o,
                exe: exe.clone(),
                dir: dir.clone(),
                backend,
                scenario,
                seed,
            };
            let _consumer_server = scenario
                .own_db()
                .then(|| procs::ServerGuard(backend.other()));
            type Pg = sqlx::Postgres;
            type My = sqlx::MySql;
            let result = match (backend, scenario.own_db()) {
                (BackendKind::Postgres, false) => scenario_on::<Pg, Pg>(&ctx, &mut broker).await,
                (BackendKind::Postgres, true) => scenario_on::<Pg, My>(&ctx, &mut broker).await,
                (BackendKind::Mysql, false) => scenario_on::<My, My>(&ctx, &mut broker).await,
                (BackendKind::Mysql, true) => scenario_on::<My, Pg>(&ctx, &mut broker).await,
            };
            let consumers = if scenario.own_db() {
                format!(" consumer_db={}", backend.other().name())
            } else {
                String::new()
            };
            let id = format!(
                "scenario={} backend={}{consumers} seed={}",
                scenario.name(),
                backend.name(),
                o.seed
            );
            match result {
                Ok(lines) => {
                    for (outcome, ok, extra) in lines {
                        let v = &outcome.verdict;
                        println!(
                            "{id} {} kills={} elapsed={:.1}s tag={}{extra} {}",
                            v,
                            outcome.kills,
                            outcome.elapsed.as_secs_f64(),
                            outcome.tag,
                            if ok { "PASS" } else { "FAIL" }
                        );
                        for p in &v.problems {
                            println!("    {p}");
                        }
                        if !outcome.quiet {
                            println!("    the system was not quiet before the timeout");
                        }
                        totals.events += v.events;
                        totals.kills += u64::from(outcome.kills);
                        totals.lost += v.lost;
                        totals.stalled += v.stalled;
                        totals.duplicate_effects += v.duplicate_effects;
                        totals.dead += v.dead;
                        totals.expected_dead += v.expected_dead;
                        if !ok {
                            totals.failed.push(id.clone());
                        }
                    }
                }
                Err(e) => {
                    println!("{id} error: {e} FAIL");
                    totals.failed.push(id.clone());
                }
            }
        }
    }
    drop(broker);
    if totals.failed.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "chaos: {} in {:.0} s; failed: {}",
        if totals.failed.is_empty() {
            "every scenario passed"
        } else {
            "some scenarios failed"
        },
        started.elapsed().as_secs_f64(),
        if totals.failed.is_empty() {
            "none".to_owned()
        } else {
            totals.failed.join("; ")
        }
    );
    println!(
        "events={} kills={} lost={} broker_stalled={} duplicate_effects={} dead={} expected_dead={}",
        totals.events,
        totals.kills,
        totals.lost,
        totals.stalled,
        totals.duplicate_effects,
        totals.dead,
        totals.expected_dead
    );
    Ok(totals.failed.is_empty())
}

struct Ctx<'a> {
    options: &'a RunOptions,
    exe: PathBuf,
    dir: PathBuf,
    backend: BackendKind,
    scenario: Scenario,
    seed: u64,
}

impl Ctx<'_> {
    fn url(&self) -> &str {
        self.url_of(self.backend)
    }

    fn url_of(&self, kind: BackendKind) -> &str {
        match kind {
            BackendKind::Postgres => &self.options.postgres_url,
            BackendKind::Mysql => &self.options.mysql_url,
        }
    }

    /// The consumers' database.
    fn consumer_backend(&self) -> BackendKind {
        if self.scenario.own_db() {
            self.backend.other()
        } else {
            self.backend
        }
    }
}

/// A scenario's lines: each run's outcome, whether it passed, and extra figures.
type Lines = Vec<(Outcome, bool, String)>;

async fn scenario_on<DB: ChaosDb, C: ChaosDb>(
    ctx: &Ctx<'_>,
    broker: &mut Broker,
) -> Result<Lines, BoxError> {
    let p = plan(ctx.options, ctx.scenario);
    if ctx.scenario.base() != Scenario::Poison {
        let outcome = run_once::<DB, C>(ctx, broker, p, ctx.seed).await?;
        let ok = outcome.verdict.ok() && outcome.quiet;
        return Ok(vec![(outcome, ok, String::new())]);
    }
    // Healthy throughput with 1 % poison against a clean run of the same size. A warm-up run
    // first (caches, the broker's storage); then clean and poison runs in turn, the best of
    // each compared, so that one slow moment of a 2-core machine does not decide.
    let warm = Plan {
        events: p.events / 8,
        poison_every: 0,
        ..p
    };
    let _ = run_once::<DB, C>(ctx, broker, warm, ctx.seed ^ 1).await?;
    let rounds = if ctx.options.quick { 1 } else { 2 };
    let mut lines = Vec::new();
    let (mut clean_best, mut poison_best) = (0.0f64, 0.0f64);
    let mut round = 0;
    loop {
        round += 1;
        // Clean first in odd rounds, poison first in even ones; each on a new broker, so
        // that neither inherits the other's log.
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for poisoned in order {
            broker.reset()?;
            let plan = Plan {
                poison_every: if poisoned { p.poison_every } else { 0 },
                ..p
            };
            let o = run_once::<DB, C>(ctx, broker, plan, ctx.seed).await?;
            if poisoned {
                poison_best = poison_best.max(o.throughput);
            } else {
                clean_best = clean_best.max(o.throughput);
            }
            lines.push((o, round, poisoned));
        }
        // One more round when the figures are apart: the machine's noise is about that size.
        let close = poison_best >= 0.8 * clean_best;
        if round >= rounds && (close || round > rounds) {
            break;
        }
    }
    // The quick run's few seconds of 800 events cannot tell 20% from this machine's noise, nor
    // from the retry backoff of the always-failing event holding its key's later events: it
    // reports the ratio, and the full run (12,000 events, two rounds) enforces it, with the
    // consumers in their own database too (there a failing message is kept in that database
    // for its retry, and its partition moves on).
    let enforced = !ctx.options.quick;
    let within = !enforced || poison_best >= 0.8 * clean_best;
    let n = lines.len();
    Ok(lines
        .into_iter()
        .enumerate()
        .map(|(i, (o, round, poisoned))| {
            let kind = if poisoned { "poison" } else { "clean" };
            let last = i + 1 == n;
            let ok = o.verdict.ok() && o.quiet && (!last || within);
            let mut extra = format!(" run={kind}#{round} healthy_per_s={:.0}", o.throughput);
            if last {
                extra.push_str(&format!(
                    " best_clean_per_s={clean_best:.0} best_poison_per_s={poison_best:.0} ratio={:.2} ({})",
                    if clean_best > 0.0 { poison_best / clean_best } else { 0.0 },
                    if enforced {
                        "at least 0.80"
                    } else {
                        "reported; the full run checks it"
                    }
                ));
            }
            (o, ok, extra)
        })
        .collect())
}

async fn run_once<DB: ChaosDb, C: ChaosDb>(
    ctx: &Ctx<'_>,
    broker: &mut Broker,
    p: Plan,
    seed: u64,
) -> Result<Outcome, BoxError> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let tag = format!("c{:08x}", fastrand::u32(..));
    let names = Names::new(&tag);
    let pool = DB::pool(ctx.url(), 8).await?;
    let catalog = names.catalog()?;
    let route = catalog
        .service(SERVICE)
        .cloned()
        .ok_or("the chaos service has no route")?;
    let (topic, group) = (route.topic, route.group);
    let topic_name = topic.clone();
    let wal = ctx.scenario.wal();
    let build = |attempts| {
        let outbox = Outbox::<DB>::builder(catalog.clone()).config(world::store_config(attempts));
        if wal { outbox.wal(SERVICE) } else { Ok(outbox) }.map(|o| o.build())
    };
    let outbox = build(world::HEALTHY_MAX_ATTEMPTS)?;
    let failing = build(world::FAILING_MAX_ATTEMPTS)?;
    let own_db = ctx.scenario.own_db();
    // The consumers' database: the producer's, or their own on the other server.
    let consumer_url = ctx.url_of(ctx.consumer_backend()).to_owned();
    let consumer_pool = C::pool(&consumer_url, 4).await?;
    let consumer_outbox = Outbox::<C>::new(catalog);
    let side = if own_db {
        Side::Own {
            pool: &consumer_pool,
            outbox: &consumer_outbox,
            group: &group,
        }
    } else {
        Side::Shared(&consumer_pool)
    };
    {
        let mut conn = consumer_pool.acquire().await?;
        consumer_outbox.migrate(&mut conn).await?;
        C::execute(
            &mut conn,
            &format!(
                "CREATE TABLE {} (event_id VARCHAR(36) NOT NULL, seq BIGINT NOT NULL, \
                 consumer VARCHAR(64) NOT NULL, applied_at BIGINT NOT NULL)",
                names.effects
            ),
            Vec::new(),
        )
        .await?;
    }
    {
        let mut conn = pool.acquire().await?;
        outbox.migrate(&mut conn).await?;
        DB::execute(
            &mut conn,
            &format!(
                "CREATE TABLE {} (seq BIGINT PRIMARY KEY, note VARCHAR(64) NOT NULL)",
                names.business
            ),
            Vec::new(),
        )
        .await?;
    }
    // A broker that no longer answers (tansu's SQLite storage can die after a restart) is
    // replaced, once, rather than failing every later scenario.
    if let Err(e) = create_topic(&broker.address(), &topic).await {
        println!("    the broker did not create the topic ({e}); starting a new one");
        broker.reset()?;
        create_topic(&broker.address(), &topic).await?;
    }

    let spawner = Spawner {
        exe: ctx.exe.clone(),
        backend: ctx.backend,
        url: ctx.url().to_owned(),
        brokers: broker.address(),
        tag: tag.clone(),
        dir: ctx.dir.clone(),
        idempotent: !matches!(p.fault, Fault::Broker(_)),
        consumer_backend: ctx.consumer_backend(),
        consumer_url: consumer_url.clone(),
        inbox: own_db,
        wal,
    };
    let spawn_relays = || {
        (0..p.relays)
            .map(|i| spawner.spawn("relay", i))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut relays = if p.backlog {
        Vec::new()
    } else {
        spawn_relays()?
    };
    let mut consumers = (0..p.consumers)
        .map(|i| spawner.spawn("consumer", i))
        .collect::<Result<Vec<_>, _>>()?;
    wait_ready(&mut relays, &mut consumers, Duration::from_secs(90)).await?;

    // The stream, and the fault while it flows.
    let ledger = Arc::new(Mutex::new(Vec::<Entry>::new()));
    let writer = Arc::new(Writer {
        pool: pool.clone(),
        outbox: outbox.clone(),
        failing,
        names: names.clone(),
        topic,
        mix: Mix {
            seed,
            poison_every: p.poison_every,
            rollback: p.rollback,
        },
        wal,
    });
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut start_ms = world::now_ms();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..p.writers {
        writers.spawn(
            writer
                .clone()
                .run(next.clone(), p.events, p.rate, start, ledger.clone()),
        );
    }
    let window = if p.rate > 0.0 {
        Duration::from_secs_f64(p.events as f64 / p.rate)
    } else {
        Duration::from_secs(2)
    };
    if p.backlog {
        while writers.join_next().await.is_some() {}
        start_ms = world::now_ms();
        relays = spawn_relays()?;
    }
    let mut kills = 0;
    let mut restarted_broker = false;
    match p.fault {
        Fault::None => {}
        Fault::KillRelay(k) | Fault::KillConsumer(k) => {
            let (role, procs) = match p.fault {
                Fault::KillRelay(_) => ("relay", &mut relays),
                _ => ("consumer", &mut consumers),
            };
            let mut at: Vec<f64> = (0..k).map(|_| 0.05 + 0.8 * rng.f64()).collect();
            at.sort_by(f64::total_cmp);
            for frac in at {
                // At its moment, whatever the process is doing: starting, joining its group,
                // or working.
                tokio::time::sleep_until(start + window.mul_f64(frac)).await;
                let i = rng.usize(..procs.len());
                procs[i].kill();
                kills += 1;
                // Back after a moment, as a supervisor would restart it. A consumer stays down
                // past its session: tansu 0.6 cannot take a dead member's partitions back from a
                // formed group. When a live member's heartbeat finds that another member's
                // session ran out, tansu drops that member but keeps the group formed, with no
                // new generation (`Inner<Formed>::heartbeat`, coordinator/group/
                // administrator.rs), so the live member's rejoin gets its old assignment back
                // and the dead member's partitions are read by nobody, for good. A consumer
                // restarted at once, killed again while its group formed around it, left two of
                // three partitions unread this way (seen with CHAOS_KAFKA_DEBUG=cgrp). A Kafka
                // coordinator rebalances when a session runs out; tansu does too when it
                // notices on a join, which is what the replacement's join is, once the session
                // is over.
                let down = match p.fault {
                    Fault::KillConsumer(_) => CONSUMER_RESTART,
                    _ => Duration::from_millis(rng.u64(0..300)),
                };
                tokio::time::sleep(down).await;
                procs[i] = spawner.spawn(role, i)?;
            }
        }
        Fault::Broker(down) => {
            tokio::time::sleep_until(start + window.mul_f64(0.3)).await;
            broker.down();
            tokio::time::sleep(down).await;
            broker.up()?;
            restarted_broker = true;
        }
        Fault::Database(down) => {
            tokio::time::sleep_until(start + window.mul_f64(0.3)).await;
            // With their own database, the consumers' side goes down; with the write-ahead
            // log, the slot's.
            let kind = if wal {
                ctx.backend
            } else {
                ctx.consumer_backend()
            };
            tokio::task::spawn_blocking(move || procs::restart_database(kind, down)).await??;
        }
    }
    while writers.join_next().await.is_some() {}

    // Quiet: no row open and the effects count still for a while, or the timeout.
    let timeout = Duration::from_secs(if ctx.options.quick { 90 } else { 240 });
    let quiet = wait_quiet(
        &pool,
        side,
        &names,
        wal,
        timeout,
        &mut relays,
        &mut consumers,
    )
    .await;
    let ledger = std::mem::take(
        &mut *ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut verdict = ledger::verify(&pool, side, &names, wal, &ledger).await?;
    if !verdict.unread_keys.is_empty() {
        // Published and never applied: where its partition's group offset is behind the log's
        // end, the consumers stopped reading it (the broker's stall); at the end, they read past
        // it (a loss of ours).
        let (brokers, group, topic) = (broker.address(), group.clone(), topic_name.clone());
        let lags = tokio::task::spawn_blocking(move || kafka_lags(&brokers, &group, &topic)).await;
        if let Ok(Ok(lags)) = lags {
            let n = i32::try_from(lags.len()).unwrap_or(0);
            verdict.blame_stalls(|key| {
                let p = outbox_runtime::bus::partition_for(key.as_bytes(), n);
                lags.get(&p).is_some_and(|(committed, end)| committed < end)
            });
        }
    }
    if !quiet || !verdict.ok() {
        let (brokers, group, topic) = (broker.address(), group.clone(), topic_name.clone());
        let positions =
            tokio::task::spawn_blocking(move || kafka_positions(&brokers, &group, &topic))
                .await
                .unwrap_or_else(|e| e.to_string());
        println!("    kafka: {positions}");
    }
    let throughput = healthy_throughput::<C>(&consumer_pool, &names, start_ms).await?;

    for proc in relays.into_iter().chain(consumers) {
        let _ = proc.stop(Duration::from_secs(15)).await;
    }
    if wal {
        // Whatever the verdict: a slot left behind keeps the server's WAL.
        let mut conn = pool.acquire().await?;
        let slot = outbox.wal_slot(SERVICE)?;
        DB::execute(
            &mut conn,
            "SELECT pg_drop_replication_slot($1)::TEXT",
            vec![Arg::Str(slot)],
        )
        .await?;
    }
    if restarted_broker {
        // Later scenarios start from a broker that was never restarted.
        broker.reset()?;
    }
    if verdict.ok() && quiet && !ctx.options.keep {
        drop_tables(&pool, &names).await?;
        if own_db {
            drop_tables(&consumer_pool, &names).await?;
            forget_group(&consumer_pool, &group).await?;
        }
    }
    Ok(Outcome {
        verdict,
        kills,
        throughput,
        elapsed: started.elapsed(),
        quiet,
        tag,
    })
}

/// Per partition, the group's committed offset (the log's start when none) and the log's end.
fn kafka_lags(
    brokers: &str,
    group: &str,
    topic: &str,
) -> Result<std::collections::BTreeMap<i32, (i64, i64)>, BoxError> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::util::Timeout;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Timeout::After(Duration::from_secs(5));
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = std::collections::BTreeMap::new();
    for e in committed.elements() {
        let (low, end) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let at = match e.offset() {
            rdkafka::Offset::Offset(at) => at,
            _ => low,
        };
        out.insert(e.partition(), (at, end));
    }
    Ok(out)
}

/// Per partition, the group's committed offset against the log's end: a committed offset at
/// the end with rows still `published` means messages were skipped; one behind means the
/// consumers stopped reading.
fn kafka_positions(brokers: &str, group: &str, topic: &str) -> String {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::util::Timeout;
    let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let timeout = Timeout::After(Duration::from_secs(5));
    let partitions = match consumer.fetch_metadata(Some(topic), timeout) {
        Ok(m) => m
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        Err(e) => return format!("metadata: {e}"),
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout);
    let mut out = Vec::new();
    for p in partitions {
        let end = consumer
            .fetch_watermarks(topic, p, timeout)
            .map(|(_, high)| high.to_string())
            .unwrap_or_else(|e| e.to_string());
        let at = committed
            .as_ref()
            .ok()
            .and_then(|c| c.find_partition(topic, p))
            .map(|e| format!("{:?}", e.offset()))
            .unwrap_or_else(|| "?".into());
        out.push(format!("p{p} committed {at} end {end}"));
    }
    out.join(", ")
}

async fn create_topic(brokers: &str, topic: &str) -> Result<(), BoxError> {
    let config = world::kafka(brokers).topic_timeout(Duration::from_secs(15));
    KafkaBus::new(config)?
        .ensure_topics(&[topic.to_owned()])
        .await?;
    Ok(())
}

async fn wait_ready(
    relays: &mut [RoleProc],
    consumers: &mut [RoleProc],
    timeout: Duration,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for p in relays.iter_mut().chain(consumers.iter_mut()) {
            if let Some(status) = p.exited() {
                return Err(format!("{} {} exited at start: {status}", p.role, p.index).into());
            }
            all &= p.is_ready();
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("relays and consumers not ready within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn wait_quiet<DB: ChaosDb, C: ChaosDb>(
    pool: &Pool<DB>,
    side: Side<'_, C>,
    names: &Names,
    wal: bool,
    timeout: Duration,
    relays: &mut [RoleProc],
    consumers: &mut [RoleProc],
) -> bool {
    let deadline = Instant::now() + timeout;
    let (mut last, mut still) = (-1, 0);
    let mut reported = std::collections::HashSet::new();
    loop {
        // A process that stops by itself is a finding: it is reported, not restarted.
        for p in relays.iter_mut().chain(consumers.iter_mut()) {
            if let Some(status) = p.exited()
                && reported.insert((p.role, p.index))
            {
                println!("    {} {} exited by itself: {status}", p.role, p.index);
            }
        }
        if let Ok((open, effects)) = ledger::progress(pool, side, names, wal).await {
            if open == 0 && effects == last {
                still += 1;
                // Two seconds without a change: a late duplicate would have shown by now.
                if still >= 4 {
                    return true;
                }
            } else {
                still = 0;
            }
            last = effects;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn healthy_throughput<DB: ChaosDb>(
    pool: &Pool<DB>,
    names: &Names,
    start_ms: i64,
) -> Result<f64, BoxError> {
    let mut conn = pool.acquire().await?;
    let mut one = async |sql: String| -> Result<Option<i64>, BoxError> {
        Ok(DB::fetch_ints(&mut conn, &sql, Vec::new())
            .await?
            .into_iter()
            .next()
            .flatten())
    };
    let count = one(format!("SELECT COUNT(*) FROM {}", names.effects)).await?;
    let last = one(format!("SELECT MAX(applied_at) FROM {}", names.effects)).await?;
    let secs = (last.unwrap_or(start_ms) - start_ms).max(1) as f64 / 1000.0;
    Ok(count.unwrap_or(0) as f64 / secs)
}

/// A consumer group's inbox records, dead letters, kept retries and calls, in its own
/// database.
async fn forget_group<C: ChaosDb>(pool: &Pool<C>, group: &str) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    for t in [
        "outbox_inbox",
        "outbox_inbox_dead",
        "outbox_inbox_retry",
        "outbox_calls",
    ] {
        let sql =
            C::dialect_sql(&format!("DELETE FROM {t} WHERE consumer_group = $1")).into_owned();
        C::execute(&mut conn, &sql, vec![Arg::Str(group.to_owned())]).await?;
        if let Some(reclaim) = C::reclaim(t) {
            C::execute(&mut conn, &reclaim, Vec::new()).await?;
        }
    }
    Ok(())
}

async fn drop_tables<DB: ChaosDb>(pool: &Pool<DB>, names: &Names) -> Result<(), BoxError> {
    let mut conn = pool.acquire().await?;
    for t in [&names.table, &names.effects, &names.business] {
        DB::execute(&mut conn, &format!("DROP TABLE IF EXISTS {t}"), Vec::new()).await?;
    }
    Ok(())
}
