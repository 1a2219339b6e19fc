//! Prometheus's two protobuf wire formats, as prost messages written from their `.proto`
//! files (only the fields pathprobe sends):
//!
//! - the scrape exposition, `io.prometheus.client` (`client_model`'s `metrics.proto`,
//!   proto2): length-delimited `MetricFamily` messages, which a Prometheus with native
//!   histograms enabled asks for in `Accept`;
//! - remote write 1.0, `prometheus` (`prompb/types.proto` and `remote.proto`, proto3): a
//!   snappy-compressed `WriteRequest`.
//!
//! Both carry native histograms as a schema, a zero bucket, and spans of buckets with
//! their counts as deltas ([`crate::native::Native::spans_and_deltas`]).

use crate::native::Native;

/// The zero bucket's threshold, 2^-128 as `client_golang` sets it: only a sample of exactly
/// 0 falls in it, and a threshold above 0 is what marks a histogram without buckets yet
/// as a native one to Prometheus.
pub const ZERO_THRESHOLD: f64 = 2.938_735_877_055_719e-39;

/// The `Content-Type` of the protobuf exposition (and what `Accept` asks for).
pub const SCRAPE_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// True when an `Accept` header asks for the delimited protobuf exposition.
pub fn wants_protobuf(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let part = part.to_ascii_lowercase();
        let mut params = part.split(';').map(str::trim);
        params.next() == Some("application/vnd.google.protobuf")
            && params
                .clone()
                .any(|p| p == "proto=io.prometheus.client.metricfamily")
            && params.any(|p| p == "encoding=delimited")
    })
}

/// The counters and gauges of a text exposition (`# HELP`, `# TYPE`, then `name{labels}
/// value` lines) as protobuf families: how the collector's own figures, written as text,
/// join the protobuf exposition. Families of other types, and lines that do not parse,
/// are left out.
pub fn text_families(text: &str) -> Vec<scrape::MetricFamily> {
    let mut out: Vec<scrape::MetricFamily> = Vec::new();
    let mut help: Option<(&str, &str)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ');
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                continue;
            };
            let t = match kind.trim() {
                "counter" => scrape::MetricType::Counter,
                "gauge" => scrape::MetricType::Gauge,
                _ => continue,
            };
            out.push(scrape::MetricFamily {
                name: Some(name.to_string()),
                help: help
                    .filter(|(n, _)| *n == name)
                    .map(|(_, h)| unescape_help(h)),
                r#type: Some(t as i32),
                metric: Vec::new(),
            });
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some(family) = out.last_mut() else {
            continue;
        };
        let Some((name, label, value)) = sample_line(line) else {
            continue;
        };
        if family.name.as_deref() != Some(name) {
            continue;
        }
        let v = Some(value);
        family.metric.push(scrape::Metric {
            label,
            counter: (family.r#type == Some(scrape::MetricType::Counter as i32))
                .then_some(scrape::Counter { value: v }),
            gauge: (family.r#type == Some(scrape::MetricType::Gauge as i32))
                .then_some(scrape::Gauge { value: v }),
            ..scrape::Metric::default()
        });
    }
    out
}

fn unescape_help(h: &str) -> String {
    h.replace("\\n", "\n").replace("\\\\", "\\")
}

/// `name{a="x",b="y"} value` (or `name value`): its parts, label values unescaped.
fn sample_line(line: &str) -> Option<(&str, Vec<scrape::LabelPair>, f64)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let mut rest = rest;
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (lname, after) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push(scrape::LabelPair {
                name: Some(lname.to_string()),
                value: Some(value),
            });
            r = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// `io.prometheus.client`: the scrape exposition.
