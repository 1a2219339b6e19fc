//! One histogram configuration per metric, and the HdrHistogram V2 (+DEFLATE) codec.
//!
//! Every agent and the collector build a metric's histograms from [`Metric::config`], so any
//! two merge exactly by bucket-wise addition. Decoding refuses a histogram of any other
//! configuration, and checks a blob completely (cookie, header, varints, bucket indices,
//! total count) before the `hdrhistogram` crate reads it: that crate trusts the header's
//! payload length (allocating up to 4 GiB) and negates zig-zag values without a check.

use std::borrow::Cow;
use std::io::Read;
use std::sync::OnceLock;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A V2 uncompressed histogram, as every HdrHistogram implementation writes it: the base
/// cookie 0x1c849303 with the word-size bits 0x10 set. Readers mask those bits (`& !0xf0`),
/// so both forms are accepted.
pub const V2_COOKIE: u32 = 0x1c84_9313;
/// A V2 histogram compressed with zlib (DEFLATE): base 0x1c849304 with 0x10 set.
pub const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9314;

/// A cookie without its word-size bits.
const fn cookie_base(cookie: u32) -> u32 {
    cookie & !0xf0
}
/// Length of the V2 header: cookie, payload length, normalizing index offset, significant
/// digits, lowest discernible value, highest trackable value, integer-to-double ratio.
pub const V2_HEADER_LEN: usize = 40;
/// The longest LEB128 varint HdrHistogram writes (the ninth octet carries eight bits).
const MAX_VARINT_LEN: usize = 9;

/// What a histogram measures. Its serde name carries the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Metric {
    /// Round-trip time, from the monotonic clock, in nanoseconds.
    #[serde(rename = "rtt_ns")]
    Rtt,
    /// Round-trip time measured from the scheduled send time rather than the actual one, so
    /// that a sender stall shows as latency (coordinated omission), ns.
    #[serde(rename = "rtt_sched_ns")]
    RttScheduled,
    /// Magnitude of IP packet delay variation between consecutive packets (RFC 3393), ns.
    #[serde(rename = "ipdv_ns")]
    Ipdv,
    /// Forward (sender to reflector) one-way delay, ns; only with a clock state.
    #[serde(rename = "owd_fwd_ns")]
    OwdForward,
    /// Reverse (reflector to sender) one-way delay, ns; only with a clock state.
    #[serde(rename = "owd_rev_ns")]
    OwdReverse,
    /// Lengths of runs of consecutive lost packets, in packets.
    #[serde(rename = "loss_run_packets")]
    LossRun,
    /// Throughput samples, in bits per second.
    #[serde(rename = "throughput_bps")]
    Throughput,
}

/// Bounds and precision of a metric's histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramConfig {
    /// Lowest discernible value.
    pub lowest: u64,
    /// Highest trackable value; larger samples are recorded at this value (saturating).
    pub highest: u64,
    /// Significant decimal digits: 3 keeps every value within 0.1%.
    pub sigfig: u8,
    /// Unit of the recorded values.
    pub unit: &'static str,
}

/// Latency bounds: 1 ns to 100 s. 100 s is above any RTT a sender waits for (an Azure VM
/// paused for maintenance stalls up to 30 s) and costs 27 bucket halves (about 220 KiB).
const LATENCY: HistogramConfig = HistogramConfig {
    lowest: 1,
    highest: 100_000_000_000,
    sigfig: 3,
    unit: "ns",
};

impl Metric {
    /// Every metric, in a fixed order.
    pub const ALL: [Self; 7] = [
        Self::Rtt,
        Self::RttScheduled,
        Self::Ipdv,
        Self::OwdForward,
        Self::OwdReverse,
        Self::LossRun,
        Self::Throughput,
    ];

    /// The name used as the JSON key (and in messages).
    pub const fn key(self) -> &'static str {
        match self {
            Self::Rtt => "rtt_ns",
            Self::RttScheduled => "rtt_sched_ns",
            Self::Ipdv => "ipdv_ns",
            Self::OwdForward => "owd_fwd_ns",
            Self::OwdReverse => "owd_rev_ns",
            Self::LossRun => "loss_run_packets",
            Self::Throughput => "throughput_bps",
        }
    }

    /// The metric whose [`Self::key`] is `key`.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.key() == key)
    }

    /// The one configuration of this metric's histograms.
    pub const fn config(self) -> HistogramConfig {
        match self {
            Self::Rtt | Self::RttScheduled | Self::Ipdv | Self::OwdForward | Self::OwdReverse => {
                LATENCY
            }
            // Ten million lost packets in a row: almost three hours at 1,000 probes/s.
            Self::LossRun => HistogramConfig {
                lowest: 1,
                highest: 10_000_000,
                sigfig: 3,
                unit: "packets",
            },
            // Up to 1 Tbit/s, far above the largest ExpressRoute Direct port (100 Gbit/s).
            Self::Throughput => HistogramConfig {
                lowest: 1,
                highest: 1_000_000_000_000,
                sigfig: 3,
                unit: "bit/s",
            },
        }
    }

    /// An empty histogram of this metric's configuration. Recording into it never
    /// allocates (auto-resize stays off).
    pub fn new_histogram(self) -> Histogram<u64> {
        let c = self.config();
        match Histogram::new_with_bounds(c.lowest, c.highest, c.sigfig) {
            Ok(h) => h,
            // The configurations above are constants that the tests construct.
            Err(e) => unreachable!("metric {} has an invalid configuration: {e:?}", self.key()),
        }
    }

    /// Number of buckets (counts) in this metric's histograms.
    fn counts_len(self) -> usize {
        static LENS: OnceLock<[usize; Metric::ALL.len()]> = OnceLock::new();
        let lens = LENS.get_or_init(|| Metric::ALL.map(|m| m.new_histogram().distinct_values()));
        lens[self as usize]
    }

    /// Longest uncompressed V2 encoding a histogram of this metric can have.
    fn max_v2_len(self) -> usize {
        V2_HEADER_LEN + self.counts_len() * MAX_VARINT_LEN
    }

    /// Checks that `h` has this metric's configuration.
    pub fn check(self, h: &Histogram<u64>) -> Result<()> {
        let c = self.config();
        if h.low() != c.lowest || h.high() != c.highest || h.sigfig() != c.sigfig {
            return Err(self.error(format!(
                "configured as {}..={} with {} digits, expected {}..={} {} with {} digits",
                h.low(),
                h.high(),
                h.sigfig(),
                c.lowest,
                c.highest,
                c.unit,
                c.sigfig
            )));
        }
        Ok(())
    }

    fn error(self, reason: impl Into<String>) -> Error {
        Error::Histogram {
            metric: self.key(),
            reason: reason.into(),
        }
    }
}

