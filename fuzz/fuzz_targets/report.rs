//! Any body, read as a window report or a histogram: an error, never a panic; a report that
//! decodes encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::report::WindowReport;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = WindowReport::from_json(data) {
        let again = r.to_json().expect("a decoded report encodes");
        assert_eq!(WindowReport::from_json(&again).expect("and decodes"), r);
    }
    for m in Metric::ALL {
        if let Ok(h) = hist::decode(m, data) {
            let bytes = hist::encode(m, &h).expect("a decoded histogram encodes");
            assert_eq!(hist::decode(m, &bytes).expect("and decodes"), h);
        }
    }
});
