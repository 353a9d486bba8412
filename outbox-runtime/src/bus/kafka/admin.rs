//! Topic creation: through the admin API (brokers may not auto-create topics), or through the
//! mock cluster's own API, which has no admin API.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::util::Timeout;

use super::KafkaConfig;
use crate::error::Error;

/// Creates the topics that do not exist (when the config says so), then waits until each has
/// its partitions, at most the configured topic timeout. Metadata requests block, so they run
/// on tokio's blocking pool, never on a worker thread.
pub(super) async fn ensure_topics(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    producer: &FutureProducer,
    topics: &[String],
) -> Result<(), Error> {
    if topics.is_empty() {
        return Ok(());
    }
    if config.create_topics {
        if config.mock {
            let cluster = producer
                .client()
                .mock_cluster()
                .ok_or_else(|| Error::TopicCreate {
                    topic: topics[0].clone(),
                    reason: "the mock cluster is gone".to_owned(),
                })?;
            for t in topics {
                cluster
                    .create_topic(t, config.partitions, 1)
                    .map_err(|e| Error::TopicCreate {
                        topic: t.clone(),
                        reason: e.to_string(),
                    })?;
            }
        } else {
            create(config, admin, topics).await?;
        }
    }
    let deadline = Instant::now() + config.topic_timeout;
    for topic in topics {
        loop {
            let (client, t) = (producer.clone(), topic.clone());
            let ready = tokio::task::spawn_blocking(move || {
                client
                    .client()
                    .fetch_metadata(Some(&t), Timeout::After(Duration::from_secs(5)))
                    .ok()
                    .is_some_and(|m| {
                        m.topics().iter().any(|m| {
                            m.name() == t && m.error().is_none() && !m.partitions().is_empty()
                        })
                    })
            })
            .await
            .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::TopicNotReady {
                    topic: topic.clone(),
                    waited: config.topic_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn create(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[String],
) -> Result<(), Error> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(config.topic_timeout))
        .request_timeout(Some(config.topic_timeout));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::TopicCreate {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}