/// V2 forms up to this many octets are sent as they are; longer ones are deflated.
///
/// Deflate's own framing (zlib header and checksum, a block with its Huffman tables)
/// leaves little to gain on a short form, and each deflate costs 10 to 15 µs however few
/// the octets (the compressor's tables are reset every time). Measured here on RTT
/// histograms (V2, then deflated): 10 samples 67 and 86 octets, 100 samples 233 and 187
/// or 260 and 223, 300 samples 591 and 386, 1,000 samples 1,478 and 744. So up to 512
/// octets deflate saves at most about 20% (50 octets), while deflating every form cost
/// the agent about 1.7% of a core at a thousand paths' windows; past it, it saves a third
/// to a half and is kept.
pub const DEFLATE_ABOVE: usize = 512;

/// Encodes `h` as HdrHistogram V2, readable by every HdrHistogram implementation: the
/// plain form (cookie 0x1c849313) up to [`DEFLATE_ABOVE`] octets, compressed
/// (V2+DEFLATE, cookie 0x1c849314, exactly as `V2DeflateSerializer` writes it) above.
pub fn encode(metric: Metric, h: &Histogram<u64>) -> Result<Vec<u8>> {
    metric.check(h)?;
    let mut v2 = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut v2)
        .map_err(|e| metric.error(format!("cannot serialize: {e:?}")))?;
    finish_v2(metric, v2)
}

/// The V2 form as it travels: as it is when short, deflated when not.
fn finish_v2(metric: Metric, v2: Vec<u8>) -> Result<Vec<u8>> {
    if v2.len() <= DEFLATE_ABOVE {
        Ok(v2)
    } else {
        compress_v2(metric, &v2)
    }
}

/// Decodes a V2 histogram, compressed or not, of `metric`'s configuration.
pub fn decode(metric: Metric, bytes: &[u8]) -> Result<Histogram<u64>> {
    let mut v2 = v2_bytes(metric, bytes)?;
    validate_v2(metric, &v2)?;
    // The crate reads only the cookie with the word-size bits set.
    if be_u32(&v2, 0) != Some(V2_COOKIE) {
        v2.to_mut()[..4].copy_from_slice(&V2_COOKIE.to_be_bytes());
    }
    Deserializer::new()
        .deserialize(&mut &v2[..])
        .map_err(|e| metric.error(format!("cannot deserialize: {e:?}")))
}

/// The uncompressed V2 form of a V2 or V2+DEFLATE blob (inflated with a bound).
fn v2_bytes(metric: Metric, bytes: &[u8]) -> Result<Cow<'_, [u8]>> {
    let cookie = be_u32(bytes, 0).ok_or_else(|| metric.error("shorter than a 4-octet cookie"))?;
    let v2: Cow<'_, [u8]> = match cookie_base(cookie) {
        base if base == cookie_base(V2_COOKIE) => Cow::Borrowed(bytes),
        base if base == cookie_base(V2_COMPRESSED_COOKIE) => {
            let len =
                be_u32(bytes, 4).ok_or_else(|| metric.error("compressed header is cut short"))?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let body = &bytes[8..];
            if body.len() != len {
                return Err(metric.error(format!(
                    "compressed length field says {len} octets but {} follow",
                    body.len()
                )));
            }
            Cow::Owned(inflate_bounded(metric, body)?)
        }
        other => {
            return Err(metric.error(format!(
                "cookie {other:#010x} is not HdrHistogram V2 ({V2_COOKIE:#010x}) or V2+DEFLATE ({V2_COMPRESSED_COOKIE:#010x})"
            )));
        }
    };
    Ok(v2)
}

/// Checks a V2 blob (compressed or not) of `metric` completely, without building a
/// histogram, and returns its total count.
pub fn count(metric: Metric, bytes: &[u8]) -> Result<u64> {
    let v2 = v2_bytes(metric, bytes)?;
    scan_v2(metric, &v2, &mut |_, _| {})
}

/// Checks a V2 blob of `metric` completely, then calls `each(value, count)` for every
/// non-empty bucket (`value` is the bucket's lowest value), without building a histogram.
/// On error `each` is never called.
pub fn for_each_bucket(
    metric: Metric,
    bytes: &[u8],
    each: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let v2 = v2_bytes(metric, bytes)?;
    scan_v2(metric, &v2, &mut |_, _| {})?;
    let c = metric.config();
    scan_v2(metric, &v2, &mut |index, count| {
        each(value_at_index(c, index), count);
    })
}

