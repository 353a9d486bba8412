//! Kafka through rdkafka, in rdkafka's own layout: the producer, a consumer group member, and
//! topic creation through the admin API.

mod admin;
mod config;
mod consumer;
mod producer;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, Producer};

pub use config::KafkaConfig;
pub use consumer::KafkaReceiver;

use crate::bus::{Bus, Outgoing, Publish, Sent};
use crate::error::Error;

/// A connected producer and admin client; consumers are made per group with
/// [`Bus::receiver`].
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connects a producer and an admin client; with [`KafkaConfig::mock`], first starts the
    /// mock cluster (it lives as long as the producer).
    pub fn new(mut config: KafkaConfig) -> Result<Self, Error> {
        let producer = if config.mock {
            let p = producer::producer(&config, &[("test.mock.num.brokers", "1")])?;
            config.brokers = p
                .client()
                .mock_cluster()
                .map(|m| m.bootstrap_servers())
                .unwrap_or_default();
            p
        } else {
            producer::producer(&config, &[])?
        };
        let admin = config.client(&[]).create()?;
        Ok(Self {
            config,
            producer,
            admin,
        })
    }

    /// The configuration (with the mock cluster's address once it runs).
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

impl Publish for KafkaBus {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        producer::send_all(&self.producer, records).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), Error> {
        admin::ensure_topics(&self.config, &self.admin, &self.producer, topics).await
    }
}

impl Bus for KafkaBus {
    type Receiver = KafkaReceiver;

    fn receiver(&self, group: &str, topics: &[String]) -> Result<KafkaReceiver, Error> {
        KafkaReceiver::new(&self.config, group, topics)
    }

    fn foreign_members(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send {
        let (config, group) = (self.config.clone(), group.to_owned());
        async move {
            tokio::task::spawn_blocking(move || consumer::foreign_members(&config, &group))
                .await
                .map_err(|e| Error::Task(format!("describing the group failed: {e}")))?
        }
    }
}
