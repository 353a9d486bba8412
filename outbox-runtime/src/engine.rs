//! The one way to run: an [`Engine`] runs the relay and the consumers of a set of services on
//! one database pool and one bus, until a shutdown signal or the first failure.
//!
//! ```text
//! Engine::builder(pool, KafkaConfig::new("localhost:9092"))
//!     .consumer::<NotificationEvents, _>(Notifier)
//!     .run(tokio::signal::ctrl_c())
//!     .await?;
//! ```
//!
//! The builder does not fail: what is wrong (a service claimed by two enums, a bad route, a
//! broker configuration librdkafka refuses) is reported by the terminal call,
//! [`EngineBuilder::start`] or [`EngineBuilder::run`], before anything runs.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Pool;

use outbox_contract::route::{Catalog, CatalogBuilder, RouteConfig};
use outbox_contract::service::{Dispatch, OutboxService};

use crate::bus::{Bus, MemoryBus};
use crate::consumer::{Call, Consumer, ConsumerConfig, Context, Ready};
use crate::error::Error;
use crate::relay::{Crew, Relay, RelayConfig, Shutdown};
use crate::store::{Backend, Outbox, StoreConfig};

type Task = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;
type Start = Box<dyn FnOnce(Shutdown, Arc<Ready>) -> Task + Send>;
type AddService = Box<dyn FnOnce(CatalogBuilder) -> Result<CatalogBuilder, Error> + Send>;
type MakeConsumer<DB, B> =
    Box<dyn FnOnce(&Outbox<DB>, &Pool<DB>, &Arc<B>) -> Result<Built, Error> + Send>;

/// A consumer made at the terminal call: its topics, and how to start it.
struct Built {
    name: String,
    topics: Vec<String>,
    start: Start,
}

/// What a bus is made from: a [`KafkaConfig`](crate::bus::KafkaConfig) (connected at the
/// terminal call), or a bus itself ([`MemoryBus`], a [`KafkaBus`](crate::bus::KafkaBus), or
/// an `Arc` of one shared with other code).
pub trait IntoBus: Send + 'static {
    /// The bus.
    type Bus: Bus;

    /// Connects.
    fn into_bus(self) -> Result<Arc<Self::Bus>, Error>;
}

#[cfg(feature = "kafka")]
impl IntoBus for crate::bus::KafkaConfig {
    type Bus = crate::bus::KafkaBus;

    fn into_bus(self) -> Result<Arc<Self::Bus>, Error> {
        crate::bus::KafkaBus::new(self).map(Arc::new)
    }
}

#[cfg(feature = "kafka")]
impl IntoBus for crate::bus::KafkaBus {
    type Bus = Self;

    fn into_bus(self) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(self))
    }
}

impl IntoBus for MemoryBus {
    type Bus = Self;

    fn into_bus(self) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(self))
    }
}

impl<B: Bus> IntoBus for Arc<B> {
    type Bus = B;

    fn into_bus(self) -> Result<Arc<B>, Error> {
        Ok(self)
    }
}

/// Entry point: see the [module documentation](self).
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// An engine on `pool` and a bus made from `bus`. By default it relays every service of
    /// its catalog and runs no consumer; the catalog is made of the services its consumers
    /// and [`EngineBuilder::service`] name, unless [`EngineBuilder::outbox`] hands over the
    /// outbox the application enqueues with.
    pub fn builder<DB: Backend, C: IntoBus>(pool: Pool<DB>, bus: C) -> EngineBuilder<DB, C::Bus> {
        EngineBuilder {
            pool,
            bus: Box::new(move || bus.into_bus()),
            outbox: None,
            routes: None,
            services: Vec::new(),
            relay: Some(RelayConfig::default()),
            consumers: Vec::new(),
            migrate: false,
            store: StoreConfig::default(),
        }
    }
}

