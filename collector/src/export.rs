//! Merged histograms out in HdrHistogram's own formats, so other tools can read them:
//! `v2` (base64 of V2+DEFLATE, as `HistogramLogReader` and hdrhistogram.js decode it) and
//! `log` (an interval log with one interval spanning the range).

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use pathprobe_proto::hist::{self, Metric};

use crate::store::{Selector, Store};
use crate::{Error, Result};

/// The merged `metric` histogram of the paths `sel` matches over `[from_ns, to_ns)`, as
/// text in `format` (`v2` or `log`). Values are in the metric's unit (nanoseconds for
/// latency).
pub fn histogram(
    store: &dyn Store,
    sel: &Selector,
    metric: Metric,
    from_ns: u64,
    to_ns: u64,
    format: &str,
) -> Result<String> {
    let merged = store.query(sel, from_ns, to_ns)?;
    let h = merged
        .aggregate
        .histograms
        .get(&metric)
        .cloned()
        .unwrap_or_else(|| metric.new_histogram());
    let corrupt = |source| Error::Corrupt {
        what: format!("the merged {} histogram", metric.key()),
        source,
    };
    match format {
        "v2" => Ok(format!(
            "{}\n",
            BASE64.encode(hist::encode(metric, &h).map_err(corrupt)?)
        )),
        "log" => {
            let start = UNIX_EPOCH + Duration::from_nanos(from_ns);
            let mut out = Vec::new();
            let mut serializer = V2DeflateSerializer::new();
            let mut writer = IntervalLogWriterBuilder::new()
                .add_comment(&format!(
                    "pathprobe: {} of `{}`, {} windows, values in {}",
                    metric.key(),
                    sel.name_or_kind,
                    merged.aggregate.windows,
                    metric.config().unit
                ))
                .with_start_time(start)
                .with_base_time(start)
                .begin_log_with(&mut out, &mut serializer)
                .map_err(|e| Error::Config(format!("cannot write the log: {e}")))?;
            writer
                .write_histogram(
                    &h,
                    Duration::ZERO,
                    Duration::from_nanos(to_ns.saturating_sub(from_ns)),
                    Tag::new(metric.key()),
                )
                .map_err(|e| Error::Config(format!("cannot write the log: {e:?}")))?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        other => Err(Error::Config(format!(
            "unknown histogram format `{other}`: use v2 or log"
        ))),
    }
}
