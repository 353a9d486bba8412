//! The wire format: the Go system's JSON envelope, so that its consumers keep working, plus
//! headers (`traceparent` and CloudEvents `ce_*` attributes).
//!
//! ```json
//! {"outbox_id":12,"event_id":"0190…","event_type":"notification.feishu.requested",
//!  "event_version":"1","service_name":"notification","aggregate_id":"pv-3","payload":{…}}
//! ```
//!
//! The decoder accepts what the Go system wrote: a version of `"1"`, `"v1"`, `1`, or none (the
//! Go default, version 1); a missing `event_id` means the decimal outbox id.

use serde::Deserialize;
use serde_json::value::RawValue;

/// How `event_version` is written. Go consumers compared strings: notification and the
/// scheduler accepted `"1"`, forum and credit `"v1"`; this decoder accepts both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VersionFormat {
    /// `"1"`.
    #[default]
    Number,
    /// `"v1"`.
    Prefixed,
}

/// What an envelope is made of: one stored event, borrowed from wherever it is kept (an outbox
/// row, a write-ahead-log message, a test). The wire format knows no storage row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The id in the owning service's table: the envelope's `outbox_id`.
    pub outbox_id: i64,
    /// The globally unique event id.
    pub event_id: &'a str,
    /// The event type.
    pub event_type: &'a str,
    /// The contract version.
    pub event_version: u32,
    /// The owning (consuming) service.
    pub service: &'a str,
    /// The message key.
    pub message_key: Option<&'a str>,
    /// The aggregate id; the message key when `None`.
    pub aggregate_id: Option<&'a str>,
    /// The payload's JSON text.
    pub payload: &'a str,
    /// The W3C `traceparent` of the trace that stored the event, if any.
    pub traceparent: Option<&'a str>,
    /// When the event was stored, in Unix milliseconds.
    pub created_at_ms: i64,
}

impl<'a> From<&Record<'a>> for Record<'a> {
    fn from(r: &Record<'a>) -> Self {
        *r
    }
}

/// Builds the envelope of a stored event. Fails when the stored payload is not JSON (a row
/// written by hand or corrupted), which no retry can fix.
pub fn encode<'a>(
    record: impl Into<Record<'a>>,
    format: VersionFormat,
) -> Result<Vec<u8>, serde_json::Error> {
    let r: Record<'a> = record.into();
    // The payload is embedded as is; check that it is one JSON value first.
    serde_json::from_str::<serde::de::IgnoredAny>(r.payload)?;
    let payload = r.payload.trim();
    // One buffer, every string escaped straight into it: this runs once per published event.
    let mut out = Vec::with_capacity(payload.len() + 192 + r.event_type.len() + r.service.len());
    out.extend_from_slice(b"{\"outbox_id\":");
    serde_json::to_writer(&mut out, &r.outbox_id)?;
    out.extend_from_slice(b",\"event_id\":");
    serde_json::to_writer(&mut out, r.event_id)?;
    out.extend_from_slice(b",\"event_type\":");
    serde_json::to_writer(&mut out, r.event_type)?;
    out.extend_from_slice(match format {
        VersionFormat::Number => b",\"event_version\":\"",
        VersionFormat::Prefixed => b",\"event_version\":\"v",
    });
    serde_json::to_writer(&mut out, &r.event_version)?;
    out.extend_from_slice(b"\",\"service_name\":");
    serde_json::to_writer(&mut out, r.service)?;
    if let Some(agg) = r.aggregate_id.or(r.message_key) {
        out.extend_from_slice(b",\"aggregate_id\":");
        serde_json::to_writer(&mut out, agg)?;
    }
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload.as_bytes());
    out.push(b'}');
    Ok(out)
}

/// The Kafka headers of a stored event: its `traceparent`, if any, and the CloudEvents binding's
/// `ce_*` attributes.
pub fn headers<'a>(record: impl Into<Record<'a>>) -> Vec<(&'static str, String)> {
    let r: Record<'a> = record.into();
    let mut out = Vec::with_capacity(7);
    if let Some(tp) = r.traceparent {
        out.push(("traceparent", tp.to_owned()));
    }
    out.push(("ce_specversion", "1.0".to_owned()));
    out.push(("ce_id", r.event_id.to_owned()));
    out.push(("ce_type", r.event_type.to_owned()));
    out.push(("ce_source", format!("/outbox/{}", r.service)));
    out.push(("ce_time", rfc3339(r.created_at_ms)));
    out.push(("content-type", "application/json".to_owned()));
    out
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The row id in the owning service's table.
    pub outbox_id: i64,
    /// The event id (the decimal outbox id when the message had none).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The version, from `"1"`, `"v1"`, `1`, or none (1).
    pub version: u32,
    /// The owning service, when the message named one.
    pub service: Option<String>,
    /// The aggregate id.
    pub aggregate_id: Option<String>,
    /// The payload's JSON.
    pub payload: Vec<u8>,
}