/// Collects what to run; nothing is checked or connected until [`EngineBuilder::start`] or
/// [`EngineBuilder::run`].
pub struct EngineBuilder<DB: Backend, B: Bus> {
    pool: Pool<DB>,
    bus: Box<dyn FnOnce() -> Result<Arc<B>, Error> + Send>,
    outbox: Option<Outbox<DB>>,
    routes: Option<RouteConfig>,
    services: Vec<AddService>,
    relay: Option<RelayConfig>,
    consumers: Vec<MakeConsumer<DB, B>>,
    migrate: bool,
    store: StoreConfig,
}

impl<DB: Backend, B: Bus> std::fmt::Debug for EngineBuilder<DB, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("outbox", &self.outbox)
            .field("relay", &self.relay)
            .field("consumers", &self.consumers.len())
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend, B: Bus> EngineBuilder<DB, B> {
    /// Runs on this outbox (the one the application enqueues with): its catalog and store
    /// settings. Every consumer's service must be in its catalog.
    pub fn outbox(mut self, outbox: Outbox<DB>) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// The route settings (prefix, overrides) of the catalog this builder makes; ignored with
    /// [`EngineBuilder::outbox`], whose catalog has its own.
    pub fn routes(mut self, routes: RouteConfig) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Store settings (attempts, backoff) of the outbox this builder makes; ignored with
    /// [`EngineBuilder::outbox`], which has its own.
    pub fn store_config(mut self, config: StoreConfig) -> Self {
        self.store = config;
        self
    }

    /// Adds service `S` to the catalog this builder makes: its rows are relayed (a service
    /// this process produces but does not consume).
    pub fn service<S: OutboxService>(mut self) -> Self {
        self.services
            .push(Box::new(|c: CatalogBuilder| Ok(c.service::<S>()?)));
        self
    }

    /// Relay settings; the relay runs by default.
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// Runs no relay (a process that only consumes, or another process relays).
    pub fn without_relay(mut self) -> Self {
        self.relay = None;
        self
    }

    /// Creates the tables (and brings older ones up to date) before anything runs. Teams that
    /// migrate by hand use [`Outbox::migration_sql`] instead.
    pub fn migrate(mut self) -> Self {
        self.migrate = true;
        self
    }

    /// Runs a consumer of service `S` with `handler`, default settings. Does not compile
    /// unless `H` handles every event of `S`.
    pub fn consumer<S, H>(self, handler: H) -> Self
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
        H: Send + Sync + 'static,
    {
        self.consumer_with::<S, H>(handler, ConsumerConfig::default())
    }

    /// [`EngineBuilder::consumer`] with settings.
    pub fn consumer_with<S, H>(self, handler: H, config: ConsumerConfig) -> Self
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
        H: Send + Sync + 'static,
    {
        self.add_consumer::<S, H>(move |outbox, pool, bus| {
            Consumer::<DB, S, H, B>::new(outbox, pool, bus, handler, config)
        })
    }

    /// Runs a consumer of service `S` whose `handler` runs outside any transaction, for
    /// effects outside the database (an HTTP or RPC call): each event is claimed (a lease,
    /// committed), called with [`Call::idempotency_key`], then marked done; at least once, with
    /// a stable idempotency key. See [`crate::consumer`]. Default settings.
    pub fn call_consumer<S, H>(self, handler: H) -> Self
    where
        S: OutboxService + Dispatch<H, Call>,
        H: Send + Sync + 'static,
    {
        self.call_consumer_with::<S, H>(handler, ConsumerConfig::default())
    }

    /// [`EngineBuilder::call_consumer`] with settings ([`ConsumerConfig::call_lease`], ...).
    pub fn call_consumer_with<S, H>(self, handler: H, config: ConsumerConfig) -> Self
    where
        S: OutboxService + Dispatch<H, Call>,
        H: Send + Sync + 'static,
    {
        self.add_consumer::<S, H>(move |outbox, pool, bus| {
            Consumer::<DB, S, H, B>::calling(outbox, pool, bus, handler, config)
        })
    }

    fn add_consumer<S, H>(
        mut self,
        make: impl FnOnce(Outbox<DB>, Pool<DB>, Arc<B>) -> Result<Consumer<DB, S, H, B>, Error>
        + Send
        + 'static,
    ) -> Self
    where
        S: OutboxService,
        H: Send + Sync + 'static,
    {
        self.services
            .push(Box::new(|c: CatalogBuilder| Ok(c.service::<S>()?)));
        self.consumers.push(Box::new(move |outbox, pool, bus| {
            let consumer = make(outbox.clone(), pool.clone(), bus.clone())?;
            Ok(Built {
                name: format!("consumer of `{}`", S::SERVICE),
                topics: consumer.topics(),
                start: Box::new(move |shutdown, ready| {
                    Box::pin(consumer.run_signalling(shutdown, Some(ready)))
                }),
            })
        }));
        self
    }

    /// Checks everything, connects the bus, migrates when asked, starts the relay, makes (or,
    /// with topic creation off, checks) the topics meanwhile, and starts the consumers.
    ///
    /// A broker that cannot make the topics in time does not stop the start: the failure is
    /// logged, the relay retries its publishes with backoff, and consumers wait for their
    /// topic.
    pub async fn start(self) -> Result<Running<DB, B>, Error> {
        let outbox = match self.outbox {
            Some(outbox) => {
                // The consumers' services must be the outbox's own.
                let mut check = Catalog::builder(RouteConfig::new());
                for add in self.services {
                    check = add(check)?;
                }
                for service in check.build().services() {
                    if outbox.catalog().service(&service.service).is_none() {
                        return Err(Error::UnknownService {
                            service: service.service.clone(),
                        });
                    }
                }
                outbox
            }
            None => {
                let mut catalog = Catalog::builder(self.routes.unwrap_or_default());
                for add in self.services {
                    catalog = add(catalog)?;
                }
                Outbox::builder(catalog.build()).config(self.store).build()
            }
        };
        let bus = (self.bus)()?;
        let mut consumers = Vec::with_capacity(self.consumers.len());
        for make in self.consumers {
            consumers.push(make(&outbox, &self.pool, &bus)?);
        }
        if self.migrate {
            let mut conn = self.pool.acquire().await?;
            outbox.migrate(&mut conn).await?;
        } else if self.relay.is_some() || !consumers.is_empty() {
            // A relay or a consumer on a table of another layout, or one `migrate` has not
            // brought up to date, would fail every query: refuse to start. (A consumer with its
            // own database finds no service table there, which passes.) A database that cannot
            // be reached now is the relay's and the consumers' to retry.
            match self.pool.acquire().await {
                Ok(mut conn) => {
                    outbox.check_tables(&mut conn).await?;
                    // A WAL service on a server that cannot decode its log, or without its
                    // slot, is refused here, with the fix, not by a relay loop later.
                    if self.relay.is_some() {
                        outbox.check_wal(&mut conn).await?;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tables not checked: the database is unreachable")
                }
            }
        }
        let mut topics: Vec<String> = outbox
            .catalog()
            .services()
            .map(|r| r.topic.clone())
            .chain(consumers.iter().flat_map(|c| c.topics.iter().cloned()))
            .collect();
        topics.sort();
        topics.dedup();
        let (mut crew, shutdown) = Crew::root();
        let tasks = &mut crew.tasks;
        let mut names = HashMap::new();
        // The relay publishes while the topics are being made or checked (a publish to a topic
        // not there yet fails and is retried with backoff, as the Go system's last version
        // does); the consumers join once the topics are there, or the check gave up.
        if let Some(config) = self.relay {
            let relay = Relay::new(outbox.clone(), self.pool.clone(), bus.clone(), config);
            let id = tasks.spawn(relay.run(shutdown.clone())).id();
            names.insert(id, "relay".to_owned());
        }
        if let Err(e) = bus.ensure_topics(&topics).await {
            tracing::warn!(error = %e, "topics are not ready; starting anyway");
        }
        let ready = Arc::new(Ready::default());
        let expected = consumers.len();
        for c in consumers {
            let id = tasks.spawn((c.start)(shutdown.clone(), ready.clone())).id();
            names.insert(id, c.name);
        }
        Ok(Running {
            outbox,
            bus,
            crew,
            shutdown,
            names,
            ready,
            consumers: expected,
        })
    }

    /// Starts, then runs until `signal` resolves (`tokio::signal::ctrl_c()`, a
    /// `CancellationToken::cancelled()`, ...) or a task fails, whichever comes first; then shuts
    /// down gracefully. The first failure is the result.
    pub async fn run(self, signal: impl Future<Output = impl Sized> + Send) -> Result<(), Error> {
        let mut running = self.start().await?;
        tokio::select! {
            _ = signal => running.shutdown().await,
            failed = running.wait() => {
                let rest = running.shutdown().await;
                failed.and(rest)
            }
        }
    }
}

/// A started engine: wait on it, ask whether its consumers are ready, and shut it down.
/// Dropping it asks every task to stop as [`Running::shutdown`] does, without waiting for them:
/// each finishes the round or batch in hand in the background (a task cut off inside a
/// statement could hand a pooled connection back inside a transaction nobody ends: sqlx 0.8
/// returns a connection whose `BEGIN` was cancelled to the pool as it is).
#[derive(Debug)]
pub struct Running<DB: Backend, B: Bus> {
    outbox: Outbox<DB>,
    bus: Arc<B>,
    /// Its tasks: a dropped `Running` asks them to stop and does not abort them.
    crew: Crew<Result<(), Error>>,
    shutdown: Shutdown,
    names: HashMap<tokio::task::Id, String>,
    ready: Arc<Ready>,
    consumers: usize,
}

impl<DB: Backend, B: Bus> Running<DB, B> {
    /// The outbox it runs on (enqueue with it).
    pub fn outbox(&self) -> &Outbox<DB> {
        &self.outbox
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<B> {
        &self.bus
    }

    /// The shutdown signal its tasks watch.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Waits until every consumer has joined its group and got partitions, at most `timeout`;
    /// false when the time ran out.
    pub async fn ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.ready.wait_for(self.consumers))
            .await
            .is_ok()
    }

    /// Resolves when a task ends before shutdown: with its error, its panic, or, for a task
    /// that returned without being asked to, [`Error::Task`] naming it. Pending until then
    /// (and forever when nothing runs).
    pub async fn wait(&mut self) -> Result<(), Error> {
        loop {
            let Some(done) = self.crew.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, result) = match done {
                Ok((id, result)) => (id, result),
                Err(e) => (e.id(), Err(Error::Task(e.to_string()))),
            };
            let name = self.names.remove(&id).unwrap_or_default();
            return match result {
                Ok(()) if self.shutdown.is_triggered() => continue,
                Ok(()) => Err(Error::Task(format!("the {name} stopped"))),
                Err(Error::Task(why)) => Err(Error::Task(format!("the {name} failed: {why}"))),
                Err(e) => {
                    tracing::error!(task = %name, error = %e, "runtime task failed");
                    Err(e)
                }
            };
        }
    }

    /// Stops claiming and consuming, lets the work in hand finish, and waits for every task;
    /// the first failure is the result.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.crew.stop.trigger();
        let mut first_error = None;
        while let Some(done) = self.crew.tasks.join_next_with_id().await {
            let failed = match done {
                Ok((_, Ok(()))) => None,
                Ok((_, Err(e))) => Some(e),
                Err(e) => {
                    let name = self.names.get(&e.id()).cloned().unwrap_or_default();
                    Some(Error::Task(format!("the {name} panicked: {e}")))
                }
            };
            if let Some(e) = failed {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
