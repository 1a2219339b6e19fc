//! A report whose histograms were encoded by an independent V2 encoder (the Python script
//! that wrote `fuzz/seeds/report/report-v1.json`, following the HdrHistogram V2 layout:
//! zig-zag LEB128 counts, negative runs of empty buckets, zlib) decodes to the counts it
//! was written with.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::{ClockState, WindowReport};

#[test]
fn independently_encoded_report_decodes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/report/report-v1.json"
    );
    let r = WindowReport::from_json(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(r.path.name, "er");
    assert_eq!(
        r.owd_clock,
        ClockState::Estimated {
            offset_ns: -1200,
            samples: 50
        }
    );
    let rtt = &r.histograms[&Metric::Rtt];
    // Counts 5, 2 and 1 at bucket indices 3000, 3001 and 3012. With 3 significant digits
    // the first 2048 indices hold 0..=2047 and the next 1024 hold pairs from 2048, so index
    // 3000 is 2 * (1024 + 952) = 3952 ns.
    assert_eq!(rtt.len(), 8);
    assert_eq!(rtt.min(), 3952);
    assert_eq!(rtt.count_at(3952), 5);
    assert_eq!(rtt.count_at(3954), 2);
    assert_eq!(rtt.lowest_equivalent(rtt.max()), 3976);
    let runs = &r.histograms[&Metric::LossRun];
    assert_eq!((runs.len(), runs.max()), (1, 1));
}

#[test]
fn the_version_2_seed_is_refused() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/report/report-v2.json"
    );
    let err = WindowReport::from_json(&std::fs::read(path).unwrap()).unwrap_err();
    assert!(err.to_string().contains("version 2 is newer"), "{err}");
}
