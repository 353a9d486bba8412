//! The reference contracts as the runtime will use them: routes, decoding, rejections,
//! validation, dispatch to typed handlers, and JSON Schemas.

mod schemas;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use contracts::notification::{FeishuRequested, FeishuRequestedV2};
use contracts::samples;
use contracts::{
    ActiveSchedulerEvents, AgentEvents, MemoryEvents, NotificationEvents,
    NotificationEventsHandler, TaskEvents, TokenStoreEvents,
};
use outbox_runtime::contract::Error as ContractError;
use outbox_runtime::route::{RouteOverride, RouteSpec};
use outbox_runtime::{
    Catalog, Dispatch, HandlerError, OutboxEvent, OutboxService, Rejection, RouteConfig, Validate,
};
use serde_json::{Value, json};

/// Runs a future that never waits (the handlers here do no I/O).
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the future was expected to finish at once"),
    }
}

#[test]
fn every_service_routes_by_the_go_convention_with_the_outbox_table_suffix() {
    let catalog = contracts::catalog().unwrap();
    let got: Vec<(String, String, String, String)> = catalog
        .services()
        .map(|r| {
            (
                r.service.clone(),
                r.table.clone(),
                r.topic.clone(),
                r.group.clone(),
            )
        })
        .collect();
    let want = [
        "active-scheduler",
        "agent",
        "memory",
        "notification",
        "task",
        "token-store",
    ]
    .map(|s| {
        (
            s.to_owned(),
            format!("{}_outbox", s.replace('-', "_")),
            format!("smartflow.{s}.outbox"),
            format!("smartflow-{s}-outbox-consumer"),
        )
    });
    assert_eq!(got, want);
}

#[test]
fn every_event_type_routes_to_the_service_that_consumes_it() {
    let catalog = contracts::catalog().unwrap();
    let owners = [
        ("chat.history.persist.requested", "agent"),
        ("chat.token.usage.adjust.requested", "agent"),
        ("agent.state.snapshot.persist", "agent"),
        ("agent.timeline.persist.requested", "agent"),
        ("memory.extract.requested", "memory"),
        ("task.urgency.promote.requested", "task"),
        ("active_schedule.triggered", "active-scheduler"),
        ("notification.feishu.requested", "notification"),
        ("forum.post.liked", "token-store"),
        ("forum.post.imported", "token-store"),
        ("credit.charge.requested", "token-store"),
    ];
    for (event_type, service) in owners {
        let route = catalog.route(event_type, 1).unwrap();
        assert_eq!(route.route.service, service, "{event_type}");
        assert_eq!(catalog.service_of(event_type).unwrap().service, service);
    }
    assert_eq!(
        catalog.routes().count(),
        12,
        "11 event types, one with two versions"
    );
    let v2 = catalog.route("notification.feishu.requested", 2).unwrap();
    assert_eq!(v2.spec.variant, "FeishuRequestedV2");
    assert_eq!(v2.spec.handler, "feishu_requested_v2");
    // Seed checklist 2: an event nobody declared has no route, so nothing can be written for it.
    assert!(catalog.route("order.placed", 1).is_none());
    assert!(catalog.route("notification.feishu.requested", 3).is_none());
}

#[test]
fn an_unknown_service_gets_the_convention_and_overrides_win_in_order() {
    // Seed checklist 5, with this project's table suffix and a configurable prefix.
    let spec = RouteSpec {
        service: "foo-bar",
        table: None,
        topic: None,
        group: None,
    };
    let r = RouteConfig::new()
        .prefix("smartflow")
        .unwrap()
        .resolve(&spec);
    assert_eq!(
        (r.table.as_str(), r.topic.as_str(), r.group.as_str()),
        (
            "foo_bar_outbox",
            "smartflow.foo-bar.outbox",
            "smartflow-foo-bar-outbox-consumer"
        )
    );
    // Seed checklist 4 (and bug B2): one rule, runtime config over attribute over convention.
    let attr = RouteSpec {
        topic: Some("from.attribute"),
        ..spec
    };
    let config = RouteConfig::new()
        .override_service("foo-bar", RouteOverride::default().topic("from.config"))
        .unwrap();
    assert_eq!(RouteConfig::new().resolve(&attr).topic, "from.attribute");
    assert_eq!(config.resolve(&attr).topic, "from.config");
    assert_eq!(config.resolve(&attr).table, "foo_bar_outbox");
}

