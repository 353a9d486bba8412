//! W3C trace context, carried with each event from the writer to the handler.
//!
//! [`Outbox::enqueue`](crate::store::Outbox::enqueue) stores the `traceparent` of the trace
//! context in scope; the consumer brings the stored one back into scope around the handler, so
//! a trace started before enqueue continues there, and events the handler enqueues join it.
//!
//! With the `opentelemetry` feature, the context of the current `tracing` span, as
//! `tracing-opentelemetry` sees it, comes before the one in scope here, and the stored context
//! can be made the parent of a span, so that traces cross the outbox in an OpenTelemetry
//! backend. Without the feature, or outside such a span, the context in scope here is used.

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

/// The W3C header carrying the trace id, the parent span id and the flags.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendors' trace state.
// Used by the relay and the consumers.
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
pub(crate) const TRACESTATE: &str = "tracestate";

/// The W3C trace headers to store with an event enqueued now, `traceparent` first, then
/// `tracestate` if there is one.
///
/// With the `opentelemetry` feature, the context of the current `tracing` span when it has a
/// valid OpenTelemetry span context; else the trace context in scope ([`current`]); else a new
/// root, so that every event carries a `traceparent`.
pub(crate) fn capture() -> Vec<(&'static str, String)> {
    #[cfg(feature = "opentelemetry")]
    if let Some(headers) = otel::headers_of(&tracing::Span::current()) {
        return headers;
    }
    let tp = current().unwrap_or_else(TraceParent::new_root);
    vec![(TRACEPARENT, tp.to_string())]
}

/// Makes the context in the stored `traceparent` and `tracestate` the parent of `span`.
///
/// With the `opentelemetry` feature only; a no-op without it. Call it on a new span, before it
/// is entered or its context read (`tracing-opentelemetry` fixes a span's parent then). A
/// missing or malformed `traceparent` is ignored: `span` keeps the parent it has.
// Used by the relay and the consumers.
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
pub(crate) fn continue_from(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) {
    #[cfg(feature = "opentelemetry")]
    otel::continue_from(span, traceparent, tracestate);
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (span, traceparent, tracestate);
}

