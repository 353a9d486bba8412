//! Metrics in the Prometheus text format, through `metrics-exporter-prometheus`: counters,
//! gauges, and latency histograms with buckets.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Buckets of `outbox_latency_seconds` (enqueue to consumed): 5 ms to 5 minutes.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The exporter, with the outbox's histograms as Prometheus histograms (not summaries).
pub(crate) fn exporter() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_latency_histograms_with_their_buckets() {
        let recorder = exporter().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("outbox_published_total", "service" => "task").increment(3);
            metrics::gauge!("outbox_backlog", "service" => "task").set(7.0);
            let latency = metrics::histogram!("outbox_latency_seconds", "service" => "task");
            latency.record(0.02);
            latency.record(0.7);
        });
        let text = handle.render();
        assert!(
            text.contains("outbox_published_total{service=\"task\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("outbox_backlog{service=\"task\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE outbox_latency_seconds histogram"),
            "{text}"
        );
        for (le, n) in [("0.01", 0), ("0.025", 1), ("0.5", 1), ("1", 2), ("+Inf", 2)] {
            let line = format!("outbox_latency_seconds_bucket{{service=\"task\",le=\"{le}\"}} {n}");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains("outbox_latency_seconds_count{service=\"task\"} 2"),
            "{text}"
        );
    }
}
