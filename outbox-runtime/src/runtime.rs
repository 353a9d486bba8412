//! One builder that wires the store, the relay and the consumers of a set of services, starts
//! them, and shuts them down.
//!
//! ```text
//! let running = Runtime::builder(outbox, pool, KafkaConfig::new("localhost:9092"))?
//!     .relay(RelayConfig::default())
//!     .consumer::<NotificationEvents, _>(Notifier, ConsumerConfig::default())?
//!     .start()
//!     .await?;
//! // ...
//! running.shutdown().await?;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::Pool;

use outbox_contract::service::{Dispatch, OutboxService};

use crate::bus::{KafkaBus, KafkaConfig};
use crate::consumer::{Consumer, ConsumerConfig, Context, Ready};
use crate::error::Error;
use crate::relay::{Relay, RelayConfig, Shutdown, ShutdownTrigger};
use crate::store::{Backend, Outbox};

type Task = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;
type Start = Box<dyn FnOnce(Shutdown, Arc<Ready>) -> Task + Send>;

/// Entry point of the runtime.
#[derive(Debug)]
pub struct Runtime;

impl Runtime {
    /// A runtime on `outbox` (its catalog lists the services), `pool`, and Kafka.
    pub fn builder<DB: Backend>(
        outbox: Outbox<DB>,
        pool: Pool<DB>,
        kafka: KafkaConfig,
    ) -> Result<RuntimeBuilder<DB>, Error> {
        Ok(RuntimeBuilder {
            bus: Arc::new(KafkaBus::new(kafka)?),
            outbox,
            pool,
            relay: None,
            starts: Vec::new(),
            topics: Vec::new(),
            create_topics: true,
        })
    }
}

/// Collects what to run.
pub struct RuntimeBuilder<DB: Backend> {
    outbox: Outbox<DB>,
    pool: Pool<DB>,
    bus: Arc<KafkaBus>,
    relay: Option<RelayConfig>,
    starts: Vec<Start>,
    topics: Vec<String>,
    create_topics: bool,
}

impl<DB: Backend> std::fmt::Debug for RuntimeBuilder<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("relay", &self.relay)
            .field("consumers", &self.starts.len())
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> RuntimeBuilder<DB> {
    /// Runs a relay for every service of the catalog.
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// Runs a consumer of service `S` with `handler`. Does not compile unless `H` handles every
    /// event of `S`.
    pub fn consumer<S, H>(mut self, handler: H, config: ConsumerConfig) -> Result<Self, Error>
    where
        S: OutboxService + Dispatch<H, Context<DB>>,
        H: Send + Sync + 'static,
    {
        let consumer = Consumer::<DB, S, H>::new(
            self.outbox.clone(),
            self.pool.clone(),
            self.bus.clone(),
            handler,
            config,
        )?;
        self.topics.extend(consumer.topics());
        self.starts.push(Box::new(move |shutdown, ready| {
            Box::pin(consumer.run_signalling(shutdown, Some(ready)))
        }));
        Ok(self)
    }

    /// Leaves topic creation to someone else (an init job, or rdkafka's mock cluster, which
    /// does not serve the admin API).
    pub fn skip_topic_creation(mut self) -> Self {
        self.create_topics = false;
        self
    }

    /// Every topic this runtime publishes to or reads: the services' topics and, for consumers
    /// with a dead-letter topic, those.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .outbox
            .catalog()
            .services()
            .map(|r| r.topic.clone())
            .chain(self.topics.iter().cloned())
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// The Kafka bus, for publishing outside the relay (tests, tools).
    pub fn bus(&self) -> Arc<KafkaBus> {
        self.bus.clone()
    }

    /// Creates the topics, then starts the relay and the consumers.
    ///
    /// A broker that cannot create the topics in time does not stop the start: the failure is
    /// logged, the relay retries its publishes with backoff, and consumers wait for their topic.
    pub async fn start(self) -> Result<Running, Error> {
        let mut topics = self.topics();
        if !self.create_topics {
            topics.clear();
        }
        if let Err(e) = self.bus.ensure_topics(&topics).await {
            tracing::warn!(error = %e, "topics are not ready; starting anyway");
        }
        let (trigger, shutdown) = Shutdown::new();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(config) = self.relay {
            let relay = Relay::new(
                self.outbox.clone(),
                self.pool.clone(),
                self.bus.clone(),
                config,
            );
            tasks.spawn(relay.run(shutdown.clone()));
        }
        let ready = Arc::new(Ready::default());
        let consumers = self.starts.len();
        for start in self.starts {
            tasks.spawn(start(shutdown.clone(), ready.clone()));
        }
        Ok(Running {
            trigger,
            tasks,
            ready,
            consumers,
        })
    }
}

/// A started runtime.
#[derive(Debug)]
pub struct Running {
    trigger: ShutdownTrigger,
    tasks: tokio::task::JoinSet<Result<(), Error>>,
    ready: Arc<Ready>,
    consumers: usize,
}

impl Running {
    /// Waits until every consumer has joined its group and got partitions, at most `timeout`;
    /// false when the time ran out.
    pub async fn ready(&self, timeout: std::time::Duration) -> bool {
        tokio::time::timeout(timeout, self.ready.wait_for(self.consumers))
            .await
            .is_ok()
    }

    /// Stops claiming and consuming, lets the work in hand finish, and waits for every task.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.trigger.trigger();
        let mut first_error = None;
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "runtime task panicked"),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
