//! A service's set of events: the [`OutboxService`] trait, the [`Dispatch`] from a decoded event
//! to its handler, and the typed [`Rejection`] of a message the service must not process.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;

use crate::validate::Violations;

/// What `#[derive(OutboxService)]` knows about a service's routing at compile time:
/// its name and the overrides written on its attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    /// The service name, `[a-z][a-z0-9-]*`, at most 48 characters.
    pub service: &'static str,
    /// `#[outbox(table = "...")]`.
    pub table: Option<&'static str>,
    /// `#[outbox(topic = "...")]`.
    pub topic: Option<&'static str>,
    /// `#[outbox(group = "...")]`.
    pub group: Option<&'static str>,
}

/// One event a service accepts: a variant of its `#[derive(OutboxService)]` enum.
#[derive(Clone, Copy)]
pub struct EventSpec {
    /// `lower.dotted.words`.
    pub event_type: &'static str,
    /// 1 or more.
    pub version: u32,
    /// The payload type's name, as written in the enum.
    pub payload: &'static str,
    /// The enum variant.
    pub variant: &'static str,
    /// The handler trait method that receives it.
    pub handler: &'static str,
    /// What the message key comes from (`user_id`), when the contract names one.
    pub key: Option<&'static str>,
    /// The payload's JSON Schema.
    pub schema: fn() -> schemars::Schema,
}

impl fmt::Debug for EventSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSpec")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("payload", &self.payload)
            .field("variant", &self.variant)
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

/// Decodes and validates one variant's payload.
#[doc(hidden)]
pub type Decoder<S> = fn(&[u8]) -> Result<S, Rejection>;

/// The payload of one variant's event.
#[doc(hidden)]
pub type Encoder<S> = fn(&S) -> Result<Vec<u8>, serde_json::Error>;

/// The events one service consumes, as an enum with one variant per (event type, version).
///
/// Implement it with `#[derive(OutboxService)]`, which also generates the service's handler
/// trait (one method per variant) and a [`Dispatch`] implementation for every type that
/// implements that trait.
pub trait OutboxService: Sized + Send + 'static {
    /// The service name.
    const SERVICE: &'static str;
    /// The routing declared on the enum's attribute.
    const ROUTE: RouteSpec;
    /// Every (event type, version) the service accepts, in variant order.
    const EVENTS: &'static [EventSpec];

    /// Per variant, in [`EVENTS`](Self::EVENTS) order: decodes and validates a payload into
    /// that variant. Generated.
    ///
    /// The per-variant work sits in tables of function pointers, read by the provided methods,
    /// so that JSON (de)serialisation of each event is compiled only in the crates that decode
    /// or encode, not in the contracts crate that merely declares the events.
    #[doc(hidden)]
    const DECODE: &'static [Decoder<Self>];
    /// Per variant, in [`EVENTS`](Self::EVENTS) order: the payload of the event inside.
    /// Generated.
    #[doc(hidden)]
    const ENCODE: &'static [Encoder<Self>];

    /// The position of this variant in [`EVENTS`](Self::EVENTS).
    fn variant_index(&self) -> usize;
    /// The message key of the event inside.
    fn message_key(&self) -> Option<String>;
    /// The aggregate id of the event inside.
    fn aggregate_id(&self) -> Option<String>;

    /// Decodes and validates a raw payload of `event_type` at `version`.
    ///
    /// The error says why the message must be dead-lettered: an event type this service does
    /// not know, a version it does not accept, a payload that does not decode, or one that
    /// breaks the contract's validation rules.
    fn decode(event_type: &str, version: u32, payload: &[u8]) -> Result<Self, Rejection> {
        for (spec, decode) in Self::EVENTS.iter().zip(Self::DECODE) {
            if spec.version == version && spec.event_type == event_type {
                return decode(payload);
            }
        }
        Err(reject::<Self>(event_type, version))
    }

    /// The event type of this variant.
    fn event_type(&self) -> &'static str {
        Self::EVENTS[self.variant_index()].event_type
    }

    /// The version of this variant.
    fn version(&self) -> u32 {
        Self::EVENTS[self.variant_index()].version
    }

    /// The JSON payload of the event inside (without the enum's variant tag).
    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error> {
        (Self::ENCODE[self.variant_index()])(self)
    }

    /// The versions of `event_type` this service accepts, ascending; empty for an unknown type.
    fn accepted_versions(event_type: &str) -> Vec<u32> {
        let mut v: Vec<u32> = Self::EVENTS
            .iter()
            .filter(|e| e.event_type == event_type)
            .map(|e| e.version)
            .collect();
        v.sort_unstable();
        v
    }
}

/// The rejection for an (event type, version) that matched no variant of `S`.
pub fn reject<S: OutboxService>(event_type: &str, version: u32) -> Rejection {
    let accepted = S::accepted_versions(event_type);
    if accepted.is_empty() {
        Rejection::UnknownEventType {
            service: S::SERVICE,
            event_type: event_type.to_owned(),
        }
    } else {
        Rejection::UnsupportedVersion {
            service: S::SERVICE,
            event_type: event_type.to_owned(),
            got: version,
            accepted,
        }
    }
}