#[test]
fn the_catalog_refuses_an_event_type_claimed_by_two_services() {
    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, OutboxEvent)]
    #[outbox(
        event_type = "notification.feishu.requested",
        version = 9,
        service = "rogue"
    )]
    struct Stolen {
        user_id: u64,
    }
    #[derive(OutboxService)]
    #[outbox(service = "rogue")]
    enum RogueEvents {
        Stolen(Stolen),
    }
    let err = Catalog::builder(RouteConfig::new())
        .service::<NotificationEvents>()
        .unwrap()
        .service::<RogueEvents>()
        .unwrap_err();
    assert!(matches!(err, ContractError::EventOwnedTwice { .. }));
    assert_eq!(
        err.to_string(),
        "event type `notification.feishu.requested` is declared by services `notification` and `rogue`; an event type belongs to one service"
    );
    // Seed checklist 3: registering the same service again is a no-op.
    let catalog = Catalog::builder(RouteConfig::new())
        .service::<NotificationEvents>()
        .unwrap()
        .service::<NotificationEvents>()
        .unwrap()
        .build();
    assert_eq!(catalog.services().count(), 1);
}

#[test]
fn the_catalog_refuses_two_services_on_one_table() {
    let config = RouteConfig::new()
        .override_service("task", RouteOverride::default().table("memory_outbox"))
        .unwrap();
    let err = Catalog::builder(config)
        .service::<MemoryEvents>()
        .unwrap()
        .service::<TaskEvents>()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "services `memory` and `task` both use table `memory_outbox`; give one of them its own table"
    );
}

/// Encodes every sample and decodes it back through its service, as a consumer would.
fn roundtrip<S: OutboxService + PartialEq + std::fmt::Debug>(events: Vec<S>) -> usize {
    for event in &events {
        let payload = event.to_payload().unwrap();
        let back = S::decode(event.event_type(), event.version(), &payload)
            .unwrap_or_else(|r| panic!("{} rejected its own sample: {r}", event.event_type()));
        assert_eq!(&back, event);
    }
    events.len()
}

#[test]
fn every_sample_survives_encode_and_decode_through_its_service() {
    let s = samples::all(42);
    let n = roundtrip(s.agent)
        + roundtrip(s.memory)
        + roundtrip(s.task)
        + roundtrip(s.active_scheduler)
        + roundtrip(s.notification)
        + roundtrip(s.token_store);
    assert_eq!(n, 12);
}

#[test]
fn keys_and_aggregates_follow_the_go_contracts() {
    let n = 5;
    assert_eq!(
        samples::feishu(n).message_key().as_deref(),
        Some("6"),
        "user_id"
    );
    assert_eq!(
        samples::feishu(n).aggregate_id().as_deref(),
        Some("pv-5"),
        "preview_id"
    );
    assert_eq!(
        samples::triggered(n).aggregate_id().as_deref(),
        Some("trg-5")
    );
    let usage = samples::token_usage(n);
    assert_eq!(
        usage.message_key().as_deref(),
        Some(usage.conversation_id.as_str())
    );
    assert_eq!(
        usage.aggregate_id(),
        Some(format!("6:{}", usage.conversation_id))
    );
    assert_eq!(
        samples::liked(n).message_key().as_deref(),
        Some("forum.post.liked:505:12")
    );
    assert_eq!(
        samples::liked(n).aggregate_id().as_deref(),
        Some("post:505")
    );
    assert_eq!(samples::charge(n).aggregate_id().as_deref(), Some("user:6"));
    // No key declared on the service enum's level: the event's own key is used.
    let as_service: TokenStoreEvents = samples::charge(n).into();
    assert_eq!(as_service.message_key().as_deref(), Some("charge-5"));
}

#[test]
fn an_unknown_event_type_is_rejected_with_its_reason() {
    let r = TaskEvents::decode("task.deleted", 1, b"{}").unwrap_err();
    assert_eq!(r.reason(), "unknown_event_type");
    assert_eq!(
        r.to_string(),
        "unknown event type `task.deleted`: service `task` has no handler for it"
    );
}

#[test]
fn a_version_no_variant_accepts_is_rejected_with_the_accepted_ones() {
    let payload = samples::feishu(1).to_payload().unwrap();
    let r = NotificationEvents::decode("notification.feishu.requested", 3, &payload).unwrap_err();
    assert_eq!(
        r,
        Rejection::UnsupportedVersion {
            service: "notification",
            event_type: "notification.feishu.requested".into(),
            got: 3,
            accepted: vec![1, 2],
        }
    );
    // A v1 payload sent as v2 does not fit v2's shape: a decode error, not a silent success.
    let r = NotificationEvents::decode("notification.feishu.requested", 2, &payload).unwrap_err();
    assert_eq!(r.reason(), "decode_error");
}