/// Why a Kafka message is not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not JSON, or not the envelope's shape.
    #[error("not an outbox envelope: {0}")]
    Malformed(String),
    /// `outbox_id` missing or not positive.
    #[error("the envelope has no positive outbox_id")]
    NoOutboxId,
    /// `event_type` empty.
    #[error("the envelope has no event_type")]
    NoEventType,
    /// `event_version` that is not `N`, `"N"` or `"vN"` with N ≥ 1.
    #[error("unreadable event_version `{0}`")]
    Version(String),
    /// No payload.
    #[error("the envelope has no payload")]
    NoPayload,
    /// An `event_id` longer than [`MAX_EVENT_ID_LEN`] characters.
    #[error("the envelope's event_id has {0} characters; at most {MAX_EVENT_ID_LEN} are accepted")]
    EventIdTooLong(usize),
}

/// The longest event id accepted, in characters: what an inbox record holds. This crate's ids
/// are UUIDs (36); a producer of its own may use longer ones up to this.
pub const MAX_EVENT_ID_LEN: usize = 255;

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default)]
    outbox_id: i64,
    #[serde(default)]
    event_id: Option<String>,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    event_version: Option<serde_json::Value>,
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    aggregate_id: Option<String>,
    // `null` is a payload (the consumer's decoder rejects it and the row goes dead with that
    // reason); only a missing field is none.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The `event_id` of a message that is not a valid envelope, when it has one, so that its row
/// can be dead-lettered rather than left published.
pub fn event_id_of(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        event_id: String,
    }
    serde_json::from_slice::<Id>(bytes)
        .ok()
        .map(|i| i.event_id)
        .filter(|id| !id.trim().is_empty())
}

/// Decodes a Kafka message value.
pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    let wire: Wire<'_> =
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if wire.outbox_id <= 0 {
        return Err(EnvelopeError::NoOutboxId);
    }
    let event_type = wire.event_type.trim().to_owned();
    if event_type.is_empty() {
        return Err(EnvelopeError::NoEventType);
    }
    let version = parse_version(wire.event_version.as_ref())?;
    let payload = wire.payload.ok_or(EnvelopeError::NoPayload)?;
    let event_id = wire
        .event_id
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| wire.outbox_id.to_string());
    let len = event_id.chars().count();
    if len > MAX_EVENT_ID_LEN {
        return Err(EnvelopeError::EventIdTooLong(len));
    }
    Ok(Envelope {
        outbox_id: wire.outbox_id,
        event_id,
        event_type,
        version,
        service: wire
            .service_name
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        aggregate_id: wire.aggregate_id.filter(|s| !s.is_empty()),
        payload: payload.get().as_bytes().to_vec(),
    })
}

/// `"1"`, `"v1"`, `"V1"`, `1`, `""` and none are version 1 (or N).
pub fn parse_version(v: Option<&serde_json::Value>) -> Result<u32, EnvelopeError> {
    let bad = |v: &serde_json::Value| EnvelopeError::Version(v.to_string());
    match v {
        None | Some(serde_json::Value::Null) => Ok(1),
        Some(n @ serde_json::Value::Number(_)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n >= 1)
            .ok_or_else(|| bad(n)),
        Some(s @ serde_json::Value::String(text)) => {
            let t = text.trim();
            if t.is_empty() {
                return Ok(1);
            }
            let digits = t.strip_prefix(['v', 'V']).unwrap_or(t);
            digits
                .parse::<u32>()
                .ok()
                .filter(|&n| n >= 1 && digits.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad(s))
        }
        Some(other) => Err(bad(other)),
    }
}

