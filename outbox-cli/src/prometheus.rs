//! A small `metrics` recorder that serves the Prometheus text format over HTTP: counters,
//! gauges, and histograms as summaries (count and sum).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
struct Value {
    /// Counter and gauge value (a gauge's f64 bits).
    value: AtomicU64,
    /// Histogram count and sum (f64 bits).
    count: AtomicU64,
    sum: AtomicU64,
}

impl CounterFn for Value {
    fn increment(&self, by: u64) {
        self.value.fetch_add(by, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.value.fetch_max(value, Ordering::Relaxed);
    }
}

fn add_f64(cell: &AtomicU64, by: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        Some((f64::from_bits(bits) + by).to_bits())
    });
}

impl GaugeFn for Value {
    fn increment(&self, by: f64) {
        add_f64(&self.value, by);
    }
    fn decrement(&self, by: f64) {
        add_f64(&self.value, -by);
    }
    fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl HistogramFn for Value {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        add_f64(&self.sum, value);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's name and labels.
type Series = (String, Vec<(String, String)>);

/// Every metric by series.
type Registry = BTreeMap<Series, (Kind, Arc<Value>)>;

/// The recorder; clones share their metrics.
#[derive(Clone, Default)]
pub(crate) struct Prometheus {
    metrics: Arc<Mutex<Registry>>,
}

impl Prometheus {
    fn get(&self, key: &Key, kind: Kind) -> Arc<Value> {
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((key.name().to_owned(), labels))
            .or_insert_with(|| (kind, Arc::new(Value::default())))
            .1
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut typed = std::collections::BTreeSet::new();
        for ((name, labels), (kind, v)) in m.iter() {
            let label = |extra: &str| {
                let mut parts: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect();
                if !extra.is_empty() {
                    parts.push(extra.to_owned());
                }
                if parts.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", parts.join(","))
                }
            };
            let type_name = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "summary",
            };
            if typed.insert(name.clone()) {
                let _ = writeln!(out, "# TYPE {name} {type_name}");
            }
            match kind {
                Kind::Counter => {
                    let _ = writeln!(
                        out,
                        "{name}{} {}",
                        label(""),
                        v.value.load(Ordering::Relaxed)
                    );
                }
                Kind::Gauge => {
                    let _ = writeln!(
                        out,
                        "{name}{} {}",
                        label(""),
                        f64::from_bits(v.value.load(Ordering::Relaxed))
                    );
                }
                Kind::Histogram => {
                    let _ = writeln!(
                        out,
                        "{name}_count{} {}",
                        label(""),
                        v.count.load(Ordering::Relaxed)
                    );
                    let _ = writeln!(
                        out,
                        "{name}_sum{} {}",
                        label(""),
                        f64::from_bits(v.sum.load(Ordering::Relaxed))
                    );
                }
            }
        }
        out
    }

    /// Serves `render()` to every HTTP request on `listener` until the task is dropped.
    pub(crate) async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let body = this.render();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    }
}

impl Recorder for Prometheus {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.get(key, Kind::Counter))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.get(key, Kind::Gauge))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.get(key, Kind::Histogram))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_summaries() {
        let p = Prometheus::default();
        let c = p.register_counter(
            &Key::from_parts(
                "outbox_published_total",
                vec![metrics::Label::new("service", "task")],
            ),
            &Metadata::new("t", metrics::Level::INFO, None),
        );
        c.increment(3);
        let g = p.register_gauge(
            &Key::from_name("outbox_backlog"),
            &Metadata::new("t", metrics::Level::INFO, None),
        );
        g.set(7.0);
        let h = p.register_histogram(
            &Key::from_name("outbox_latency_seconds"),
            &Metadata::new("t", metrics::Level::INFO, None),
        );
        h.record(0.5);
        h.record(1.5);
        assert_eq!(
            p.render(),
            "# TYPE outbox_backlog gauge\noutbox_backlog 7\n# TYPE outbox_latency_seconds summary\noutbox_latency_seconds_count 2\noutbox_latency_seconds_sum 2\n# TYPE outbox_published_total counter\noutbox_published_total{service=\"task\"} 3\n"
        );
    }
}