/// Hands a decoded event to the handler method for its variant.
///
/// `#[derive(OutboxService)]` implements it for every `H` that implements the service's
/// generated handler trait, so a consumer that requires `S: Dispatch<H, Ctx>` does not compile
/// until `H` handles every event of `S`.
#[diagnostic::on_unimplemented(
    message = "`{H}` does not handle the events of `{Self}`",
    label = "`{H}` is not a handler of `{Self}`",
    note = "implement the handler trait that `#[derive(OutboxService)]` generated for `{Self}` (named `{Self}Handler` unless renamed) for `{H}`"
)]
pub trait Dispatch<H: ?Sized, Ctx: ?Sized>: OutboxService {
    /// Calls the handler method of this variant.
    fn dispatch<'a>(
        self,
        handler: &'a H,
        ctx: &'a mut Ctx,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

/// Why a message was not handed to a handler. The runtime dead-letters such messages with
/// [`Rejection::reason`] and the message as the reason: retrying cannot fix them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The service has no variant for this event type.
    UnknownEventType {
        /// The rejecting service.
        service: &'static str,
        /// The event type received.
        event_type: String,
    },
    /// The service knows the event type, but not this version.
    UnsupportedVersion {
        /// The rejecting service.
        service: &'static str,
        /// The event type received.
        event_type: String,
        /// The version received.
        got: u32,
        /// The versions the service accepts, ascending.
        accepted: Vec<u32>,
    },
    /// The payload is not valid JSON or does not fit the contract's shape.
    Decode {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// The decoder's message, with line and column.
        error: String,
    },
    /// The payload decoded but breaks the contract's validation rules.
    Invalid {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// Every broken rule.
        violations: Violations,
    },
}

impl Rejection {
    /// A short, stable code for dashboards and dead-letter filters: `unknown_event_type`,
    /// `unsupported_version`, `decode_error` or `invalid_payload`.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::UnknownEventType { .. } => "unknown_event_type",
            Rejection::UnsupportedVersion { .. } => "unsupported_version",
            Rejection::Decode { .. } => "decode_error",
            Rejection::Invalid { .. } => "invalid_payload",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::UnknownEventType {
                service,
                event_type,
            } => write!(
                f,
                "unknown event type `{event_type}`: service `{service}` has no handler for it"
            ),
            Rejection::UnsupportedVersion {
                service,
                event_type,
                got,
                accepted,
            } => {
                write!(
                    f,
                    "unsupported version {got} of `{event_type}`: service `{service}` accepts version"
                )?;
                if accepted.len() > 1 {
                    f.write_str("s")?;
                }
                for (i, v) in accepted.iter().enumerate() {
                    f.write_str(if i == 0 { " " } else { ", " })?;
                    write!(f, "{v}")?;
                }
                Ok(())
            }
            Rejection::Decode {
                event_type,
                version,
                error,
            } => write!(
                f,
                "cannot decode `{event_type}` v{version} payload: {error}"
            ),
            Rejection::Invalid {
                event_type,
                version,
                violations,
            } => write!(f, "invalid `{event_type}` v{version} payload: {violations}"),
        }
    }
}

impl StdError for Rejection {}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A handler's failure. By default it is retried through the outbox with backoff until the
/// row's attempts run out; [`HandlerError::permanent`] dead-letters it at once.
///
/// Any error converts with `?`, like `anyhow::Error`, so handlers can return their own errors.
pub struct HandlerError {
    permanent: bool,
    error: BoxError,
}

impl HandlerError {
    /// A failure worth retrying (a timeout, a lost connection).
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self {
            permanent: false,
            error: error.into(),
        }
    }

    /// A failure no retry can fix: the event goes dead with this error as its reason.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self {
            permanent: true,
            error: error.into(),
        }
    }

    /// True when the event must go dead without retrying.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }

    /// The underlying error, owned.
    pub fn into_error(self) -> BoxError {
        self.error
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

impl From<HandlerError> for Box<dyn StdError + Send + Sync + 'static> {
    fn from(e: HandlerError) -> Self {
        e.error
    }
}

impl From<HandlerError> for Box<dyn StdError + 'static> {
    fn from(e: HandlerError) -> Self {
        e.error
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)?;
        let mut source = self.error.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_messages_name_what_to_fix() {
        let r = Rejection::UnsupportedVersion {
            service: "notification",
            event_type: "notification.feishu.requested".into(),
            got: 3,
            accepted: vec![1, 2],
        };
        assert_eq!(r.reason(), "unsupported_version");
        assert_eq!(
            r.to_string(),
            "unsupported version 3 of `notification.feishu.requested`: service `notification` accepts versions 1, 2"
        );
    }

    #[test]
    fn handler_errors_convert_with_question_mark_and_show_their_chain() {
        fn fails() -> Result<(), HandlerError> {
            let n: u32 = "x".parse()?;
            let _ = n;
            Ok(())
        }
        let e = fails().unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "invalid digit found in string");
        assert!(HandlerError::permanent("no such user").is_permanent());
    }
}