/// As [`for_each_bucket`], with each bucket's lowest and highest value:
/// `each(lowest, highest, count)`.
pub fn for_each_range(
    metric: Metric,
    bytes: &[u8],
    each: &mut dyn FnMut(u64, u64, u64),
) -> Result<u64> {
    let v2 = v2_bytes(metric, bytes)?;
    scan_v2(metric, &v2, &mut |_, _| {})?;
    let c = metric.config();
    scan_v2(metric, &v2, &mut |index, count| {
        let lowest = value_at_index(c, index);
        each(lowest, lowest + bucket_width(c, index) - 1, count);
    })
}

/// Adds `from` into `into`, exactly. Both must have `metric`'s configuration, and the total
/// count must fit in 64 bits.
pub fn merge(metric: Metric, into: &mut Histogram<u64>, from: &Histogram<u64>) -> Result<()> {
    metric.check(into)?;
    metric.check(from)?;
    if into.len().checked_add(from.len()).is_none() {
        return Err(Error::Merge {
            what: metric.key(),
            reason: "the total count would exceed 2^64".to_string(),
        });
    }
    into.add(from).map_err(|e| Error::Merge {
        what: metric.key(),
        reason: format!("{e:?}"),
    })
}

/// Percentiles of a histogram, in its unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Summary {
    /// The summary of `h`; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        })
    }
}

/// Percentiles of a latency histogram in microseconds, for people and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Micros {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// These nanosecond percentiles in microseconds.
    #[allow(clippy::cast_precision_loss)] // display: microseconds of at most 100 s
    pub fn micros(&self) -> Micros {
        let us = |ns: u64| ns as f64 / 1_000.0;
        Micros {
            min: us(self.min),
            p50: us(self.p50),
            p90: us(self.p90),
            p99: us(self.p99),
            p999: us(self.p999),
            max: us(self.max),
            mean: self.mean / 1_000.0,
        }
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// Inflates a zlib stream, refusing one that grows past the longest valid V2 encoding.
fn inflate_bounded(metric: Metric, body: &[u8]) -> Result<Vec<u8>> {
    let limit = metric.max_v2_len();
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| metric.error(format!("zlib stream is corrupt: {e}")))?;
    if out.len() > limit {
        return Err(metric.error(format!(
            "inflates past {limit} octets, the most a valid histogram needs"
        )));
    }
    Ok(out)
}

