//! The collector's ingest validation: whatever body a token holder sends, a report that
//! passes it (`EncodedReport::from_json`, what `POST /v1/reports` runs) must be one that a
//! rollup and a query can always take, even 1,024 copies of it in one bucket: it decodes
//! the same, its counters and histograms merge without overflow, the merged histograms
//! encode (V2 counts are signed 64-bit), and every summary a query prints can be read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pathprobe_proto::hist::{self, Summary};
use pathprobe_proto::report::{EncodedReport, WindowReport};

fuzz_target!(|data: &[u8]| {
    let Ok(encoded) = EncodedReport::from_json(data) else {
        return;
    };
    let decoded = WindowReport::from_json(data).expect("what ingest accepts also decodes");
    for (m, e) in &encoded.histograms {
        assert_eq!(decoded.histograms[m].len(), e.count, "{}", m.key());
    }
    // 2^10 copies by doubling: a bucket of 1,024 such windows.
    let mut counters = decoded.counters;
    let mut histograms = decoded.histograms.clone();
    for _ in 0..10 {
        let copy = counters;
        counters
            .merge(&copy)
            .expect("counters of 1,024 windows fit");
        for (&m, h) in histograms.iter_mut() {
            let copy = h.clone();
            hist::merge(m, h, &copy).expect("histograms of 1,024 windows merge");
        }
    }
    for (&m, h) in &histograms {
        let blob = hist::encode(m, h).expect("a merged histogram encodes");
        let back = hist::decode(m, &blob).expect("and decodes");
        assert_eq!(&back, h);
        let _ = Summary::of(h).map(|s| s.micros());
    }
    let _ = counters.loss_pct();
});
