//! How to reach the brokers, and what topics to create.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

/// Where the brokers are, librdkafka properties, and what topics this process creates.
///
/// Its `Debug` output leaves secrets out: any property whose name says password, secret,
/// credential, token or key material (`sasl.password`, `ssl.key.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, ...) shows as `<redacted>`.
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) brokers: String,
    pub(crate) mock: bool,
    pub(crate) properties: BTreeMap<String, String>,
    pub(crate) partitions: i32,
    pub(crate) replication: i32,
    pub(crate) create_topics: bool,
    pub(crate) topic_timeout: Duration,
    pub(crate) publish_timeout: Duration,
}

/// Whether a librdkafka property holds a secret.
fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    [
        "password",
        "secret",
        "credential",
        "token",
        "key.pem",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| p.contains(s))
        || p.ends_with(".key")
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field(
                "brokers",
                &if self.mock {
                    "<mock cluster>"
                } else {
                    &self.brokers
                },
            )
            .field("properties", &properties)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("topic_timeout", &self.topic_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

impl KafkaConfig {
    /// The brokers at `host:port,host:port`, with defaults: topics created with 3 partitions
    /// and replication 1, a 30 s topic wait, a 10 s publish timeout.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            mock: false,
            properties: BTreeMap::new(),
            partitions: 3,
            replication: 1,
            create_topics: true,
            topic_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
        }
    }

    /// rdkafka's in-process mock cluster (one broker, started by the bus and stopped with it):
    /// a real Kafka protocol with no server, for examples and quick runs. Topics are made
    /// through the mock cluster's own API, since it does not serve the admin API.
    pub fn mock() -> Self {
        Self {
            mock: true,
            ..Self::new("")
        }
    }

    /// Sets a librdkafka property (`security.protocol`, `sasl.mechanisms`,
    /// `ssl.ca.location`, ...), applied to every client after the defaults, so it can override
    /// them.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Partitions of the topics this process creates (3).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replication factor of the topics this process creates (1).
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }

    /// Whether this process creates the topics it uses (true). Off, topics are left to an
    /// init job, and only waited for.
    pub fn create_topics(mut self, create: bool) -> Self {
        self.create_topics = create;
        self
    }

    /// How long to wait for a topic to be ready before giving up (30 s).
    pub fn topic_timeout(mut self, timeout: Duration) -> Self {
        self.topic_timeout = timeout;
        self
    }

    /// How long one publish may take before it counts as failed (10 s, as the Go system).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The brokers, `host:port,…` (empty for the mock cluster until its bus starts it).
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The partitions of topics this process creates.
    pub fn topic_partitions(&self) -> i32 {
        self.partitions
    }

    /// A client configuration: the brokers, then `defaults`, then the user's properties.
    pub(crate) fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_leaves_secrets_out() {
        let config = KafkaConfig::new("broker:9093")
            .set("sasl.username", "svc")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "p4ss")
            .set("ssl.key.pem", "-----BEGIN PRIVATE KEY-----")
            .set("sasl.oauthbearer.client.secret", "s3cr3t")
            .set("sasl.oauthbearer.config", "principal=x secret=y");
        let shown = format!("{config:?}");
        for secret in ["hunter2", "p4ss", "BEGIN PRIVATE", "s3cr3t", "secret=y"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("broker:9093"), "{shown}");
        assert!(shown.contains("\"sasl.username\": \"svc\""), "{shown}");
        assert_eq!(shown.matches("<redacted>").count(), 5, "{shown}");
    }
}