/// Unix milliseconds as RFC 3339 UTC, `2026-11-23T09:00:00.000Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Record<'static> {
        Record {
            outbox_id: 12,
            event_id: "0190c3c0-0000-7000-8000-000000000001",
            event_type: "notification.feishu.requested",
            event_version: 1,
            service: "notification",
            message_key: Some("7"),
            aggregate_id: None,
            payload: "{\"user_id\":7}",
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            created_at_ms: 1_795_424_400_123,
        }
    }

    #[test]
    fn encodes_the_go_envelope_and_decodes_it_back() {
        let bytes = encode(row(), VersionFormat::Number).unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "{\"outbox_id\":12,\"event_id\":\"0190c3c0-0000-7000-8000-000000000001\",\"event_type\":\"notification.feishu.requested\",\"event_version\":\"1\",\"service_name\":\"notification\",\"aggregate_id\":\"7\",\"payload\":{\"user_id\":7}}"
        );
        let env = decode(&bytes).unwrap();
        assert_eq!(env.outbox_id, 12);
        assert_eq!(env.version, 1);
        assert_eq!(env.aggregate_id.as_deref(), Some("7"), "the key when none");
        assert_eq!(env.payload, b"{\"user_id\":7}");
        let prefixed = encode(row(), VersionFormat::Prefixed).unwrap();
        assert!(
            String::from_utf8(prefixed)
                .unwrap()
                .contains("\"event_version\":\"v1\"")
        );
    }

    #[test]
    fn accepts_every_version_spelling_of_the_go_system() {
        for (v, want) in [
            ("\"1\"", Ok(1)),
            ("\"v1\"", Ok(1)),
            ("\"V2\"", Ok(2)),
            ("3", Ok(3)),
            ("\"\"", Ok(1)),
            ("null", Ok(1)),
            ("\"v0\"", Err(())),
            ("\"1.0\"", Err(())),
            ("\"v+1\"", Err(())),
            ("-1", Err(())),
            ("true", Err(())),
        ] {
            let json = format!(
                "{{\"outbox_id\":1,\"event_type\":\"a.b\",\"event_version\":{v},\"payload\":{{}}}}"
            );
            assert_eq!(
                decode(json.as_bytes()).map(|e| e.version).map_err(|_| ()),
                want,
                "{v}"
            );
        }
        let no_version = decode(b"{\"outbox_id\":5,\"event_type\":\"a.b\",\"payload\":1}").unwrap();
        assert_eq!((no_version.version, no_version.event_id.as_str()), (1, "5"));
    }

    #[test]
    fn an_event_id_longer_than_an_inbox_record_is_refused() {
        let with_id = |id: &str| {
            format!(
                "{{\"outbox_id\":3,\"event_id\":\"{id}\",\"event_type\":\"a.b\",\"payload\":{{}}}}"
            )
        };
        let widest = "é".repeat(MAX_EVENT_ID_LEN);
        assert_eq!(
            decode(with_id(&widest).as_bytes()).unwrap().event_id,
            widest
        );
        let longer = format!("{widest}e");
        assert_eq!(
            decode(with_id(&longer).as_bytes()),
            Err(EnvelopeError::EventIdTooLong(256))
        );
        // Its row can still be found and dead-lettered by the id it names.
        assert_eq!(event_id_of(with_id(&longer).as_bytes()), Some(longer));
    }

    #[test]
    fn a_null_payload_is_a_payload_and_a_broken_envelope_keeps_its_event_id() {
        let env = decode(
            b"{\"outbox_id\":3,\"event_id\":\"e-3\",\"event_type\":\"a.b\",\"payload\":null}",
        )
        .unwrap();
        assert_eq!(env.payload, b"null");
        let broken = b"{\"outbox_id\":3,\"event_id\":\"e-3\",\"event_type\":\"\",\"payload\":{}}";
        assert!(decode(broken).is_err());
        assert_eq!(event_id_of(broken).as_deref(), Some("e-3"));
        assert_eq!(event_id_of(b"{\"event_id\":\" \"}"), None);
        assert_eq!(event_id_of(b"garbage"), None);
    }

    #[test]
    fn rejects_what_is_not_an_envelope_with_a_reason() {
        for (bytes, want) in [
            (&b"garbage"[..], "not an outbox envelope"),
            (
                b"{\"event_type\":\"a.b\",\"payload\":{}}",
                "no positive outbox_id",
            ),
            (
                b"{\"outbox_id\":1,\"event_type\":\" \",\"payload\":{}}",
                "no event_type",
            ),
            (b"{\"outbox_id\":1,\"event_type\":\"a.b\"}", "no payload"),
        ] {
            let e = decode(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn headers_carry_the_trace_and_cloud_events_attributes() {
        let h = headers(row());
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(get("ce_id"), Some("0190c3c0-0000-7000-8000-000000000001"));
        assert_eq!(get("ce_type"), Some("notification.feishu.requested"));
        assert_eq!(get("ce_source"), Some("/outbox/notification"));
        assert_eq!(get("ce_time"), Some("2026-11-23T09:00:00.123Z"));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn strings_that_need_escapes_and_a_padded_payload_come_back_as_they_were() {
        let mut r = row();
        r.event_id = "id \"quoted\" \\ back";
        r.event_type = "type\twith\ncontrols\u{1}";
        r.service = "sérvice";
        r.aggregate_id = Some("agg \u{2028} line");
        r.event_version = 4_000_000_000;
        r.payload = " \n{\"s\": \"\\\"\"} \t";
        for format in [VersionFormat::Number, VersionFormat::Prefixed] {
            let bytes = encode(r, format).unwrap();
            let env = decode(&bytes).unwrap();
            assert_eq!(env.event_id, r.event_id);
            assert_eq!(env.event_type, r.event_type);
            assert_eq!(env.service.as_deref(), Some(r.service));
            assert_eq!(env.aggregate_id.as_deref(), r.aggregate_id);
            assert_eq!(env.version, 4_000_000_000);
            assert_eq!(env.outbox_id, 12);
            assert_eq!(env.payload, b"{\"s\": \"\\\"\"}", "trimmed, not rewritten");
        }
    }

    #[test]
    fn a_stored_payload_that_is_not_json_cannot_be_encoded() {
        let mut r = row();
        r.payload = "{\"user_id\": 7";
        assert!(encode(r, VersionFormat::Number).is_err());
    }
}