#[test]
fn malformed_payloads_are_rejected_as_decode_errors_naming_the_problem() {
    let cases: [(&[u8], &str); 4] = [
        (b"{\"user_id\": 1,", "EOF while parsing"),
        (b"not json", "expected ident"),
        (b"{\"user_id\": 7}", "missing field `task_ids`"),
        (
            b"{\"user_id\": \"seven\", \"task_ids\": [1], \"triggered_at\": \"2026-11-23T09:00:00Z\"}",
            "invalid type: string \"seven\", expected u64",
        ),
    ];
    for (payload, expected) in cases {
        let r = TaskEvents::decode("task.urgency.promote.requested", 1, payload).unwrap_err();
        assert_eq!(r.reason(), "decode_error");
        let msg = r.to_string();
        assert!(
            msg.starts_with("cannot decode `task.urgency.promote.requested` v1 payload: ")
                && msg.contains(expected),
            "{msg}"
        );
    }
}

#[test]
fn an_invalid_payload_is_rejected_with_every_violation_and_its_path() {
    let mut e = samples::feishu_v2(1);
    e.user_id = 0;
    e.card.title = "   ".into();
    e.card.actions.push(contracts::notification::CardAction {
        label: "A label far too long for a button".into(),
        url: "https://evil.example/".into(),
    });
    e.locale = "chinese".into();
    let payload = serde_json::to_vec(&e).unwrap();
    let r = NotificationEvents::decode("notification.feishu.requested", 2, &payload).unwrap_err();
    let Rejection::Invalid { violations, .. } = &r else {
        panic!("expected an invalid payload, got {r}");
    };
    let got: Vec<(&str, &str)> = violations
        .iter()
        .map(|v| (v.path.as_str(), &*v.code))
        .collect();
    assert_eq!(
        got,
        [
            ("user_id", "range"),
            ("card.title", "non_empty"),
            ("card.actions[1].label", "length"),
            ("card.actions[1].url", "custom"),
            ("locale", "regex"),
        ]
    );
    assert_eq!(r.reason(), "invalid_payload");
    assert_eq!(
        r.to_string(),
        "invalid `notification.feishu.requested` v2 payload: user_id: value must be at least 1, got 0; card.title: must not be empty; card.actions[1].label: length must be at most 20, got 33; card.actions[1].url: must be an in-app path, not an absolute URL; locale: must match `[a-z]{2}(-[A-Z]{2})?`"
    );
}

#[test]
fn struct_level_rules_report_under_the_field_they_name() {
    let mut charge = samples::charge(1);
    charge.credit_cost = -3;
    let errs = charge.validate().unwrap_err();
    assert_eq!(
        errs.to_string(),
        "credit_cost: must not be negative unless `skip_charge` is set, got -3"
    );
    charge.skip_charge = true;
    assert!(charge.validate().is_ok());

    let mut t = samples::triggered(1);
    t.mock_now = Some(t.requested_at);
    assert_eq!(
        t.validate().unwrap_err().to_string(),
        "is_mock_time: must be true when `mock_now` is set"
    );
}

#[test]
fn an_active_schedule_dry_run_is_not_a_valid_source() {
    let mut v = serde_json::to_value(samples::triggered(1)).unwrap();
    v["source"] = json!("api_dry_run");
    let r = ActiveSchedulerEvents::decode(
        "active_schedule.triggered",
        1,
        &serde_json::to_vec(&v).unwrap(),
    )
    .unwrap_err();
    assert_eq!(r.reason(), "decode_error");
    assert!(
        r.to_string().contains("unknown variant `api_dry_run`"),
        "{r}"
    );
}

/// Records which handler ran, into the context the runtime hands it.
struct Notifier;

impl NotificationEventsHandler<Vec<String>> for Notifier {
    async fn feishu_requested(
        &self,
        log: &mut Vec<String>,
        event: FeishuRequested,
    ) -> Result<(), HandlerError> {
        log.push(format!("v1 {}", event.preview_id));
        Ok(())
    }

    async fn feishu_requested_v2(
        &self,
        log: &mut Vec<String>,
        event: FeishuRequestedV2,
    ) -> Result<(), HandlerError> {
        if event.card.actions.is_empty() {
            return Err(HandlerError::permanent("a v2 card needs an action"));
        }
        log.push(format!("v2 {}", event.card.title));
        Ok(())
    }
}

#[test]
fn each_version_is_dispatched_to_its_own_handler() {
    let mut log = Vec::new();
    for (version, payload) in [
        (1, samples::feishu(1).to_payload().unwrap()),
        (2, samples::feishu_v2(2).to_payload().unwrap()),
    ] {
        let event =
            NotificationEvents::decode("notification.feishu.requested", version, &payload).unwrap();
        ready(event.dispatch(&Notifier, &mut log)).unwrap();
    }
    assert_eq!(log, ["v1 pv-1", "v2 Today"]);
}

#[test]
fn a_handler_error_keeps_whether_it_is_permanent() {
    let mut e = samples::feishu_v2(3);
    e.card.actions.clear();
    let err = ready(NotificationEvents::from(e).dispatch(&Notifier, &mut Vec::new())).unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.to_string(), "a v2 card needs an action");
}

