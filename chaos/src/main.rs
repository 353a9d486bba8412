//! The fault-injection suite (issue 7): relays and consumers killed with -9, the broker and
//! the database restarted mid-stream, 1 % poison, racing relays and consumers, and producer
//! transactions rolled back at random. Every run keeps a ledger of what the writers did and,
//! once the system is quiet, checks that every committed event was applied exactly once, that
//! no rolled-back event was ever published, that every poison event is dead with the right
//! reason, and that no row is left outside a final state.
//!
//! ```text
//! chaos run [--quick] [--backend postgres|mysql|all] [--scenario NAME|all] [--seed N]
//!           [--events N] [--kills K] [--port P] [--keep]
//! chaos relay|consumer --backend B --database-url URL --brokers HOSTS --tag TAG --index I
//!           [--ready-file PATH] [--no-idempotence] [--inbox] [--wal]    (started by `run`)
//! ```
//!
//! The last line of `run` reads `events=N kills=K lost=L broker_stalled=S duplicate_effects=D
//! dead=X expected_dead=Y`; the exit status is 1 when any scenario failed.

mod contract;
mod driver;
mod ledger;
mod log;
mod procs;
mod role;
mod world;
mod writer;

use std::path::PathBuf;
use std::process::ExitCode;

use outbox_runtime::sqlx;

use crate::driver::{RunOptions, Scenario};
use crate::role::RoleArgs;
use crate::world::BackendKind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage:
  chaos run [--quick] [--backend postgres|mysql|all] [--scenario NAME[,NAME...]|all]
            [--seed N] [--events N] [--kills K] [--port P] [--keep]
  chaos relay|consumer --backend B --database-url URL --brokers HOSTS --tag TAG --index I
            [--ready-file PATH] [--no-idempotence] [--inbox] [--wal]
scenarios: relay-kill, consumer-kill, broker-outage, db-restart, poison, race, rollback,
  and with the consumers in a database of their own on the other server (the inbox):
  inbox-consumer-kill, inbox-db-restart (the consumers' database), inbox-poison, inbox-race,
  and with the service relayed from PostgreSQL's write-ahead log (consumers in their own
  database): wal-relay-kill, wal-consumer-kill, wal-broker-outage, wal-db-restart (the slot's
  database), wal-poison, wal-race, wal-rollback";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(args: Vec<String>) -> Result<bool, BoxError> {
    let Some((command, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    match command.as_str() {
        "run" => driver::run(run_options(rest)?).await,
        role @ ("relay" | "consumer") => {
            let (backend, args) = role_args(rest)?;
            log::init();
            eprintln!("{} {role} {} started", world::now_ms(), args.index);
            match (role, backend) {
                ("relay", BackendKind::Postgres) => role::relay::<sqlx::Postgres>(args).await?,
                ("relay", BackendKind::Mysql) => role::relay::<sqlx::MySql>(args).await?,
                (_, BackendKind::Postgres) => role::consumer::<sqlx::Postgres>(args).await?,
                (_, BackendKind::Mysql) => role::consumer::<sqlx::MySql>(args).await?,
            }
            Ok(true)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}").into()),
    }
}

fn value<'a>(
    flag: &str,
    it: &mut impl Iterator<Item = &'a String>,
) -> Result<&'a String, BoxError> {
    it.next()
        .ok_or_else(|| format!("{flag} needs a value").into())
}

fn run_options(args: &[String]) -> Result<RunOptions, BoxError> {
    let mut o = RunOptions {
        quick: false,
        backends: vec![BackendKind::Postgres, BackendKind::Mysql],
        scenarios: Scenario::ALL.to_vec(),
        seed: u64::from(fastrand::u32(..)),
        port: 9094,
        postgres_url: BackendKind::Postgres.default_url(),
        mysql_url: BackendKind::Mysql.default_url(),
        events: None,
        kills: None,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--backend" => {
                let v = value(flag, &mut it)?;
                o.backends = if v == "all" {
                    vec![BackendKind::Postgres, BackendKind::Mysql]
                } else {
                    v.split(',')
                        .map(|b| {
                            BackendKind::parse(b)
                                .ok_or_else(|| format!("unknown backend `{b}`; postgres or mysql"))
                        })
                        .collect::<Result<_, _>>()?
                };
            }
            "--scenario" => {
                let v = value(flag, &mut it)?;
                o.scenarios = if v == "all" {
                    Scenario::ALL.to_vec()
                } else {
                    v.split(',')
                        .map(|s| {
                            Scenario::parse(s)
                                .ok_or_else(|| format!("unknown scenario `{s}`\n{USAGE}"))
                        })
                        .collect::<Result<_, _>>()?
                };
            }
            "--seed" => o.seed = value(flag, &mut it)?.parse()?,
            "--events" => o.events = Some(value(flag, &mut it)?.parse()?),
            "--kills" => o.kills = Some(value(flag, &mut it)?.parse()?),
            "--port" => o.port = value(flag, &mut it)?.parse()?,
            other => return Err(format!("unknown option `{other}`\n{USAGE}").into()),
        }
    }
    Ok(o)
}

fn role_args(args: &[String]) -> Result<(BackendKind, RoleArgs), BoxError> {
    let mut backend = None;
    let mut r = RoleArgs {
        url: String::new(),
        brokers: String::new(),
        tag: String::new(),
        index: 0,
        idempotent: true,
        inbox: false,
        wal: false,
        ready_file: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--no-idempotence" {
            r.idempotent = false;
            continue;
        }
        if flag == "--inbox" {
            r.inbox = true;
            continue;
        }
        if flag == "--wal" {
            r.wal = true;
            continue;
        }
        let v = value(flag, &mut it)?;
        match flag.as_str() {
            "--backend" => {
                backend =
                    Some(BackendKind::parse(v).ok_or_else(|| format!("unknown backend `{v}`"))?)
            }
            "--database-url" => r.url = v.clone(),
            "--brokers" => r.brokers = v.clone(),
            "--tag" => r.tag = v.clone(),
            "--index" => r.index = v.parse()?,
            "--ready-file" => r.ready_file = Some(PathBuf::from(v)),
            other => return Err(format!("unknown option `{other}`\n{USAGE}").into()),
        }
    }
    let backend = backend.ok_or("--backend is required")?;
    if r.url.is_empty() || r.brokers.is_empty() || r.tag.is_empty() {
        return Err("--database-url, --brokers and --tag are required".into());
    }
    Ok((backend, r))
}
