//! A small `tracing` subscriber for the role processes: warnings and errors (and, with
//! `CHAOS_KAFKA_DEBUG` set, librdkafka's debug lines), one line each, on standard error (the
//! driver sends it to the process's log file), so that a failed scenario can be read afterwards.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

struct Lines {
    next: AtomicU64,
    /// librdkafka's own debug lines too (`CHAOS_KAFKA_DEBUG` is set).
    kafka_debug: bool,
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for Lines {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
            || (self.kafka_debug && metadata.target().contains("rdkafka"))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        eprintln!(
            "{} {} {}:{}",
            crate::world::now_ms(),
            event.metadata().level(),
            event.metadata().target(),
            fields.0
        );
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Installs the subscriber for this process.
pub(crate) fn init() {
    let _ = tracing::subscriber::set_global_default(Lines {
        next: AtomicU64::new(1),
        kafka_debug: std::env::var_os("CHAOS_KAFKA_DEBUG").is_some_and(|v| !v.is_empty()),
    });
}
