//! Bad input, generated: the envelope decoder and every contracts service's dispatcher decode
//! (what a consumer runs on each Kafka message) never panic, and every refusal says why.
//!
//! Bounded by the case count: `PROPTEST_CASES` (256 by default); `./scripts/chaos --quick`
//! sets a fixed count.

use contracts::{
    ActiveSchedulerEvents, AgentEvents, MemoryEvents, NotificationEvents, TaskEvents,
    TokenStoreEvents, samples,
};
use outbox_runtime::envelope::{self, VersionFormat};
use outbox_runtime::store::{OutboxRow, Status};
use outbox_runtime::{OutboxService, Rejection};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// The reasons a dispatcher may give; anything else is a new, undocumented reason.
const REASONS: [&str; 4] = [
    "unknown_event_type",
    "unsupported_version",
    "decode_error",
    "invalid_payload",
];

fn check_rejection(r: &Rejection) {
    assert!(
        REASONS.contains(&r.reason()),
        "unknown reason {:?}",
        r.reason()
    );
    assert!(
        !r.to_string().trim().is_empty(),
        "a rejection without a message: {r:?}"
    );
}

/// Decodes with service `S`: never a panic; a refusal names its reason; an accepted event is
/// the asked type and version, and encodes to a payload that decodes again.
fn dispatch_one<S: OutboxService>(event_type: &str, version: u32, payload: &[u8]) -> bool {
    match S::decode(event_type, version, payload) {
        Ok(event) => {
            assert_eq!(event.event_type(), event_type);
            assert_eq!(event.version(), version);
            let again = event.to_payload().expect("an accepted event encodes");
            if let Err(r) = S::decode(event_type, version, &again) {
                panic!("`{event_type}` v{version} accepted, re-encoded, then refused: {r}");
            }
            true
        }
        Err(r) => {
            check_rejection(&r);
            false
        }
    }
}

/// Every service's dispatcher on one message; how many accepted it (at most one: an event type
/// belongs to one service).
fn dispatch_all(event_type: &str, version: u32, payload: &[u8]) -> usize {
    [
        dispatch_one::<AgentEvents>(event_type, version, payload),
        dispatch_one::<MemoryEvents>(event_type, version, payload),
        dispatch_one::<TaskEvents>(event_type, version, payload),
        dispatch_one::<ActiveSchedulerEvents>(event_type, version, payload),
        dispatch_one::<NotificationEvents>(event_type, version, payload),
        dispatch_one::<TokenStoreEvents>(event_type, version, payload),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count()
}

/// One valid payload of every contract: (event type, version, payload).
fn sample_payloads() -> Vec<(&'static str, u32, Value)> {
    fn push<S: OutboxService>(out: &mut Vec<(&'static str, u32, Value)>, events: Vec<S>) {
        for e in events {
            let payload = serde_json::from_slice(&e.to_payload().unwrap()).unwrap();
            out.push((e.event_type(), e.version(), payload));
        }
    }
    let s = samples::all(7);
    let mut out = Vec::new();
    push(&mut out, s.agent);
    push(&mut out, s.memory);
    push(&mut out, s.task);
    push(&mut out, s.active_scheduler);
    push(&mut out, s.notification);
    push(&mut out, s.token_store);
    out
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0u64), Just(1), Just(u64::from(u32::MAX) + 1)].prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just(""),
            Just(" "),
            Just("/assistant/today"),
            Just("https://evil.example"),
            Just("2026-11-23T09:00:00Z"),
            Just("not a date"),
            Just("c0ffee00-0000-4000-8000-000000000007"),
            Just("assistant"),
            Just("urgent"),
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,16}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change to a valid payload.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(usize),
    Replace(usize, Value),
    Insert(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), any_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        ("[a-z_]{1,16}", any_json()).prop_map(|(k, v)| Mutation::Insert(k, v)),
    ]
}

