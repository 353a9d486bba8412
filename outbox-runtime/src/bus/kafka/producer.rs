//! The producer: idempotent (`acks=all`, so a retried send is neither lost nor duplicated in
//! the log), with the `murmur2_random` partitioner (the Java client's, so that one key lands on
//! one partition whatever the client).

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::KafkaConfig;
use crate::bus::{Outgoing, Sent};
use crate::error::Error;

pub(super) fn producer(
    config: &KafkaConfig,
    extra: &[(&str, &str)],
) -> Result<FutureProducer, Error> {
    let timeout = config.publish_timeout.as_millis().to_string();
    let mut defaults = vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("linger.ms", "2"),
        ("message.timeout.ms", timeout.as_str()),
    ];
    defaults.extend_from_slice(extra);
    Ok(config.client(&defaults).create()?)
}

fn record(r: &Outgoing) -> FutureRecord<'_, str, [u8]> {
    let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(&r.topic).payload(&r.value[..]).headers(h);
    if let Some(k) = &r.key {
        record = record.key(k.as_str());
    }
    record
}

enum Waiting {
    Delivery(DeliveryFuture),
    Refused(Error),
    HeldBack,
}

/// See [`crate::bus::Publish::send_all`].
pub(super) async fn send_all(producer: &FutureProducer, records: &[Outgoing]) -> Vec<Sent> {
    let mut refused: HashSet<(&str, Option<&str>)> = HashSet::new();
    let mut waiting = Vec::with_capacity(records.len());
    for r in records {
        let key = (r.topic.as_str(), r.key.as_deref());
        if r.key.is_some() && refused.contains(&key) {
            waiting.push(Waiting::HeldBack);
            continue;
        }
        let mut rec = record(r);
        loop {
            match producer.send_result(rec) {
                Ok(delivery) => {
                    waiting.push(Waiting::Delivery(delivery));
                    break;
                }
                // The local queue is full: wait for deliveries to drain it, then retry.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    refused.insert(key);
                    waiting.push(Waiting::Refused(Error::Kafka(e)));
                    break;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(waiting.len());
    for w in waiting {
        out.push(match w {
            Waiting::Delivery(delivery) => match delivery.await {
                Ok(Ok(d)) => Sent::Acked {
                    partition: d.partition,
                    offset: d.offset,
                },
                Ok(Err((e, _))) => Sent::Failed(Error::Kafka(e)),
                Err(_) => Sent::Failed(Error::Kafka(KafkaError::Canceled)),
            },
            Waiting::Refused(e) => Sent::Failed(e),
            Waiting::HeldBack => Sent::HeldBack,
        });
    }
    out
}
