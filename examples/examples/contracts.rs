//! A tour of the reference contracts: the route table the derives produce, and what a
//! consumer does with good and bad messages (decode and dispatch, or a typed rejection that
//! the runtime dead-letters).
//!
//! `cargo run -p examples --example contracts`
#![allow(clippy::print_stdout)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use contracts::notification::{FeishuRequested, FeishuRequestedV2};
use contracts::{NotificationEvents, NotificationEventsHandler, samples};
use outbox_runtime::{Dispatch, HandlerError, OutboxEvent, OutboxService};

/// A notification handler; its context is a list of what it sent.
struct Notifier;

impl NotificationEventsHandler<Vec<String>> for Notifier {
    async fn feishu_requested(
        &self,
        sent: &mut Vec<String>,
        e: FeishuRequested,
    ) -> Result<(), HandlerError> {
        sent.push(format!("text to user {} -> {}", e.user_id, e.target_url));
        Ok(())
    }

    async fn feishu_requested_v2(
        &self,
        sent: &mut Vec<String>,
        e: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        sent.push(format!("card {:?} to user {}", e.card.title, e.user_id));
        Ok(())
    }
}

/// The handlers here never wait, so one poll finishes them.
fn run<F: Future>(fut: F) -> F::Output {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("handlers in this example do not wait"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalog = contracts::catalog()?;
    println!("Route table ({} events):", catalog.routes().count());
    println!(
        "  {:<36} {:>2}  {:<17} {:<26} topic",
        "event type", "v", "service", "table"
    );
    for r in catalog.routes() {
        println!(
            "  {:<36} {:>2}  {:<17} {:<26} {}",
            r.event_type, r.version, r.route.service, r.route.table, r.route.topic
        );
    }

    let feishu = samples::feishu(7).to_payload()?;
    let mut bad_v2 = serde_json::to_value(samples::feishu_v2(8))?;
    bad_v2["card"]["actions"][0]["url"] = "https://evil.example/".into();
    bad_v2["locale"] = "chinese".into();
    let messages: Vec<(&str, &str, u32, Vec<u8>)> = vec![
        (
            "a v1 request",
            "notification.feishu.requested",
            1,
            feishu.clone(),
        ),
        (
            "a v2 request",
            "notification.feishu.requested",
            2,
            samples::feishu_v2(8).to_payload()?,
        ),
        (
            "a version nobody accepts",
            "notification.feishu.requested",
            7,
            feishu.clone(),
        ),
        (
            "an unknown event type",
            "notification.sms.requested",
            1,
            feishu.clone(),
        ),
        (
            "malformed JSON",
            "notification.feishu.requested",
            1,
            b"{\"user_id\": 7,".to_vec(),
        ),
        (
            "an invalid v2 payload",
            "notification.feishu.requested",
            2,
            serde_json::to_vec(&bad_v2)?,
        ),
    ];

    println!("\nService `notification` consuming:");
    let mut sent = Vec::new();
    for (what, event_type, version, payload) in messages {
        match NotificationEvents::decode(event_type, version, &payload) {
            Ok(event) => {
                run(event.dispatch(&Notifier, &mut sent))?;
                println!("  {what:<26} handled: {}", sent.last().map_or("", |s| s));
            }
            Err(rejection) => {
                println!("  {what:<26} dead [{}]: {rejection}", rejection.reason());
            }
        }
    }
    Ok(())
}