/// Reads one HdrHistogram varint: LEB128, with the ninth octet carrying 8 bits.
fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in b.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 {
            return Some((value | (u64::from(byte) << 56), MAX_VARINT_LEN));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Checks an uncompressed V2 blob completely against `metric`'s configuration.
fn validate_v2(metric: Metric, v2: &[u8]) -> Result<()> {
    scan_v2(metric, v2, &mut |_, _| {}).map(|_| ())
}

/// Walks a V2 blob, checking everything, calling `each(index, count)` for every non-zero
/// bucket as it goes; returns the total count. Callers that must not act on a bad blob
/// validate it first.
fn scan_v2(metric: Metric, v2: &[u8], each: &mut dyn FnMut(usize, u64)) -> Result<u64> {
    if v2.len() < V2_HEADER_LEN {
        return Err(metric.error(format!(
            "V2 header is cut short: {} of {V2_HEADER_LEN} octets",
            v2.len()
        )));
    }
    let header = |at| be_u32(v2, at).ok_or_else(|| metric.error("V2 header is cut short"));
    if cookie_base(header(0)?) != cookie_base(V2_COOKIE) {
        return Err(metric.error("inner cookie is not V2"));
    }
    let payload_len = usize::try_from(header(4)?).unwrap_or(usize::MAX);
    if v2.len() - V2_HEADER_LEN != payload_len {
        return Err(metric.error(format!(
            "header says {payload_len} octets of counts but {} follow",
            v2.len().saturating_sub(V2_HEADER_LEN)
        )));
    }
    if header(8)? != 0 {
        return Err(metric.error("normalizing index offset is not supported"));
    }
    let c = metric.config();
    let (digits, low, high) = (
        header(12)?,
        be_u64(v2, 16).unwrap_or_default(),
        be_u64(v2, 24).unwrap_or_default(),
    );
    if digits != u32::from(c.sigfig) || low != c.lowest || high != c.highest {
        return Err(metric.error(format!(
            "configured as {low}..={high} with {digits} digits, expected {}..={} {} with {} digits: it cannot be merged exactly",
            c.lowest, c.highest, c.unit, c.sigfig
        )));
    }
    if be_u64(v2, 32) != Some(1.0f64.to_bits()) {
        return Err(metric.error("integer-to-double ratio is not 1 (a DoubleHistogram?)"));
    }
    let counts_len = metric.counts_len();
    let mut payload = &v2[V2_HEADER_LEN..];
    let (mut index, mut total) = (0usize, 0u64);
    while !payload.is_empty() {
        let (zz, used) =
            read_varint(payload).ok_or_else(|| metric.error("counts end inside a varint"))?;
        payload = &payload[used..];
        #[allow(clippy::cast_possible_wrap)] // zig-zag decoding reinterprets the bits
        let value = ((zz >> 1) as i64) ^ -((zz & 1) as i64);
        if value < 0 {
            let run = usize::try_from(value.unsigned_abs()).unwrap_or(usize::MAX);
            index = index.saturating_add(run);
            if index > counts_len {
                return Err(metric.error("a run of empty buckets goes past the last bucket"));
            }
        } else {
            if index >= counts_len {
                return Err(metric.error("more counts than the configuration has buckets"));
            }
            let count = value.unsigned_abs();
            total = total
                .checked_add(count)
                .ok_or_else(|| metric.error("total count exceeds 2^64"))?;
            if count > 0 {
                each(index, count);
            }
            index += 1;
        }
    }
    Ok(total)
}

/// The lowest value of bucket `index` in HdrHistogram's layout for `c`: indices below the
/// sub-bucket count are single values; above, each half-bucket doubles the value step.
fn value_at_index(c: HistogramConfig, index: usize) -> u64 {
    // sub_bucket_count = 2^ceil(log2(2 * 10^sigfig)); unit = 2^floor(log2(lowest)).
    let sub_bucket_count_magnitude = (2 * 10u64.pow(u32::from(c.sigfig)))
        .next_power_of_two()
        .trailing_zeros();
    let half_magnitude = sub_bucket_count_magnitude - 1;
    let half = 1usize << half_magnitude;
    let unit_magnitude = c.lowest.ilog2();
    let bucket = (index >> half_magnitude).saturating_sub(1);
    let sub = if index >> half_magnitude == 0 {
        index & (half - 1)
    } else {
        (index & (half - 1)) + half
    };
    let shift = u32::try_from(bucket).unwrap_or(63) + unit_magnitude;
    (sub as u64) << shift
}

/// The bucket `value` falls in, in HdrHistogram's layout for `c` (the crate's
/// `index_for`, which it keeps private): the inverse of [`value_at_index`].
fn index_of(c: HistogramConfig, value: u64) -> usize {
    let sub_bucket_count_magnitude = (2 * 10u64.pow(u32::from(c.sigfig)))
        .next_power_of_two()
        .trailing_zeros();
    let half_magnitude = sub_bucket_count_magnitude - 1;
    let unit_magnitude = c.lowest.ilog2();
    let sub_bucket_mask = ((1u64 << sub_bucket_count_magnitude) - 1) << unit_magnitude;
    let leading_zero_count_base = 64 - unit_magnitude - half_magnitude - 1;
    let bucket = leading_zero_count_base - (value | sub_bucket_mask).leading_zeros();
    let sub = value >> (bucket + unit_magnitude);
    let half = 1u64 << half_magnitude;
    let index = (u64::from(bucket + 1) << half_magnitude) + sub - half;
    usize::try_from(index).unwrap_or(usize::MAX)
}

/// Entries a [`Compact`] keeps as a list (16 octets each): 5 KiB against about 220 KiB
/// for a latency histogram.
const COMPACT_MAX_ENTRIES: usize = 320;
/// When the list is full it is sorted and its repeats merged; if more distinct buckets
/// than this remain, it switches to the full bucket array (so a sort buys at least 64
/// appends).
const COMPACT_MAX_DISTINCT: usize = 256;

/// A histogram of one metric's configuration that costs what it holds: a list of its
/// non-empty buckets while they are few (a window of a low-rate path: kilobytes), the full
/// HdrHistogram bucket array once they are many (a high-rate path). Either way the
/// buckets are HdrHistogram's, so [`Compact::into_histogram`] is exactly the histogram the
/// same values recorded into [`Metric::new_histogram`] would make, and it encodes and
/// merges as one. Values above the configuration's highest are recorded at the highest.
///
/// Recording appends to the list (or adds to its last entry), which costs no search and
/// no shifting; the list is sorted and merged only when it fills and when it is read.
#[derive(Debug, Clone)]
pub struct Compact {
    metric: Metric,
    /// (bucket index, count): the first `sorted` entries sorted by index, each index once;
    /// the rest appended since, in any order, repeats allowed. Empty once `dense` is set.
    sparse: Vec<(u32, u64)>,
    sorted: usize,
    dense: Option<Box<Histogram<u64>>>,
    len: u64,
    /// The exact sum of the values recorded (each at most the configuration's highest).
    sum: u128,
}

/// Equal when they hold the same counts, however their lists were appended to.
impl PartialEq for Compact {
    fn eq(&self, other: &Self) -> bool {
        self.metric == other.metric
            && self.len == other.len
            && self.dense == other.dense
            && self.buckets() == other.buckets()
    }
}

/// `list` sorted by bucket, each bucket once with its counts added.
fn merge_buckets(list: &mut Vec<(u32, u64)>) {
    list.sort_unstable_by_key(|e| e.0);
    list.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.saturating_add(later.1);
        }
        same
    });
}

impl Compact {
    /// An empty histogram of `metric`: no allocation until it records.
    pub const fn new(metric: Metric) -> Self {
        Self {
            metric,
            sparse: Vec::new(),
            sorted: 0,
            dense: None,
            len: 0,
            sum: 0,
        }
    }

    /// The metric it belongs to.
    pub const fn metric(&self) -> Metric {
        self.metric
    }

    /// Values recorded.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was recorded.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The exact sum of the values recorded, where the buckets hold each only to 0.1%.
    pub const fn sum(&self) -> u128 {
        self.sum
    }

    /// Octets of bucket storage it holds.
    pub fn footprint(&self) -> usize {
        self.dense
            .as_ref()
            .map_or(self.sparse.capacity() * size_of::<(u32, u64)>(), |h| {
                h.distinct_values() * size_of::<u64>()
            })
    }

