//! The processes the driver starts and kills: a relay, and a consumer whose handler writes one
//! effect row per application in the transaction that marks the event consumed.
//!
//! Each runs until its standard input closes (the driver's graceful stop) or it is killed.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use outbox_runtime::consumer::{ConsumerConfig, Context, Dedupe};
use outbox_runtime::relay::RelayConfig;
use outbox_runtime::store::{Arg, Backend};
use outbox_runtime::{Engine, HandlerError, Outbox};

use crate::BoxError;
use crate::contract::{ChaosEvents, ChaosEventsHandler, SERVICE, TickRecorded};
use crate::world::{self, ChaosDb, Names};

/// What a role process is told.
#[derive(Debug, Clone)]
pub(crate) struct RoleArgs {
    pub(crate) url: String,
    pub(crate) brokers: String,
    pub(crate) tag: String,
    pub(crate) index: usize,
    /// The relay's producer is idempotent (the runtime's default).
    pub(crate) idempotent: bool,
    /// A consumer in a database of its own: it records applied events in the inbox and keeps
    /// its dead letters there.
    pub(crate) inbox: bool,
    /// A relay of a service relayed from the write-ahead log.
    pub(crate) wal: bool,
    /// Created once the process is working (a consumer: once it has partitions).
    pub(crate) ready_file: Option<PathBuf>,
}

/// The handler: one effect row per application.
struct Applier {
    effects: String,
    name: String,
}

impl<DB: Backend> ChaosEventsHandler<Context<DB>> for Applier {
    async fn tick_recorded(
        &self,
        ctx: &mut Context<DB>,
        e: TickRecorded,
    ) -> Result<(), HandlerError> {
        if e.always_fail {
            return Err(HandlerError::retry(
                "the chaos handler fails on this event every time",
            ));
        }
        let sql = DB::dialect_sql(&format!(
            "INSERT INTO {} (event_id, seq, consumer, applied_at) VALUES ($1, $2, $3, $4)",
            self.effects
        ))
        .into_owned();
        let args = vec![
            Arg::Str(ctx.meta().event_id.clone()),
            Arg::I64(i64::try_from(e.seq).unwrap_or(i64::MAX)),
            Arg::Str(self.name.clone()),
            Arg::I64(world::now_ms()),
        ];
        DB::execute(ctx.tx(), &sql, args).await?;
        Ok(())
    }
}

/// Resolves when standard input closes.
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    rx
}

fn mark_ready(args: &RoleArgs) -> Result<(), BoxError> {
    if let Some(path) = &args.ready_file {
        std::fs::write(path, b"ready\n")?;
    }
    Ok(())
}

pub(crate) async fn relay<DB: ChaosDb>(args: RoleArgs) -> Result<(), BoxError> {
    let stop = stdin_closed();
    let names = Names::new(&args.tag);
    let pool = DB::pool(&args.url, 4).await?;
    let mut outbox = Outbox::<DB>::builder(names.catalog()?)
        .config(world::store_config(world::HEALTHY_MAX_ATTEMPTS));
    if args.wal {
        outbox = outbox.wal(SERVICE)?;
    }
    let outbox = outbox.build();
    let kafka = world::relay_kafka(&args.brokers, args.idempotent);
    let running = Engine::builder(pool, kafka)
        .outbox(outbox)
        .relay(
            RelayConfig::default()
                .owner(format!("chaos-relay-{}-{}", args.index, std::process::id()))
                .batch(200)
                .lease(world::LEASE)
                .poll_interval(Duration::from_millis(200))
                // A write-ahead-log service's slot is streamed with the URL's credentials.
                .replication_url(&args.url),
        )
        .start()
        .await?;
    mark_ready(&args)?;
    let _ = stop.await;
    running.shutdown().await?;
    Ok(())
}

pub(crate) async fn consumer<DB: ChaosDb>(args: RoleArgs) -> Result<(), BoxError> {
    let stop = stdin_closed();
    let names = Names::new(&args.tag);
    let pool = DB::pool(&args.url, 8).await?;
    let outbox = Outbox::<DB>::builder(names.catalog()?)
        .config(world::store_config(world::HEALTHY_MAX_ATTEMPTS))
        .build();
    let applier = Applier {
        effects: names.effects.clone(),
        name: format!("consumer-{}-{}", args.index, std::process::id()),
    };
    // A partition nobody reads (tansu's coordinator after a member's session ran out) is
    // noticed well inside a scenario's quiet timeout.
    let mut config = ConsumerConfig::default()
        .workers(3)
        .rejoin_after(world::REJOIN_AFTER);
    if args.inbox {
        // As many attempts as the failing events' rows have in the shared database.
        config = config
            .dedupe(Dedupe::Inbox)
            .inbox_attempts(world::FAILING_MAX_ATTEMPTS.unsigned_abs());
    }
    // A consumer role only consumes: the relay roles relay.
    let running = Engine::builder(pool, world::kafka(&args.brokers))
        .outbox(outbox)
        .without_relay()
        .consumer_with::<ChaosEvents, _>(applier, config)
        .start()
        .await?;
    let mut stop = std::pin::pin!(stop);
    let stopped = tokio::select! {
        ready = running.ready(Duration::from_secs(120)) => {
            if ready {
                eprintln!("{} consumer {} has partitions", world::now_ms(), args.index);
                mark_ready(&args)?;
            } else {
                eprintln!("{} consumer {} got no partitions in 120 s", world::now_ms(), args.index);
            }
            false
        }
        _ = &mut stop => true,
    };
    if !stopped {
        let _ = stop.await;
    }
    running.shutdown().await?;
    Ok(())
}