#[test]
fn schemas_carry_the_declared_constraints() {
    let schema = serde_json::to_value(FeishuRequested::json_schema()).unwrap();
    let props = &schema["properties"];
    assert_eq!(props["user_id"]["minimum"], json!(1));
    assert_eq!(props["dedupe_key"]["minLength"], json!(1));
    assert_eq!(props["dedupe_key"]["maxLength"], json!(191));
    assert_eq!(props["preview_id"]["pattern"], json!("\\S"));
    assert!(
        schema["required"]
            .as_array()
            .unwrap()
            .contains(&json!("requested_at"))
    );
    let v2 = serde_json::to_value(FeishuRequestedV2::json_schema()).unwrap();
    assert_eq!(
        v2["properties"]["locale"]["pattern"],
        json!("^(?:[a-z]{2}(-[A-Z]{2})?)$")
    );
    // Every event of every service has a schema whose title is its payload type.
    let catalog = contracts::catalog().unwrap();
    for route in catalog.routes() {
        let schema: Value = serde_json::to_value((route.spec.schema)()).unwrap();
        assert_eq!(
            schema["title"],
            json!(route.spec.payload),
            "{}",
            route.event_type
        );
        assert_eq!(schema["type"], json!("object"));
    }
}

#[test]
fn service_enums_describe_their_events_in_variant_order() {
    let events: Vec<(&str, u32, &str)> = AgentEvents::EVENTS
        .iter()
        .map(|e| (e.event_type, e.version, e.handler))
        .collect();
    assert_eq!(
        events,
        [
            (
                "chat.history.persist.requested",
                1,
                "chat_history_persist_requested"
            ),
            (
                "chat.token.usage.adjust.requested",
                1,
                "chat_token_usage_adjust_requested"
            ),
            (
                "agent.state.snapshot.persist",
                1,
                "agent_state_snapshot_persist"
            ),
            (
                "agent.timeline.persist.requested",
                1,
                "agent_timeline_persist_requested"
            ),
        ]
    );
    assert_eq!(
        NotificationEvents::accepted_versions("notification.feishu.requested"),
        [1, 2]
    );
}

// Each consumer is typed on one enum, so a second enum of a service would have its events
// dead-lettered as unknown by the first enum's consumer (and the reverse): refused, naming both.
#[test]
fn the_catalog_refuses_two_enums_of_one_service() {
    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, OutboxEvent)]
    #[outbox(event_type = "task.archived", version = 1, service = "task")]
    struct TaskArchived {
        task_id: u64,
    }
    #[derive(OutboxService)]
    #[outbox(service = "task")]
    enum MoreTaskEvents {
        Archived(TaskArchived),
    }
    for err in [
        Catalog::builder(RouteConfig::new())
            .service::<TaskEvents>()
            .unwrap()
            .service::<MoreTaskEvents>()
            .unwrap_err(),
        Catalog::builder(RouteConfig::new())
            .service::<MoreTaskEvents>()
            .unwrap()
            .service::<TaskEvents>()
            .unwrap_err(),
    ] {
        let ContractError::ServiceClaimedTwice {
            service,
            first,
            second,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(service, "task");
        let mut names = [*first, *second];
        names.sort_unstable_by_key(|n| n.ends_with("::TaskEvents"));
        assert!(names[0].ends_with("::MoreTaskEvents"), "{names:?}");
        assert_eq!(names[1], "contracts::task::TaskEvents");
        assert!(
            err.to_string()
                .starts_with("service `task` is claimed by two enums, `"),
            "{err}"
        );
    }
    // The same enum twice is one enum: a no-op.
    let catalog = Catalog::builder(RouteConfig::new())
        .service::<TaskEvents>()
        .unwrap()
        .service::<TaskEvents>()
        .unwrap()
        .build();
    assert_eq!(catalog.services().count(), 1);
    assert_eq!(catalog.enum_of("task"), Some("contracts::task::TaskEvents"));
    // A service added by name (a tool's) and then by its enum is one service.
    let catalog = Catalog::builder(RouteConfig::new())
        .service_by_name("task")
        .unwrap()
        .service::<TaskEvents>()
        .unwrap()
        .build();
    assert!(catalog.route("task.urgency.promote.requested", 1).is_some());
}

#[test]
fn committed_schemas_match_the_contracts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contracts/schemas");
    let stale = outbox_runtime::schema::stale(&contracts::catalog().unwrap(), &dir).unwrap();
    assert!(
        stale.is_empty(),
        "contracts/schemas is stale ({stale:?}); run `cargo run -p contracts --bin export-schemas` and commit the result"
    );
    // And the gate passes between the committed tree and itself.
    assert!(
        outbox_runtime::schema::compare(&dir, &dir)
            .unwrap()
            .is_empty()
    );
}