pub mod scrape {
    /// `MetricType`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum MetricType {
        Counter = 0,
        Gauge = 1,
        Summary = 2,
        Untyped = 3,
        Histogram = 4,
        GaugeHistogram = 5,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Gauge {
        #[prost(double, optional, tag = "1")]
        pub value: Option<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Counter {
        #[prost(double, optional, tag = "1")]
        pub value: Option<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BucketSpan {
        #[prost(sint32, optional, tag = "1")]
        pub offset: Option<i32>,
        #[prost(uint32, optional, tag = "2")]
        pub length: Option<u32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Histogram {
        #[prost(uint64, optional, tag = "1")]
        pub sample_count: Option<u64>,
        #[prost(double, optional, tag = "2")]
        pub sample_sum: Option<f64>,
        #[prost(sint32, optional, tag = "5")]
        pub schema: Option<i32>,
        #[prost(double, optional, tag = "6")]
        pub zero_threshold: Option<f64>,
        #[prost(uint64, optional, tag = "7")]
        pub zero_count: Option<u64>,
        #[prost(message, repeated, tag = "12")]
        pub positive_span: Vec<BucketSpan>,
        #[prost(sint64, repeated, packed = "false", tag = "13")]
        pub positive_delta: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metric {
        #[prost(message, repeated, tag = "1")]
        pub label: Vec<LabelPair>,
        #[prost(message, optional, tag = "2")]
        pub gauge: Option<Gauge>,
        #[prost(message, optional, tag = "3")]
        pub counter: Option<Counter>,
        #[prost(message, optional, tag = "7")]
        pub histogram: Option<Histogram>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricFamily {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub help: Option<String>,
        #[prost(enumeration = "MetricType", optional, tag = "3")]
        pub r#type: Option<i32>,
        #[prost(message, repeated, tag = "4")]
        pub metric: Vec<Metric>,
    }
}

/// `prometheus`: remote write 1.0.
pub mod write {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
        #[prost(message, repeated, tag = "3")]
        pub metadata: Vec<MetricMetadata>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        /// Sorted by name, `__name__` among them.
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub histograms: Vec<Histogram>,
    }

    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
    pub struct Label {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(double, tag = "1")]
        pub value: f64,
        /// Milliseconds since 1970.
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }

    /// `Histogram.ResetHint`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ResetHint {
        Unknown = 0,
        Yes = 1,
        No = 2,
        Gauge = 3,
    }

    /// `Histogram.count` and `Histogram.zero_count` (oneofs of an integer or a float).
    #[derive(Clone, Copy, PartialEq, prost::Oneof)]
    pub enum Count {
        #[prost(uint64, tag = "1")]
        CountInt(u64),
        #[prost(double, tag = "2")]
        CountFloat(f64),
    }

    #[derive(Clone, Copy, PartialEq, prost::Oneof)]
    pub enum ZeroCount {
        #[prost(uint64, tag = "6")]
        ZeroCountInt(u64),
        #[prost(double, tag = "7")]
        ZeroCountFloat(f64),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BucketSpan {
        #[prost(sint32, tag = "1")]
        pub offset: i32,
        #[prost(uint32, tag = "2")]
        pub length: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Histogram {
        #[prost(oneof = "Count", tags = "1, 2")]
        pub count: Option<Count>,
        #[prost(double, tag = "3")]
        pub sum: f64,
        #[prost(sint32, tag = "4")]
        pub schema: i32,
        #[prost(double, tag = "5")]
        pub zero_threshold: f64,
        #[prost(oneof = "ZeroCount", tags = "6, 7")]
        pub zero_count: Option<ZeroCount>,
        #[prost(message, repeated, tag = "11")]
        pub positive_spans: Vec<BucketSpan>,
        #[prost(sint64, repeated, tag = "12")]
        pub positive_deltas: Vec<i64>,
        #[prost(enumeration = "ResetHint", tag = "14")]
        pub reset_hint: i32,
        /// Milliseconds since 1970.
        #[prost(int64, tag = "15")]
        pub timestamp: i64,
    }

    /// `MetricMetadata.MetricType`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum MetadataType {
        Unknown = 0,
        Counter = 1,
        Gauge = 2,
        Histogram = 3,
        GaugeHistogram = 4,
        Summary = 5,
        Info = 6,
        StateSet = 7,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricMetadata {
        #[prost(enumeration = "MetadataType", tag = "1")]
        pub r#type: i32,
        #[prost(string, tag = "2")]
        pub metric_family_name: String,
        #[prost(string, tag = "4")]
        pub help: String,
        #[prost(string, tag = "5")]
        pub unit: String,
    }
}

impl Native {
    /// As the scrape exposition's histogram.
    pub fn to_scrape(&self) -> scrape::Histogram {
        let (spans, deltas) = self.spans_and_deltas();
        scrape::Histogram {
            sample_count: Some(self.count),
            sample_sum: Some(self.sum),
            schema: Some(self.schema),
            zero_threshold: Some(ZERO_THRESHOLD.max(self.zero_threshold)),
            zero_count: Some(self.zero_count),
            positive_span: spans
                .into_iter()
                .map(|s| scrape::BucketSpan {
                    offset: Some(s.offset),
                    length: Some(s.length),
                })
                .collect(),
            positive_delta: deltas,
        }
    }

    /// As a remote-write histogram at `timestamp_ms`, a cumulative one (a counter's
    /// `reset_hint`: it never goes down).
    pub fn to_write(&self, timestamp_ms: i64) -> write::Histogram {
        let (spans, deltas) = self.spans_and_deltas();
        write::Histogram {
            count: Some(write::Count::CountInt(self.count)),
            sum: self.sum,
            schema: self.schema,
            zero_threshold: ZERO_THRESHOLD.max(self.zero_threshold),
            zero_count: Some(write::ZeroCount::ZeroCountInt(self.zero_count)),
            positive_spans: spans
                .into_iter()
                .map(|s| write::BucketSpan {
                    offset: s.offset,
                    length: s.length,
                })
                .collect(),
            positive_deltas: deltas,
            reset_hint: write::ResetHint::No as i32,
            timestamp: timestamp_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn accept_headers_of_prometheus_are_recognised() {
        // What Prometheus 2.42 sends with native histograms enabled.
        assert!(wants_protobuf(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.8,application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
        ));
        assert!(!wants_protobuf(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wants_protobuf(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text"
        ));
    }

    #[test]
    fn text_counters_and_gauges_become_families() {
        let text = "# HELP a_total Things \\ counted.\n# TYPE a_total counter\na_total{reason=\"busy\",x=\"q\\\"t\"} 3\na_total{reason=\"store\"} 0\n# HELP g A gauge.\n# TYPE g gauge\ng 2.5\n# TYPE h histogram\nh_count 1\n";
        let f = text_families(text);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].name.as_deref(), Some("a_total"));
        assert_eq!(f[0].help.as_deref(), Some("Things \\ counted."));
        assert_eq!(f[0].metric.len(), 2);
        assert_eq!(f[0].metric[0].label[1].value.as_deref(), Some("q\"t"));
        assert_eq!(f[0].metric[0].counter.as_ref().unwrap().value, Some(3.0));
        assert_eq!(f[1].metric[0].gauge.as_ref().unwrap().value, Some(2.5));
        assert!(f[1].metric[0].label.is_empty());
    }

    #[test]
    fn a_scrape_histogram_encodes_the_fields_prometheus_reads() {
        let n = Native {
            count: 3,
            sum: 0.5,
            zero_count: 1,
            buckets: vec![(-3, 2)],
            ..Native::default()
        };
        let bytes = n.to_scrape().encode_to_vec();
        let back = scrape::Histogram::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.schema, Some(8));
        assert_eq!(back.positive_delta, [2]);
        assert_eq!(back.positive_span[0].offset, Some(-3));
        // proto2 repeated scalars go unpacked: tag 13, varint wire type, once per delta.
        assert!(bytes.windows(2).any(|w| w == [13 << 3, 4]), "{bytes:?}");
    }
}