/// The W3C trace headers of `span`'s OpenTelemetry context, `traceparent` first, when it is
/// valid: to send with a message, so that the receiver's span becomes a child of `span`.
///
/// With the `opentelemetry` feature only; `None` without it, and for a span that the
/// OpenTelemetry layer does not record.
// Used by the relay and the consumers.
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
pub(crate) fn headers_of(span: &tracing::Span) -> Option<Vec<(&'static str, String)>> {
    #[cfg(feature = "opentelemetry")]
    return otel::headers_of(span);
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = span;
        None
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::Context;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TRACEPARENT, TRACESTATE};

    /// Collects what the propagator injects, under the two W3C names.
    struct Headers(Vec<(&'static str, String)>);

    impl Injector for Headers {
        fn set(&mut self, key: &str, value: String) {
            let key = match key {
                TRACEPARENT => TRACEPARENT,
                TRACESTATE => TRACESTATE,
                _ => return,
            };
            if !value.is_empty() {
                self.0.push((key, value));
            }
        }
    }

    /// The stored header values, for the propagator to read.
    struct Stored<'a> {
        traceparent: &'a str,
        tracestate: Option<&'a str>,
    }

    impl Extractor for Stored<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                TRACEPARENT => Some(self.traceparent),
                TRACESTATE => self.tracestate,
                _ => None,
            }
        }

        fn keys(&self) -> Vec<&str> {
            let mut keys = vec![TRACEPARENT];
            if self.tracestate.is_some() {
                keys.push(TRACESTATE);
            }
            keys
        }
    }

    pub(super) fn headers_of(span: &tracing::Span) -> Option<Vec<(&'static str, String)>> {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut headers = Headers(Vec::with_capacity(2));
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        // The propagator injects `traceparent` first, and always for a valid context.
        debug_assert_eq!(headers.0.first().map(|(k, _)| *k), Some(TRACEPARENT));
        Some(headers.0)
    }

    pub(super) fn continue_from(
        span: &tracing::Span,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) {
        let Some(traceparent) = traceparent else {
            return;
        };
        let stored = Stored {
            traceparent,
            tracestate,
        };
        // From an empty context, not the thread's current one: the stored context alone.
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &stored);
        // A malformed value extracts to no span: setting that as parent would cut `span` from
        // the parent it has, so it is left as it is.
        if cx.span().span_context().is_valid() {
            // Fails only without the OpenTelemetry layer, for a disabled span, or for one
            // already started; the span then stays where `tracing` put it.
            let _ = span.set_parent(cx);
        }
    }
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

    fn traceparent_of(headers: &[(&'static str, String)]) -> TraceParent {
        let [(TRACEPARENT, tp)] = headers else {
            panic!("expected a traceparent alone, got {headers:?}");
        };
        tp.parse().unwrap()
    }

    #[test]
    fn capture_returns_the_context_in_scope() {
        let tp = TraceParent::new_root();
        let headers = tp.sync_scope(capture);
        assert_eq!(headers, vec![(TRACEPARENT, tp.to_string())]);
    }

    #[tokio::test]
    async fn capture_returns_the_context_in_async_scope() {
        let tp = TraceParent::new_root();
        let headers = tp
            .scope(async {
                tokio::task::yield_now().await;
                capture()
            })
            .await;
        assert_eq!(headers, vec![(TRACEPARENT, tp.to_string())]);
    }

    #[test]
    fn capture_without_a_context_starts_a_new_trace_each_time() {
        assert!(current().is_none());
        let first = traceparent_of(&capture());
        let second = traceparent_of(&capture());
        assert_ne!(first.trace_id, second.trace_id);
        assert_eq!(first.flags, 1);
    }

    #[test]
    fn without_an_opentelemetry_layer_spans_carry_no_context() {
        let span = tracing::info_span!("no layer");
        continue_from(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None,
        );
        assert_eq!(headers_of(&span), None);
        let tp = TraceParent::new_root();
        let headers = tp.sync_scope(|| span.in_scope(capture));
        assert_eq!(headers, vec![(TRACEPARENT, tp.to_string())]);
    }
}

#[cfg(all(test, feature = "opentelemetry"))]
mod otel_tests {
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Spans recorded by `tracing-opentelemetry` into an in-memory exporter.
    struct Recorder {
        exporter: InMemorySpanExporter,
        // Kept until the spans are read: the exporter forgets them on shutdown.
        provider: SdkTracerProvider,
    }

    impl Recorder {
        fn new() -> Self {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            Self { exporter, provider }
        }

        /// Runs `f` with the OpenTelemetry layer as this thread's subscriber.
        fn run<R>(&self, f: impl FnOnce() -> R) -> R {
            let subscriber = tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(self.provider.tracer("test")));
            tracing::subscriber::with_default(subscriber, f)
        }

        /// The exported (closed) span named `name`.
        fn span(&self, name: &str) -> SpanData {
            let spans = self.exporter.get_finished_spans().unwrap();
            let mut named = spans.into_iter().filter(|s| s.name == name);
            let span = named
                .next()
                .unwrap_or_else(|| panic!("no span `{name}` exported"));
            assert!(named.next().is_none(), "more than one span `{name}`");
            span
        }
    }

    fn traceparent_of(headers: &[(&'static str, String)]) -> TraceParent {
        let [(TRACEPARENT, tp), ..] = headers else {
            panic!("expected a traceparent first, got {headers:?}");
        };
        tp.parse().unwrap()
    }

    /// The `traceparent` that continues `span`: its trace, with it as parent.
    fn traceparent_continuing(span: &SpanData) -> String {
        TraceParent {
            trace_id: span.span_context.trace_id().to_bytes(),
            parent_id: span.span_context.span_id().to_bytes(),
            flags: 1,
        }
        .to_string()
    }

    #[test]
    fn capture_in_an_entered_span_returns_that_spans_context() {
        let recorder = Recorder::new();
        let headers = recorder.run(|| tracing::info_span!("enqueue").in_scope(capture));
        assert_eq!(headers.len(), 1, "no tracestate expected: {headers:?}");
        let tp = traceparent_of(&headers);
        let span = recorder.span("enqueue");
        assert_eq!(tp.trace_id, span.span_context.trace_id().to_bytes());
        assert_eq!(tp.parent_id, span.span_context.span_id().to_bytes());
        assert_eq!(tp.flags, 1);
    }

    #[test]
    fn capture_prefers_the_opentelemetry_span_to_the_context_in_scope() {
        let recorder = Recorder::new();
        let in_scope = TraceParent::new_root();
        let (outside_span, inside_span) = recorder.run(|| {
            in_scope.sync_scope(|| (capture(), tracing::info_span!("enqueue").in_scope(capture)))
        });
        // No span entered: the context in scope.
        assert_eq!(outside_span, vec![(TRACEPARENT, in_scope.to_string())]);
        let tp = traceparent_of(&inside_span);
        let span = recorder.span("enqueue");
        assert_eq!(tp.trace_id, span.span_context.trace_id().to_bytes());
        assert_ne!(tp.trace_id, in_scope.trace_id);
    }

    #[test]
    fn a_continued_span_is_a_child_of_the_stored_context() {
        let recorder = Recorder::new();
        recorder.run(|| tracing::info_span!("upstream").in_scope(|| {}));
        let upstream = recorder.span("upstream");
        let traceparent = traceparent_continuing(&upstream);
        recorder.run(|| {
            let span = tracing::info_span!("consume");
            continue_from(&span, Some(&traceparent), None);
            span.in_scope(|| {});
        });
        let consume = recorder.span("consume");
        assert_eq!(
            consume.span_context.trace_id(),
            upstream.span_context.trace_id()
        );
        assert_eq!(consume.parent_span_id, upstream.span_context.span_id());
        assert!(consume.parent_span_is_remote);
        assert_ne!(
            consume.span_context.span_id(),
            upstream.span_context.span_id()
        );
    }

    #[test]
    fn headers_of_a_continued_span_carry_the_trace_and_the_spans_own_id() {
        let recorder = Recorder::new();
        let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = recorder.run(|| {
            let span = tracing::info_span!("publish");
            continue_from(&span, Some(upstream), Some("vendor=opaque"));
            headers_of(&span)
        });
        let headers = headers.expect("a continued span has a context");
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers[1], (TRACESTATE, "vendor=opaque".to_owned()));
        let tp = traceparent_of(&headers);
        let upstream: TraceParent = upstream.parse().unwrap();
        let publish = recorder.span("publish");
        assert_eq!(tp.trace_id, upstream.trace_id);
        assert_eq!(tp.parent_id, publish.span_context.span_id().to_bytes());
        assert_ne!(tp.parent_id, upstream.parent_id);
        assert_eq!(
            publish.parent_span_id,
            SpanId::from_bytes(upstream.parent_id)
        );
    }

    #[test]
    fn capture_in_a_continued_span_keeps_the_trace_and_its_state() {
        let recorder = Recorder::new();
        let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = recorder.run(|| {
            let span = tracing::info_span!("handle");
            continue_from(&span, Some(upstream), Some("vendor=opaque"));
            span.in_scope(capture)
        });
        let tp = traceparent_of(&headers);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            tp.parent_id,
            recorder.span("handle").span_context.span_id().to_bytes()
        );
        assert_eq!(headers[1..], [(TRACESTATE, "vendor=opaque".to_owned())]);
    }

    #[test]
    fn capture_without_a_span_or_a_context_starts_a_new_trace() {
        let recorder = Recorder::new();
        let (first, second) = recorder.run(|| (capture(), capture()));
        let first = traceparent_of(&first);
        let second = traceparent_of(&second);
        assert_ne!(first.trace_id, second.trace_id);
        assert!(recorder.exporter.get_finished_spans().unwrap().is_empty());
    }

    #[test]
    fn a_malformed_traceparent_leaves_the_span_where_it_was() {
        let recorder = Recorder::new();
        recorder.run(|| {
            for (name, traceparent) in [
                ("garbage", "not a traceparent"),
                (
                    "zero trace id",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ),
                ("truncated", "00-4bf92f3577b34da6a3ce929d0e0e4736"),
            ] {
                let span = tracing::info_span!("root", case = name);
                continue_from(&span, Some(traceparent), Some("vendor=opaque"));
                assert_eq!(
                    headers_of(&span).map(|h| h.len()),
                    Some(1),
                    "{name}: no tracestate of a context not taken"
                );
            }
            let outer = tracing::info_span!("outer");
            outer.in_scope(|| {
                let inner = tracing::info_span!("inner");
                continue_from(&inner, Some("00-zz-zz-01"), None);
                inner.in_scope(|| {});
            });
        });
        let spans = recorder.exporter.get_finished_spans().unwrap();
        let roots: Vec<_> = spans.iter().filter(|s| s.name == "root").collect();
        assert_eq!(roots.len(), 3);
        for root in &roots {
            assert_eq!(root.parent_span_id, SpanId::INVALID);
            assert!(!root.parent_span_is_remote);
            assert_ne!(root.span_context.trace_id(), TraceId::INVALID);
        }
        let (outer, inner) = (recorder.span("outer"), recorder.span("inner"));
        assert_eq!(inner.parent_span_id, outer.span_context.span_id());
        assert_eq!(inner.span_context.trace_id(), outer.span_context.trace_id());
    }
}
