//! The message bus: Kafka through rdkafka.

mod kafka;

pub use kafka::{KafkaBus, KafkaConfig, Outgoing, Sent, permanent_failure};