    /// Records `value` once (at the configuration's highest if it is above).
    pub fn record(&mut self, value: u64) {
        let c = self.metric.config();
        let value = value.min(c.highest);
        self.len = self.len.saturating_add(1);
        self.sum = self.sum.saturating_add(u128::from(value));
        if let Some(h) = self.dense.as_mut() {
            h.saturating_record(value);
            return;
        }
        let index = u32::try_from(index_of(c, value)).unwrap_or(u32::MAX);
        if let Some(last) = self.sparse.last_mut()
            && last.0 == index
        {
            last.1 = last.1.saturating_add(1);
            return;
        }
        if self.sparse.len() == COMPACT_MAX_ENTRIES {
            self.settle();
            if self.sparse.len() > COMPACT_MAX_DISTINCT {
                let mut h = self.build();
                h.saturating_record(value);
                self.sparse = Vec::new();
                self.sorted = 0;
                self.dense = Some(Box::new(h));
                return;
            }
        }
        // Grown by hand: doubling would overshoot the most it ever holds.
        let cap = self.sparse.capacity();
        if self.sparse.len() == cap {
            let room = COMPACT_MAX_ENTRIES.saturating_sub(cap).max(1);
            self.sparse.reserve_exact(cap.max(16).min(room));
        }
        self.sparse.push((index, 1));
    }

    /// Sorts the list and merges its repeats.
    pub fn settle(&mut self) {
        if self.sorted < self.sparse.len() {
            merge_buckets(&mut self.sparse);
            self.sorted = self.sparse.len();
        }
    }

    /// The non-empty buckets, sorted, each once (a sorted copy if appends are pending).
    fn buckets(&self) -> Cow<'_, [(u32, u64)]> {
        if self.sorted == self.sparse.len() {
            Cow::Borrowed(&self.sparse)
        } else {
            let mut list = self.sparse.clone();
            merge_buckets(&mut list);
            Cow::Owned(list)
        }
    }

    fn build(&self) -> Histogram<u64> {
        let c = self.metric.config();
        let mut h = self.metric.new_histogram();
        for &(index, count) in &self.sparse {
            // The bucket's lowest value lands in the same bucket: exact.
            let _ = h.record_n(value_at_index(c, index as usize), count);
        }
        h
    }

    /// Its percentiles: exactly [`Summary::of`] the histogram [`Compact::into_histogram`]
    /// makes, without building it (HdrHistogram's rules, bucket by bucket: a quantile is
    /// the highest value of the first bucket whose running count reaches
    /// `ceil(q · count)`, at least 1; the mean weighs each bucket's middle value).
    pub fn summary(&self) -> Option<Summary> {
        if let Some(h) = self.dense.as_deref() {
            return Summary::of(h);
        }
        let buckets = self.buckets();
        let (&(first, _), &(last, _)) = (buckets.first()?, buckets.last()?);
        let c = self.metric.config();
        let total: u64 = buckets.iter().map(|e| e.1).sum();
        // The bucket's highest value: its lowest plus its width, less one.
        let highest = |i: u32| value_at_index(c, i as usize) + bucket_width(c, i as usize) - 1;
        let quantile = |q: f64| -> u64 {
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let target = ((q * total as f64).ceil() as u64).max(1);
            let mut running = 0u64;
            for &(i, n) in buckets.iter() {
                running += n;
                if running >= target {
                    return highest(i);
                }
            }
            0
        };
        #[allow(clippy::cast_precision_loss)] // as HdrHistogram computes it, in f64
        let mean = buckets.iter().fold(0.0f64, |acc, &(i, n)| {
            let middle = value_at_index(c, i as usize) + (bucket_width(c, i as usize) >> 1);
            acc + middle as f64 * n as f64 / total as f64
        });
        Some(Summary {
            count: total,
            min: value_at_index(c, first as usize),
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            p999: quantile(0.999),
            max: if value_at_index(c, last as usize) == 0 {
                0
            } else {
                highest(last)
            },
            mean,
        })
    }

    /// Encodes it as V2 (deflated above [`DEFLATE_ABOVE`] octets): exactly the octets
    /// [`encode`] writes for the histogram [`Compact::into_histogram`] makes, without
    /// building it (a run of empty buckets is one negative zig-zag varint, as HdrHistogram
    /// writes it).
    pub fn encode(&self) -> Result<Vec<u8>> {
        if let Some(h) = self.dense.as_deref() {
            return encode(self.metric, h);
        }
        let c = self.metric.config();
        let buckets = self.buckets();
        let mut v2 = Vec::with_capacity(V2_HEADER_LEN + buckets.len() * 12 + 1);
        v2.extend_from_slice(&V2_COOKIE.to_be_bytes());
        v2.extend_from_slice(&[0; 4]); // the payload's length, below
        v2.extend_from_slice(&0u32.to_be_bytes()); // normalizing index offset
        v2.extend_from_slice(&u32::from(c.sigfig).to_be_bytes());
        v2.extend_from_slice(&c.lowest.to_be_bytes());
        v2.extend_from_slice(&c.highest.to_be_bytes());
        v2.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        // Buckets 0 to the last non-empty one (bucket 0 alone when it is empty).
        let mut next = 0u32;
        for &(i, n) in buckets.iter() {
            write_zeros(&mut v2, i - next);
            write_varint(
                &mut v2,
                zig_zag(
                    i64::try_from(n)
                        .map_err(|_| self.metric.error("a count above 2^63 cannot be encoded"))?,
                ),
            );
            next = i + 1;
        }
        if buckets.is_empty() {
            write_varint(&mut v2, 0);
        }
        let payload = u32::try_from(v2.len() - V2_HEADER_LEN)
            .map_err(|_| self.metric.error("too long to encode"))?;
        v2[4..8].copy_from_slice(&payload.to_be_bytes());
        finish_v2(self.metric, v2)
    }

    /// The same values as a histogram of [`Metric::new_histogram`]'s configuration.
    pub fn into_histogram(self) -> Histogram<u64> {
        match self.dense {
            Some(h) => *h,
            None => self.build(),
        }
    }
}