fn mutate(payload: &Value, mutations: &[Mutation]) -> Value {
    let Value::Object(map) = payload else {
        return payload.clone();
    };
    let mut map = map.clone();
    for m in mutations {
        let keys: Vec<String> = map.keys().cloned().collect();
        match m {
            Mutation::Remove(i) if !keys.is_empty() => {
                map.remove(&keys[i % keys.len()]);
            }
            Mutation::Replace(i, v) if !keys.is_empty() => {
                map.insert(keys[i % keys.len()].clone(), v.clone());
            }
            Mutation::Insert(k, v) => {
                map.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    Value::Object(map)
}

/// A value for an envelope field: usually a plausible one, sometimes anything.
fn field(
    plausible: impl Strategy<Value = Value> + 'static,
) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => plausible.prop_map(Some),
        1 => Just(None),
        1 => any_json().prop_map(Some),
    ]
}

fn version_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..4).prop_map(Value::from),
        (0u64..4).prop_map(|v| Value::String(v.to_string())),
        (0u64..4).prop_map(|v| Value::String(format!("v{v}"))),
        Just(Value::String("V2".into())),
        Just(Value::String(" 1 ".into())),
        Just(Value::String("1.0".into())),
        Just(Value::String("v".into())),
        Just(Value::String("+1".into())),
        Just(Value::String("4294967296".into())),
        Just(Value::from(-1)),
        Just(Value::from(1.5)),
        Just(Value::from(u64::MAX)),
    ]
}

