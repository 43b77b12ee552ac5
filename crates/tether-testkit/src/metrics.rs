//! Reading Prometheus samples in tests: from a registry held by the test, or from the text
//! exposition a `/metrics` endpoint serves (daemons in child processes).

use std::net::SocketAddr;

use prometheus::proto::{Metric, MetricType};

use crate::net::http_get;

/// The text exposition of `registry`, as `/metrics` serves it.
pub fn exposition(registry: &prometheus::Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|err| panic!("encoding the metrics: {err}"))
}

/// The value of exactly the series `series` (`name` or `name{labels}` as printed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every series of the family `name` (0 when absent).
pub fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The value of the series `series` (as printed) on the `/metrics` of the admin listener
/// `admin` (a daemon in a child process); 0 if absent.
pub async fn scrape(admin: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    sample(&body, series).unwrap_or(0.0)
}

/// The value of the series `series` (as printed) in `registry`'s exposition; 0 if absent.
pub fn registry_sample(registry: &prometheus::Registry, series: &str) -> f64 {
    sample(&exposition(registry), series).unwrap_or(0.0)
}

/// The value of the counter or gauge series of `name` with exactly these labels, if present.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .find_map(|family| {
            family
                .get_metric()
                .iter()
                .find(|m| m.get_label().len() == labels.len() && has_labels(m, labels))
                .map(|m| sample_value(family.get_field_type(), m))
        })
}

/// Like [`metric`] but a missing series counts as 0.
pub fn metric_or_zero(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(registry, name, labels).unwrap_or(0.0)
}

/// The sum of every counter or gauge series of `name` that carries these labels (among
/// others); 0 when none does.
pub fn metric_sum(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| has_labels(m, labels))
        // A series is a counter or a gauge; the other one reads 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// Whether `m` carries every pair of `labels`.
fn has_labels(m: &Metric, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| {
        m.get_label()
            .iter()
            .any(|l| l.name() == *k && l.value() == *v)
    })
}

/// The value of a counter, or else of a gauge.
fn sample_value(kind: MetricType, m: &Metric) -> f64 {
    match kind {
        MetricType::COUNTER => m.get_counter().get_value(),
        _ => m.get_gauge().get_value(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TEXT: &str = "# HELP a_total x\n# TYPE a_total counter\na_total 3\n\
                        b_total{reason=\"fin\"} 2\nb_total{reason=\"reset\"} 5\nb_total_x 100\n";

    #[test]
    fn samples_and_sums() {
        assert_eq!(sample(TEXT, "a_total"), Some(3.0));
        assert_eq!(sample(TEXT, "b_total{reason=\"reset\"}"), Some(5.0));
        assert_eq!(sample(TEXT, "b_total"), None);
        assert_eq!(family_sum(TEXT, "b_total"), 7.0);
        assert_eq!(family_sum(TEXT, "missing"), 0.0);
    }

    #[test]
    fn registry_series_by_exact_labels_or_summed() {
        let registry = prometheus::Registry::new();
        let closed = prometheus::IntCounterVec::new(
            prometheus::Opts::new("closed_total", "x"),
            &["side", "reason"],
        )
        .unwrap();
        registry.register(Box::new(closed.clone())).unwrap();
        closed.with_label_values(&["agent", "fin"]).inc_by(2);
        closed.with_label_values(&["agent", "reset"]).inc_by(5);
        let pairs = [("reason", "fin"), ("side", "agent")];
        assert_eq!(metric(&registry, "closed_total", &pairs), Some(2.0));
        assert_eq!(
            metric(&registry, "closed_total", &[("side", "agent")]),
            None
        );
        assert_eq!(metric_or_zero(&registry, "missing", &[]), 0.0);
        assert_eq!(
            metric_sum(&registry, "closed_total", &[("side", "agent")]),
            7.0
        );
        assert_eq!(
            registry_sample(&registry, "closed_total{reason=\"reset\",side=\"agent\"}"),
            5.0
        );
    }
}