/// The width of bucket `index` in HdrHistogram's layout for `c`: how many values share it.
fn bucket_width(c: HistogramConfig, index: usize) -> u64 {
    let sub_bucket_count_magnitude = (2 * 10u64.pow(u32::from(c.sigfig)))
        .next_power_of_two()
        .trailing_zeros();
    let bucket = (index >> (sub_bucket_count_magnitude - 1)).saturating_sub(1);
    1u64 << (u32::try_from(bucket).unwrap_or(63) + c.lowest.ilog2())
}

/// HdrHistogram's zig-zag mapping of a signed count (a negative one is a run of zeros).
#[allow(clippy::cast_sign_loss)] // the mapping reinterprets the bits
const fn zig_zag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

/// HdrHistogram's varint: LEB128, the ninth octet carrying the last 8 bits whole.
#[allow(clippy::cast_possible_truncation)] // each octet takes the low bits
fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    for _ in 0..MAX_VARINT_LEN - 1 {
        if v < 0x80 {
            out.push(v as u8);
            return;
        }
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `run` empty buckets as HdrHistogram writes them: one as a zero count, more as a
/// negative run length.
fn write_zeros(out: &mut Vec<u8>, run: u32) {
    match run {
        0 => {}
        1 => write_varint(out, 0),
        n => write_varint(out, zig_zag(-i64::from(n))),
    }
}

/// The compressed V2 form of uncompressed V2 octets, as HdrHistogram's
/// `V2DeflateSerializer` writes it: its cookie, the zlib stream's length, the stream.
/// Each thread keeps one compressor and resets it: a fresh one zeroes some 300 KiB of
/// tables, which for a histogram of a few buckets costs more than compressing it.
fn compress_v2(metric: Metric, v2: &[u8]) -> Result<Vec<u8>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    thread_local! {
        static ZLIB: std::cell::RefCell<Option<Compress>> = const { std::cell::RefCell::new(None) };
    }
    let mut out = Vec::with_capacity(8 + v2.len() + 64);
    out.extend_from_slice(&V2_COMPRESSED_COOKIE.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    ZLIB.with(|cell| {
        let mut slot = cell.borrow_mut();
        let z = slot.get_or_insert_with(|| Compress::new(Compression::default(), true));
        z.reset();
        loop {
            let done = usize::try_from(z.total_in())
                .unwrap_or(usize::MAX)
                .min(v2.len());
            match z.compress_vec(&v2[done..], &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => return Ok(()),
                Ok(_) => out.reserve(out.capacity().max(64)),
                Err(e) => return Err(metric.error(format!("cannot compress: {e}"))),
            }
        }
    })?;
    let len = u32::try_from(out.len() - 8).map_err(|_| metric.error("too long to encode"))?;
    out[4..8].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Decodes a V2 histogram (compressed or not) of `metric` and adds it into `into`, exactly,
/// without building a second histogram: the same result as [`decode`] then [`merge`], for
/// a fraction of the memory traffic. On any error `into` is unchanged.
pub fn decode_into(metric: Metric, bytes: &[u8], into: &mut Histogram<u64>) -> Result<()> {
    metric.check(into)?;
    let v2 = v2_bytes(metric, bytes)?;
    let c = metric.config();
    let total = scan_v2(metric, &v2, &mut |_, _| {})?;
    if into.len().checked_add(total).is_none() {
        return Err(Error::Merge {
            what: metric.key(),
            reason: "the total count would exceed 2^64".to_string(),
        });
    }
    // Valid (checked above) and fits: every bucket index is in range and no count can
    // overflow, so recording cannot fail part-way.
    scan_v2(metric, &v2, &mut |index, count| {
        into.saturating_record_n(value_at_index(c, index), count);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn recorded(metric: Metric, values: &[u64]) -> Histogram<u64> {
        let mut h = metric.new_histogram();
        for &v in values {
            h.saturating_record(v);
        }
        h
    }

    #[test]
    fn keys_name_metrics_both_ways() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_key(m.key()), Some(m));
        }
        assert_eq!(Metric::from_key("rtt_ms"), None);
    }

    #[test]
    fn every_metric_config_builds_and_stays_small() {
        for m in Metric::ALL {
            let h = m.new_histogram();
            assert!(!h.is_auto_resize());
            // Bounded memory per histogram: under 256 KiB of u64 counts.
            assert!(h.distinct_values() * 8 < 256 * 1024, "{}", m.key());
        }
    }

    #[test]
    fn short_forms_travel_plain_and_long_ones_deflated_and_both_round_trip() {
        let h = recorded(
            Metric::Rtt,
            &[1, 2, 3, 1_000, 25_000, 25_001, 99_000_000_000],
        );
        let bytes = encode(Metric::Rtt, &h).unwrap();
        assert!(bytes.len() <= DEFLATE_ABOVE, "{} octets", bytes.len());
        assert_eq!(bytes[..4], [0x1c, 0x84, 0x93, 0x13], "plain V2");
        let back = decode(Metric::Rtt, &bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.len(), 7);
        // A thousand spread values: a long V2 form, deflated, and smaller for it.
        let values: Vec<u64> = (0..1_000u64).map(|i| 20_000 + i * 4_999).collect();
        let long = recorded(Metric::Rtt, &values);
        let bytes = encode(Metric::Rtt, &long).unwrap();
        let mut plain = Vec::new();
        V2Serializer::new().serialize(&long, &mut plain).unwrap();
        assert!(plain.len() > DEFLATE_ABOVE && bytes.len() < plain.len());
        assert_eq!(bytes[..4], [0x1c, 0x84, 0x93, 0x14], "V2+DEFLATE");
        assert_eq!(decode(Metric::Rtt, &bytes).unwrap(), long);
    }

    #[test]
    fn ranges_are_the_buckets_equivalence_ranges() {
        for m in [Metric::Rtt, Metric::Ipdv, Metric::LossRun] {
            let h = recorded(m, &[0, 1, 999, 1_000, 2_047, 2_048, 5_000_000, 77_777_777]);
            let blob = encode(m, &h).unwrap();
            let mut seen = 0;
            for_each_range(m, &blob, &mut |lo, hi, n| {
                assert_eq!(
                    (lo, hi),
                    (h.lowest_equivalent(lo), h.highest_equivalent(lo)),
                    "{m:?}"
                );
                assert_eq!(n, h.count_at(lo));
                seen += n;
            })
            .unwrap();
            assert_eq!(seen, h.len());
        }
    }

    #[test]
    fn uncompressed_v2_is_accepted() {
        let h = recorded(Metric::LossRun, &[1, 1, 2, 40]);
        let mut v2 = Vec::new();
        V2Serializer::new().serialize(&h, &mut v2).unwrap();
        assert_eq!(v2[..4], [0x1c, 0x84, 0x93, 0x13]);
        assert_eq!(decode(Metric::LossRun, &v2).unwrap(), h);
        // The base cookie without word-size bits is read too.
        v2[3] = 0x03;
        assert_eq!(decode(Metric::LossRun, &v2).unwrap(), h);
    }

    #[test]
    fn another_configuration_is_refused() {
        let mut other = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        other.record(5).unwrap();
        let mut bytes = Vec::new();
        hdrhistogram::serialization::V2DeflateSerializer::new()
            .serialize(&other, &mut bytes)
            .unwrap();
        let err = decode(Metric::Rtt, &bytes).unwrap_err();
        assert!(
            err.to_string().contains("cannot be merged exactly"),
            "{err}"
        );
        assert!(encode(Metric::Rtt, &other).is_err());
    }

    #[test]
    fn a_histogram_of_one_metric_is_not_another() {
        let bytes = encode(Metric::LossRun, &recorded(Metric::LossRun, &[3])).unwrap();
        assert!(decode(Metric::Rtt, &bytes).is_err());
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for (bytes, needle) in [
            (&b""[..], "cookie"),
            (&b"\x1c\x84\x93\x14"[..], "cut short"),
            (&b"\x1c\x84\x93\x14\x00\x00\x00\x05abc"[..], "5 octets"),
            (&b"\x1c\x84\x93\x14\x00\x00\x00\x03abc"[..], "zlib"),
            (&b"\x12\x34\x56\x78"[..], "not HdrHistogram"),
            (&b"\x1c\x84\x93\x13\x00\x00\x00\x00"[..], "cut short"),
        ] {
            let err = decode(Metric::Rtt, bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{bytes:?}: {err}");
        }
    }

    fn v2_with_payload(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&V2_COOKIE.to_be_bytes());
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&100_000_000_000u64.to_be_bytes());
        v.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn hostile_varints_are_refused_not_panicked_on() {
        // Zig-zag of u64::MAX is i64::MIN: the crate would negate it.
        let min = [0xff; 9];
        assert!(decode(Metric::Rtt, &v2_with_payload(&min)).is_err());
        // A zero run far past the last bucket.
        let run = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode(Metric::Rtt, &v2_with_payload(&run)).is_err());
        // Counts near 2^62: four fit in 64 bits, five overflow the total.
        let big = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode(Metric::Rtt, &v2_with_payload(&[big; 5].concat())).is_err());
        assert!(decode(Metric::Rtt, &v2_with_payload(&[big; 4].concat())).is_ok());
        // A varint cut short.
        assert!(decode(Metric::Rtt, &v2_with_payload(&[0x80])).is_err());
        // A header whose payload length is larger than what follows.
        let mut lying = v2_with_payload(&[2]);
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(Metric::Rtt, &lying).is_err());
        // A valid one built the same way decodes: one count of 1 in bucket 0 (value 0).
        let ok = decode(Metric::Rtt, &v2_with_payload(&[2])).unwrap();
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn zip_bomb_is_cut_off() {
        let zeros = vec![0u8; Metric::Rtt.max_v2_len() * 4];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, &zeros).unwrap();
        let body = z.finish().unwrap();
        let mut bytes = V2_COMPRESSED_COOKIE.to_be_bytes().to_vec();
        bytes.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(&body);
        let err = decode(Metric::Rtt, &bytes).unwrap_err().to_string();
        assert!(err.contains("inflates past"), "{err}");
    }

    #[test]
    fn summary_of_known_values() {
        let h = recorded(Metric::Rtt, &(1..=1000).collect::<Vec<_>>());
        let s = Summary::of(&h).unwrap();
        assert_eq!(
            (s.count, s.min, s.p50, s.p90, s.max),
            (1000, 1, 500, 900, 1000)
        );
        assert_eq!(s.p99, 990);
        assert_eq!(s.p999, 999);
        assert!(Summary::of(&Metric::Rtt.new_histogram()).is_none());
        let us = s.micros();
        assert_eq!((us.min, us.p50, us.max), (0.001, 0.5, 1.0));
    }

    #[test]
    fn compact_buckets_are_hdrhistograms_buckets() {
        for m in [Metric::Rtt, Metric::LossRun, Metric::Throughput] {
            let c = m.config();
            let h = m.new_histogram();
            let mut v = 0u64;
            while v <= c.highest {
                let i = index_of(c, v);
                assert_eq!(
                    value_at_index(c, i),
                    h.lowest_equivalent(v),
                    "{} {v}",
                    m.key()
                );
                v = v * 3 / 2 + 1;
            }
        }
    }

    #[test]
    fn a_compact_histogram_of_a_low_rate_window_costs_kilobytes() {
        let mut c = Compact::new(Metric::Rtt);
        for i in 0..1_000u64 {
            c.record(1_000_000 + (i % 200) * 1_000);
        }
        assert!(c.footprint() <= 5 * 1024, "{} octets", c.footprint());
        let h = c.into_histogram();
        assert_eq!(h.len(), 1_000);
    }

    proptest! {
        #[test]
        fn round_trip_any_samples(metric in prop::sample::select(Metric::ALL.to_vec()),
                                  values in proptest::collection::vec(any::<u64>(), 0..200)) {
            let h = recorded(metric, &values);
            let bytes = encode(metric, &h).unwrap();
            // HdrHistogram's own serializers write the same octets: the plain one for a
            // short form, the deflating one for a long.
            let mut plain = Vec::new();
            V2Serializer::new().serialize(&h, &mut plain).unwrap();
            if plain.len() <= DEFLATE_ABOVE {
                prop_assert_eq!(&bytes, &plain);
            } else {
                let mut deflated = Vec::new();
                hdrhistogram::serialization::V2DeflateSerializer::new()
                    .serialize(&h, &mut deflated)
                    .unwrap();
                prop_assert_eq!(&bytes, &deflated);
            }
            let back = decode(metric, &bytes).unwrap();
            prop_assert_eq!(back, h);
        }

        #[test]
        fn compact_equals_recording_directly(values in proptest::collection::vec(
            prop_oneof![0u64..5_000, 0u64..200_000_000_000, any::<u64>()], 0..2_000)) {
            let mut c = Compact::new(Metric::Rtt);
            let mut direct = Metric::Rtt.new_histogram();
            for &v in &values {
                c.record(v);
                direct.saturating_record(v.min(Metric::Rtt.config().highest));
            }
            prop_assert_eq!(c.len(), values.len() as u64);
            let h = c.into_histogram();
            prop_assert_eq!(&h, &direct);
            prop_assert_eq!(encode(Metric::Rtt, &h).unwrap(), encode(Metric::Rtt, &direct).unwrap());
        }

        #[test]
        fn compact_summary_and_encoding_equal_the_full_histograms(
            metric in prop::sample::select(Metric::ALL.to_vec()),
            values in proptest::collection::vec(
                prop_oneof![0u64..5_000, 0u64..200_000_000_000, any::<u64>()], 0..400)) {
            // Up to 400 values: sparse up to 256 buckets, dense past them; both forms.
            let mut c = Compact::new(metric);
            for &v in &values {
                c.record(v);
            }
            let h = c.clone().into_histogram();
            prop_assert_eq!(c.summary(), Summary::of(&h));
            prop_assert_eq!(c.encode().unwrap(), encode(metric, &h).unwrap());
        }

        #[test]
        fn merge_equals_recording_both(a in proptest::collection::vec(1u64..200_000_000_000, 0..200),
                                       b in proptest::collection::vec(1u64..200_000_000_000, 0..200)) {
            let mut merged = decode(Metric::Rtt, &encode(Metric::Rtt, &recorded(Metric::Rtt, &a)).unwrap()).unwrap();
            let hb = decode(Metric::Rtt, &encode(Metric::Rtt, &recorded(Metric::Rtt, &b)).unwrap()).unwrap();
            merge(Metric::Rtt, &mut merged, &hb).unwrap();
            let both = recorded(Metric::Rtt, &[a, b].concat());
            prop_assert_eq!(&merged, &both);
            for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
                prop_assert_eq!(merged.value_at_quantile(q), both.value_at_quantile(q));
            }
        }

        #[test]
        fn decode_into_equals_decode_then_merge(metric in prop::sample::select(Metric::ALL.to_vec()),
                                               a in proptest::collection::vec(any::<u64>(), 0..200),
                                               b in proptest::collection::vec(any::<u64>(), 0..200)) {
            let blob = encode(metric, &recorded(metric, &b)).unwrap();
            let mut direct = recorded(metric, &a);
            decode_into(metric, &blob, &mut direct).unwrap();
            let mut merged = recorded(metric, &a);
            merge(metric, &mut merged, &decode(metric, &blob).unwrap()).unwrap();
            prop_assert_eq!(&direct, &merged);
            prop_assert_eq!(direct.max(), merged.max());
            prop_assert_eq!(direct.min_nz(), merged.min_nz());
        }

        #[test]
        fn decode_into_leaves_the_target_alone_on_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = recorded(Metric::Rtt, &[5, 10_000]);
            let before = h.clone();
            let mut v2 = v2_with_payload(&bytes);
            if decode_into(Metric::Rtt, &v2, &mut h).is_err() {
                prop_assert_eq!(&h, &before);
            }
            v2.truncate(v2.len().saturating_sub(1));
            let mut g = before.clone();
            if decode_into(Metric::Rtt, &v2, &mut g).is_err() {
                prop_assert_eq!(&g, &before);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Metric::Rtt, &bytes);
            let mut v2 = v2_with_payload(&bytes);
            let _ = decode(Metric::Rtt, &v2);
            v2[3] = 0x14;
            let _ = decode(Metric::LossRun, &v2);
        }
    }
}
