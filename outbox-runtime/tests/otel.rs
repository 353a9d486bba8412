//! One trace from the span that enqueued an event to the span of the handler that applied it,
//! through the relay's publish span, recorded with OpenTelemetry's in-memory exporter.

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_runtime::sqlx::Sqlite;
use outbox_runtime::testing::Harness;
use outbox_runtime::{Context, HandlerError, OutboxEvent, OutboxService};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
#[outbox(event_type = "invoice.issued", version = 1, service = "billing", key = customer)]
pub struct InvoiceIssued {
    pub customer: String,
}

#[derive(Debug, Clone, OutboxService)]
#[outbox(service = "billing")]
pub enum BillingEvents {
    InvoiceIssued(InvoiceIssued),
}

struct Mailer;

impl BillingEventsHandler<Context<Sqlite>> for Mailer {
    async fn invoice_issued(
        &self,
        _: &mut Context<Sqlite>,
        e: InvoiceIssued,
    ) -> Result<(), HandlerError> {
        let _span = tracing::info_span!("send invoice mail", customer = %e.customer).entered();
        Ok(())
    }
}

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let mut named = spans.iter().filter(|s| s.name == name);
    let found = named
        .next()
        .unwrap_or_else(|| panic!("no span `{name}` in {:?}", names(spans)));
    assert!(named.next().is_none(), "more than one `{name}`");
    found
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

#[tokio::test]
async fn one_trace_runs_from_the_enqueuing_span_to_the_handlers_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // The relay and the consumer run in tasks of their own: the subscriber is the process's.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut h = Harness::builder()
        .consumer::<BillingEvents, _>(Mailer)
        .start()
        .await
        .unwrap();
    h.enqueue(&InvoiceIssued {
        customer: "c-42".into(),
    })
    .instrument(tracing::info_span!("POST /invoices"))
    .await
    .unwrap();
    // Enqueued with no span in scope: a trace of its own.
    h.enqueue(&InvoiceIssued {
        customer: "c-43".into(),
    })
    .await
    .unwrap();
    h.run_until_idle().await.unwrap();
    let topic = h
        .outbox()
        .catalog()
        .service("billing")
        .unwrap()
        .topic
        .clone();
    let wire: Vec<String> = h
        .bus()
        .messages(&topic)
        .iter()
        .map(|m| {
            m.header("traceparent")
                .expect("every message carries one")
                .to_owned()
        })
        .collect();
    h.shutdown().await.unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let request = span(&spans, "POST /invoices");
    let published: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "outbox.publish")
        .collect();
    let consumed: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "outbox.consume")
        .collect();
    let mails: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "send invoice mail")
        .collect();
    assert_eq!(
        (published.len(), consumed.len(), mails.len()),
        (2, 2, 2),
        "{:?}",
        names(&spans)
    );

    let trace = request.span_context.trace_id();
    let publish = published
        .iter()
        .find(|s| s.span_context.trace_id() == trace)
        .expect("the publish span continues the request's trace");
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    let consume = consumed
        .iter()
        .find(|s| s.span_context.trace_id() == trace)
        .expect("the consume span continues it");
    assert_eq!(
        consume.parent_span_id,
        publish.span_context.span_id(),
        "the consumer's parent is the publish span, whose context went on the wire"
    );
    let mail = mails
        .iter()
        .find(|s| s.span_context.trace_id() == trace)
        .expect("the handler's span is in the trace");
    assert_eq!(mail.parent_span_id, consume.span_context.span_id());

    // The other event: its own trace, carried just as far.
    let other = published
        .iter()
        .find(|s| s.span_context.trace_id() != trace)
        .unwrap();
    assert_ne!(
        other.parent_span_id,
        SpanId::INVALID,
        "a root stored at enqueue is its parent"
    );
    assert!(
        consumed
            .iter()
            .any(|s| s.parent_span_id == other.span_context.span_id()),
        "the other event's consumer continues its publish span"
    );
    // On the wire: each message's traceparent is its publish span's context.
    let mut expected: Vec<String> = published
        .iter()
        .map(|s| {
            format!(
                "00-{}-{}-01",
                s.span_context.trace_id(),
                s.span_context.span_id()
            )
        })
        .collect();
    let mut wire = wire;
    expected.sort();
    wire.sort();
    assert_eq!(wire, expected);
    drop(provider);
}