prop_compose! {
    /// A near-valid envelope around a (possibly mutated) contract payload.
    fn envelope_json(samples: Vec<(&'static str, u32, Value)>)(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 0..3),
        outbox_id in field(prop_oneof![
            (1i64..1_000_000).prop_map(Value::from),
            Just(Value::from(0)),
            Just(Value::from(-5)),
            Just(Value::from(i64::MAX)),
            Just(Value::String("12".into())),
        ]),
        event_id in field(prop_oneof![
            Just(Value::String("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into())),
            Just(Value::String("".into())),
            Just(Value::String("   ".into())),
            any::<String>().prop_map(Value::String),
        ]),
        event_type_noise in prop_oneof![
            4 => Just(None),
            1 => any::<String>().prop_map(Some),
            1 => Just(Some(" ".to_owned())),
        ],
        version in field(version_value()),
        service in field(prop_oneof![
            Just(Value::String("notification".into())),
            Just(Value::String("token-store".into())),
            Just(Value::String("".into())),
        ]),
        payload_as_string in prop::bool::weighted(0.1),
        drop_payload in prop::bool::weighted(0.05),
        extra in prop::collection::btree_map("[a-z_]{1,12}", any_json(), 0..2),
    ) -> Vec<u8> {
        let (event_type, sample_version, payload) = &samples[pick.index(samples.len())];
        let mut env = Map::new();
        for (k, v) in extra {
            env.insert(k, v);
        }
        if let Some(v) = outbox_id {
            env.insert("outbox_id".into(), v);
        }
        if let Some(v) = event_id {
            env.insert("event_id".into(), v);
        }
        env.insert(
            "event_type".into(),
            Value::String(event_type_noise.unwrap_or_else(|| (*event_type).to_owned())),
        );
        env.insert(
            "event_version".into(),
            version.unwrap_or_else(|| Value::from(*sample_version)),
        );
        if let Some(v) = service {
            env.insert("service_name".into(), v);
        }
        if !drop_payload {
            let p = mutate(payload, &mutations);
            let p = if payload_as_string { Value::String(p.to_string()) } else { p };
            env.insert("payload".into(), p);
        }
        serde_json::to_vec(&Value::Object(env)).unwrap()
    }
}

prop_compose! {
    fn stored_row()(
        id in 1i64..=i64::MAX,
        event_id in any::<String>(),
        event_type in "[a-z][a-z0-9_]{0,8}(\\.[a-z][a-z0-9_]{0,8}){1,3}",
        event_version in 1i32..=i32::MAX,
        service in any::<String>(),
        message_key in any::<Option<String>>(),
        aggregate_id in any::<Option<String>>(),
        payload in any_json(),
        pad in prop_oneof![Just(""), Just(" "), Just("\n\t")],
        created_at in any::<i64>(),
    ) -> OutboxRow {
        OutboxRow {
            id,
            event_id,
            event_type,
            event_version,
            service,
            topic: "t".into(),
            message_key,
            aggregate_id,
            payload: format!("{pad}{payload}{pad}"),
            headers: "{}".into(),
            status: Status::Sending,
            attempts: 1,
            max_attempts: 20,
            next_attempt_at: None,
            lease_owner: None,
            lease_until: None,
            last_error: None,
            dead_reason: None,
            published_at: None,
            consumed_at: None,
            created_at,
            updated_at: created_at,
        }
    }
}

proptest! {
    #[test]
    fn the_envelope_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = envelope::decode(&bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn the_envelope_decoder_never_panics_on_json(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(env) = envelope::decode(&bytes) {
            dispatch_all(&env.event_type, env.version, &env.payload);
        }
    }

    #[test]
    fn near_valid_envelopes_decode_or_say_why_and_dispatch_without_panic(
        bytes in envelope_json(sample_payloads())
    ) {
        match envelope::decode(&bytes) {
            Ok(env) => {
                prop_assert!(env.outbox_id > 0);
                prop_assert!(env.version >= 1);
                prop_assert!(!env.event_type.trim().is_empty());
                prop_assert!(!env.event_id.is_empty());
                prop_assert!(serde_json::from_slice::<Value>(&env.payload).is_ok());
                prop_assert!(dispatch_all(&env.event_type, env.version, &env.payload) <= 1);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn dispatchers_never_panic_on_any_type_version_and_payload(
        pick in any::<prop::sample::Index>(),
        other_type in prop_oneof![3 => Just(None), 1 => any::<String>().prop_map(Some)],
        version in prop_oneof![Just(0u32), Just(1), Just(2), Just(3), any::<u32>()],
        payload in prop_oneof![
            2 => any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => prop::collection::vec(any::<u8>(), 0..256),
        ],
    ) {
        let samples = sample_payloads();
        let (event_type, _, _) = &samples[pick.index(samples.len())];
        let event_type = other_type.as_deref().unwrap_or(event_type);
        prop_assert!(dispatch_all(event_type, version, &payload) <= 1);
    }

    #[test]
    fn mutated_contract_payloads_are_accepted_or_refused_with_a_reason(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let samples = sample_payloads();
        let (event_type, version, payload) = &samples[pick.index(samples.len())];
        let bytes = serde_json::to_vec(&mutate(payload, &mutations)).unwrap();
        prop_assert!(dispatch_all(event_type, *version, &bytes) <= 1);
    }

    #[test]
    fn what_the_relay_encodes_the_consumer_decodes(
        row in stored_row(),
        prefixed in any::<bool>(),
    ) {
        let format = if prefixed { VersionFormat::Prefixed } else { VersionFormat::Number };
        let bytes = envelope::encode(&row, format).expect("a JSON payload encodes");
        let _ = envelope::headers(&row);
        let env = envelope::decode(&bytes).expect("an encoded row decodes");
        prop_assert_eq!(env.outbox_id, row.id);
        prop_assert_eq!(env.event_type, row.event_type.clone());
        prop_assert_eq!(i64::from(env.version), i64::from(row.event_version));
        let event_id = row.event_id.trim();
        let expected_id = if event_id.is_empty() { row.id.to_string() } else { event_id.to_owned() };
        prop_assert_eq!(env.event_id, expected_id);
        let sent: Value = serde_json::from_str(&row.payload).unwrap();
        let got: Value = serde_json::from_slice(&env.payload).unwrap();
        prop_assert_eq!(sent, got);
    }
}

#[test]
fn every_sample_is_accepted_by_exactly_one_service() {
    for (event_type, version, payload) in sample_payloads() {
        let bytes = serde_json::to_vec(&payload).unwrap();
        assert_eq!(
            dispatch_all(event_type, version, &bytes),
            1,
            "{event_type} v{version}"
        );
    }
}
