//! The [`OutboxEvent`] trait: one versioned event contract.

use crate::constraint::SchemaCx;
use crate::service::{OutboxService, Rejection};
use crate::validate::Validate;

/// An event contract: a payload type with its event type, version and owning service.
///
/// Implement it with `#[derive(OutboxEvent)]`:
///
/// ```
/// use outbox_contract::OutboxEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
/// #[outbox(event_type = "task.urgency.promote.requested", version = 1, service = "task", key = user_id)]
/// pub struct UrgencyPromoteRequested {
///     #[outbox(validate(range(min = 1)))]
///     pub user_id: u64,
///     #[outbox(validate(non_empty, length(max = 500)))]
///     pub task_ids: Vec<u64>,
/// }
///
/// let event = UrgencyPromoteRequested { user_id: 7, task_ids: vec![] };
/// assert_eq!(UrgencyPromoteRequested::EVENT_TYPE, "task.urgency.promote.requested");
/// assert_eq!(event.message_key().as_deref(), Some("7"));
/// let err = outbox_contract::Validate::validate(&event).unwrap_err();
/// assert_eq!(err.to_string(), "task_ids: must not be empty");
/// ```
///
/// The "service" of an event is the service that consumes it: its table is that service's
/// outbox, which other services write into inside their own transactions.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox event",
    label = "not an event contract",
    note = "add `#[derive(OutboxEvent)]` and `#[outbox(event_type = \"...\", version = N, service = \"...\")]` to `{Self}`"
)]
pub trait OutboxEvent:
    serde::Serialize
    + serde::de::DeserializeOwned
    + schemars::JsonSchema
    + Validate
    + Send
    + Sync
    + 'static
{
    /// `lower.dotted.words`, checked at compile time.
    const EVENT_TYPE: &'static str;
    /// The contract's version, 1 or more. A changed payload shape is a new version.
    const VERSION: u32;
    /// The service that owns (consumes) the event: `[a-z][a-z0-9-]*`.
    const SERVICE: &'static str;

    /// What `key = ...` names (`user_id`, `partition_key()`), for documentation; `None` without
    /// a key.
    const KEY: Option<&'static str> = None;

    /// The Kafka message key, from the field or method named by `key = ...`. Events with the same
    /// key keep their order. `None` when the contract names no key: the runtime then uses the
    /// event id, as the Go system did.
    fn message_key(&self) -> Option<String>;

    /// The aggregate id carried in the envelope, from `aggregate = ...`; the message key when
    /// the contract names none.
    fn aggregate_id(&self) -> Option<String> {
        self.message_key()
    }

    /// Decodes and validates a payload of this contract; the error says why it must be
    /// dead-lettered.
    fn from_payload(payload: &[u8]) -> Result<Self, Rejection> {
        let event: Self = serde_json::from_slice(payload).map_err(|e| Rejection::Decode {
            event_type: Self::EVENT_TYPE,
            version: Self::VERSION,
            error: e.to_string(),
        })?;
        event.validate().map_err(|violations| Rejection::Invalid {
            event_type: Self::EVENT_TYPE,
            version: Self::VERSION,
            violations,
        })?;
        Ok(event)
    }

    /// The payload as stored and sent: its JSON.
    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The payload's JSON Schema (draft 2020-12), including the rules declared with
    /// `#[outbox(validate(...))]` that JSON Schema can express, on the payload's fields and on
    /// those of the structs its `nested` fields reach.
    fn json_schema() -> schemars::Schema {
        let mut schema = schemars::schema_for!(Self);
        if let Some(object) = schema.as_object_mut() {
            let mut root = serde_json::Value::Object(std::mem::take(object));
            Self::__outbox_schema(&mut SchemaCx::new(&mut root), "");
            if let serde_json::Value::Object(done) = root {
                *object = done;
            }
        }
        schema
    }
}

/// An event listed in its service's `#[derive(OutboxService)]` enum: it has a route and a
/// handler method. `#[derive(OutboxService)]` implements it for the event of each variant, and
/// storing an event requires it, so an event that no enum lists cannot be enqueued: the build
/// fails where it is enqueued, naming the event.
///
/// An event is listed in one enum: a second enum listing it is a conflicting implementation,
/// which the compiler refuses at that enum. The enum lives in the crate that defines its
/// events (the orphan rule says so, and it keeps a service's events in one place).
///
/// ```compile_fail
/// use outbox_contract::{Listed, OutboxEvent};
/// # use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
/// #[outbox(event_type = "ledger.entry.posted", version = 1, service = "ledger")]
/// pub struct EntryPosted { pub cents: i64 }
///
/// fn stores<E: OutboxEvent + Listed>(_: &E) {}
/// stores(&EntryPosted { cents: 5 }); // no enum lists `EntryPosted`
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not listed in any `#[derive(OutboxService)]` enum, so it has no route and no handler",
    label = "`{Self}` is listed in no service enum",
    note = "add a variant `{Self}({Self})` to the `#[derive(OutboxService)]` enum of the service that `{Self}` names in `#[outbox(service = \"...\")]`"
)]
// Not `Listed: OutboxEvent`: the derive implements `Listed` for each variant's type, and a
// variant that is not an event is already its own error; a supertrait would add a second.
pub trait Listed {
    /// The enum that lists the event: its service's events.
    type Service: OutboxService;
}

/// A value usable as a message key with `key = field` (or returned by `key = method()`).
///
/// Implemented for strings, integers, `char`, and `Option`s of them (`None`: no key).
/// Implement it for your own id types.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message key",
    label = "not usable as a key",
    note = "keys are strings, integers, or `Option`s of them; implement `event::ToKey` (of `outbox_runtime` or `outbox_contract`) for `{Self}`, or name a method that returns a `String` with `key = method()`"
)]
pub trait ToKey {
    /// The key text, or `None` for no key.
    fn to_key(&self) -> Option<String>;
}

macro_rules! display_key {
    ($($ty:ty),*) => {$(
        impl ToKey for $ty {
            fn to_key(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
display_key!(
    str, String, char, u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

impl ToKey for std::borrow::Cow<'_, str> {
    fn to_key(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl<T: ToKey + ?Sized> ToKey for &T {
    fn to_key(&self) -> Option<String> {
        (**self).to_key()
    }
}

impl<T: ToKey + ?Sized> ToKey for Box<T> {
    fn to_key(&self) -> Option<String> {
        (**self).to_key()
    }
}

impl<T: ToKey> ToKey for Option<T> {
    fn to_key(&self) -> Option<String> {
        self.as_ref().and_then(ToKey::to_key)
    }
}
