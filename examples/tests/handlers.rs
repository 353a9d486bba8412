//! Testing your handlers: a copy-and-adapt example. With `outbox-runtime`'s `testing` feature
//! (in `[dev-dependencies]`), a plain `#[tokio::test]` runs the real store, relay and consumer
//! on in-memory SQLite and the in-memory bus: no broker, no database server, no sleeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use contracts::notification::{FeishuRequested, FeishuRequestedV2};
use contracts::{NotificationEvents, NotificationEventsHandler, samples};
use outbox_runtime::store::{Backend, StoreConfig};
use outbox_runtime::testing::Harness;
use outbox_runtime::{Context, HandlerError, Status};

/// The handler under test: sends Feishu messages through a client that may fail.
#[derive(Default, Clone)]
struct Notifier {
    /// How many times each preview's send fails before it succeeds (`u32::MAX`: always).
    failures: HashMap<String, u32>,
    /// Previews whose message can never be sent (the user left).
    refused: Vec<String>,
    /// Sends per preview, seen by the test through its clone.
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

impl Notifier {
    fn send(&self, preview_id: &str) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(preview_id.to_owned()).or_default();
            *c += 1;
            *c
        };
        if self.refused.iter().any(|p| p == preview_id) {
            return Err(HandlerError::permanent("the user left the workspace"));
        }
        if call <= self.failures.get(preview_id).copied().unwrap_or(0) {
            return Err(HandlerError::retry("feishu answered 502"));
        }
        Ok(())
    }
}

impl<DB: Backend> NotificationEventsHandler<Context<DB>> for Notifier {
    async fn feishu_requested(
        &self,
        _: &mut Context<DB>,
        e: FeishuRequested,
    ) -> Result<(), HandlerError> {
        self.send(&e.preview_id)
    }

    async fn feishu_requested_v2(
        &self,
        _: &mut Context<DB>,
        e: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        self.send(&e.preview_id)
    }
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_the_rest_goes_on() {
    let notifier = Notifier::default();
    let mut h = Harness::builder()
        .consumer::<NotificationEvents, _>(notifier.clone())
        .start()
        .await
        .unwrap();
    // A version of the event that no handler takes, as another producer might send it.
    let v9 = br#"{"outbox_id":1,"event_id":"e-1","event_type":"notification.feishu.requested","event_version":"9","service_name":"notification","payload":{}}"#;
    h.send_raw("notification", Some("7"), v9).await.unwrap();
    h.enqueue(&samples::feishu(1)).await.unwrap();

    h.run_until_idle().await.unwrap();

    let dead = h.dead_letters("notification").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "unsupported_version");
    assert_eq!(h.applied("notification").await.unwrap().len(), 1);
    assert_eq!(notifier.calls.lock().unwrap().get("pv-1"), Some(&1));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_send_is_retried_until_it_goes_through() {
    let notifier = Notifier {
        failures: HashMap::from([("pv-2".to_owned(), 2)]),
        ..Notifier::default()
    };
    let mut h = Harness::builder()
        .consumer::<NotificationEvents, _>(notifier.clone())
        .start()
        .await
        .unwrap();
    let stored = h.enqueue(&samples::feishu(2)).await.unwrap();

    // Backoff is skipped: the two retries run now.
    h.run_until_idle().await.unwrap();

    let applied = h.applied("notification").await.unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].event_id, stored.event_id);
    assert_eq!(applied[0].attempts, 3, "published three times");
    assert_eq!(h.retried("notification").await.unwrap().len(), 1);
    assert_eq!(notifier.calls.lock().unwrap().get("pv-2"), Some(&3));
    // On the bus three times: once, and once per retry.
    assert_eq!(h.published("notification").await.len(), 3);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_send_that_never_works_ends_dead_after_its_attempts_and_a_refusal_at_once() {
    let notifier = Notifier {
        failures: HashMap::from([("pv-3".to_owned(), u32::MAX)]),
        refused: vec!["pv-4".to_owned()],
        ..Notifier::default()
    };
    let mut h = Harness::builder()
        .store_config(StoreConfig::default().max_attempts(3))
        .consumer::<NotificationEvents, _>(notifier.clone())
        .start()
        .await
        .unwrap();
    h.enqueue(&samples::feishu(3)).await.unwrap();
    h.enqueue(&samples::feishu(4)).await.unwrap();

    h.run_until_idle().await.unwrap();

    let mut dead = h.dead("notification").await.unwrap();
    dead.sort_by(|a, b| a.reason.cmp(&b.reason));
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| (d.reason.as_str(), d.error.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("handler_rejected", "the user left the workspace"),
            ("max_attempts", "feishu answered 502"),
        ]
    );
    let calls = notifier.calls.lock().unwrap().clone();
    assert_eq!((calls["pv-3"], calls["pv-4"]), (3, 1));
    assert!(h.retried("notification").await.unwrap().is_empty());
    let rows = h.rows("notification").await.unwrap();
    assert!(rows.iter().all(|r| r.status == Status::Dead));
    h.shutdown().await.unwrap();
}
