//! W3C trace context, carried with each event from the writer to the handler.
//!
//! [`Outbox::enqueue`](crate::store::Outbox::enqueue) stores the `traceparent` of the trace
//! context in scope; the consumer brings the stored one back into scope around the handler, so
//! a trace started before enqueue continues there, and events the handler enqueues join it.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

/// A W3C `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero.
    pub parent_id: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
}

impl TraceParent {
    /// A new sampled trace with random ids.
    pub fn new_root() -> Self {
        Self {
            trace_id: fastrand::u128(1..).to_be_bytes(),
            parent_id: fastrand::u64(1..).to_be_bytes(),
            flags: 1,
        }
    }

    /// The same trace, with a new span as parent.
    pub fn child(&self) -> Self {
        Self {
            parent_id: fastrand::u64(1..).to_be_bytes(),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Runs `fut` with `self` as the current trace context.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }

    /// Runs `f` with `self` as the current trace context.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }
}

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// The trace context in scope, if any.
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(|t| *t).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

/// A `traceparent` that does not follow the W3C format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent `{0}`: expected `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids")]
pub struct InvalidTraceParent(String);

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidTraceParent(s.to_owned());
        let parts: Vec<&str> = s.split('-').collect();
        let [version, trace, parent, flags] = parts[..] else {
            return Err(bad());
        };
        if version != "00" || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| bad())?;
        let parent_id = u64::from_str_radix(parent, 16).map_err(|_| bad())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        if trace_id == 0 || parent_id == 0 {
            return Err(bad());
        }
        Ok(Self {
            trace_id: trace_id.to_be_bytes(),
            parent_id: parent_id.to_be_bytes(),
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        assert_eq!(
            tp.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_context_in_scope_is_current() {
        assert!(current().is_none());
        let tp = TraceParent::new_root();
        assert_eq!(tp.sync_scope(current), Some(tp));
        assert_eq!(tp.child().trace_id, tp.trace_id);
    }
}
