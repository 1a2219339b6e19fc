//! `--otlp URL`: each stored window as OTLP metrics (the opentelemetry-proto crate's
//! types), delta temporality: its RTT, IPDV and one-way delay as exponential histograms
//! at scale [`crate::native::SCHEMA`] (the native histograms' buckets, numbered one
//! below), its probe counts and events as monotonic sums, the outage durations of its
//! events as an exponential histogram, and a capacity test's result as gauges. Each
//! point spans the window; the resource is the agent and its site.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exponential_histogram_data_point, metric,
    number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::native::Native;
use crate::promwire::ZERO_THRESHOLD;
use crate::totals::{CAPACITY, COUNTERS, Contribution, HISTOGRAMS, OUTAGE};

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..KeyValue::default()
    }
}

/// A Prometheus family name as an OpenTelemetry metric name and unit:
/// `pathprobe_rtt_seconds` is `pathprobe.rtt` in `s`, `pathprobe_probes_sent_total` is
/// `pathprobe.probes.sent`.
pub fn otel_name(prometheus: &str) -> (String, &'static str) {
    let (base, unit) = if let Some(b) = prometheus.strip_suffix("_seconds") {
        (b, "s")
    } else if let Some(b) = prometheus.strip_suffix("_bits_per_second") {
        (b, "bit/s")
    } else if let Some(b) = prometheus.strip_suffix("_total") {
        (b, "1")
    } else {
        (prometheus, "1")
    };
    (base.replace('_', "."), unit)
}

fn histogram_point(
    h: &Native,
    attributes: &[KeyValue],
    c: &Contribution,
) -> ExponentialHistogramDataPoint {
    let e = h.to_exponential();
    ExponentialHistogramDataPoint {
        attributes: attributes.to_vec(),
        start_time_unix_nano: c.start_ns,
        time_unix_nano: c.end_ns,
        count: e.count,
        sum: Some(e.sum),
        scale: e.scale,
        zero_count: e.zero_count,
        zero_threshold: ZERO_THRESHOLD.max(e.zero_threshold),
        positive: Some(exponential_histogram_data_point::Buckets {
            offset: e.offset,
            bucket_counts: e.bucket_counts,
        }),
        ..ExponentialHistogramDataPoint::default()
    }
}

/// A metric's points, gathered by name across a request's windows.
#[derive(Default)]
struct Gathered {
    histograms: BTreeMap<&'static str, Vec<ExponentialHistogramDataPoint>>,
    sums: BTreeMap<&'static str, Vec<NumberDataPoint>>,
    gauges: BTreeMap<&'static str, Vec<NumberDataPoint>>,
}

impl Gathered {
    #[allow(clippy::cast_possible_wrap)] // counts far below 2^63
    fn add(&mut self, c: &Contribution) {
        let attributes = [kv("path", &c.key.path), kv("kind", &c.key.kind)];
        let t = &c.totals;
        for (m, name, _) in HISTOGRAMS {
            if let Some(h) = t.histograms.get(&m) {
                self.histograms
                    .entry(name)
                    .or_default()
                    .push(histogram_point(h, &attributes, c));
            }
        }
        if t.outage.count > 0 {
            self.histograms
                .entry(OUTAGE.0)
                .or_default()
                .push(histogram_point(&t.outage, &attributes, c));
        }
        for (name, _, f) in COUNTERS {
            self.sums.entry(name).or_default().push(NumberDataPoint {
                attributes: attributes.to_vec(),
                start_time_unix_nano: c.start_ns,
                time_unix_nano: c.end_ns,
                value: Some(number_data_point::Value::AsInt(f(t) as i64)),
                ..NumberDataPoint::default()
            });
        }
        if let Some(cap) = &t.capacity {
            for (name, _, f) in CAPACITY {
                if let Some(v) = f(cap) {
                    self.gauges.entry(name).or_default().push(NumberDataPoint {
                        attributes: attributes.to_vec(),
                        time_unix_nano: c.end_ns,
                        value: Some(number_data_point::Value::AsDouble(v)),
                        ..NumberDataPoint::default()
                    });
                }
            }
        }
    }

    fn metrics(self) -> Vec<Metric> {
        let help = |name: &str| -> String {
            HISTOGRAMS
                .iter()
                .map(|h| (h.1, h.2))
                .chain([OUTAGE])
                .chain(COUNTERS.iter().map(|c| (c.0, c.1)))
                .chain(CAPACITY.iter().map(|c| (c.0, c.1)))
                .find(|(n, _)| *n == name)
                .map(|(_, h)| h.to_string())
                .unwrap_or_default()
        };
        let metric = |name: &str, data| {
            let (n, unit) = otel_name(name);
            Metric {
                name: n,
                description: help(name),
                unit: unit.to_string(),
                data: Some(data),
                ..Metric::default()
            }
        };
        let delta = AggregationTemporality::Delta as i32;
        let mut out = Vec::new();
        for (name, data_points) in self.histograms {
            out.push(metric(
                name,
                metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points,
                    aggregation_temporality: delta,
                }),
            ));
        }
        for (name, data_points) in self.sums {
            out.push(metric(
                name,
                metric::Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: delta,
                    is_monotonic: true,
                }),
            ));
        }
        for (name, data_points) in self.gauges {
            out.push(metric(name, metric::Data::Gauge(Gauge { data_points })));
        }
        out
    }
}

/// The windows `fresh` as one request: a resource per agent and site (with `extra`
/// attributes), a scope `pathprobe-collector`.
pub fn request(fresh: &[Contribution], extra: &[(String, String)]) -> ExportMetricsServiceRequest {
    let mut by_resource: BTreeMap<(&str, &str), Gathered> = BTreeMap::new();
    for c in fresh {
        by_resource
            .entry((&c.key.agent, &c.key.site))
            .or_default()
            .add(c);
    }
    let resource_metrics = by_resource
        .into_iter()
        .map(|((agent, site), g)| {
            let mut attributes = vec![
                kv("service.name", "pathprobe-agent"),
                kv("service.instance.id", agent),
                kv("pathprobe.agent", agent),
                kv("pathprobe.site", site),
            ];
            attributes.extend(extra.iter().map(|(k, v)| kv(k, v)));
            ResourceMetrics {
                resource: Some(Resource {
                    attributes,
                    ..Resource::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "pathprobe-collector".to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        ..InstrumentationScope::default()
                    }),
                    metrics: g.metrics(),
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_opentelemetry() {
        assert_eq!(
            otel_name("pathprobe_rtt_seconds"),
            ("pathprobe.rtt".into(), "s")
        );
        assert_eq!(
            otel_name("pathprobe_probes_sent_total"),
            ("pathprobe.probes.sent".into(), "1")
        );
        assert_eq!(
            otel_name("pathprobe_capacity_bits_per_second"),
            ("pathprobe.capacity".into(), "bit/s")
        );
    }
}
