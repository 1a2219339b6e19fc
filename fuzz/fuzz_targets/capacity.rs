//! Any datagram at a capacity sink and any line on the control connection: a header, a
//! request or an error, never a panic; whatever parses re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pathprobe_proto::capacity::{HEADER_LEN, LoadHeader, Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = LoadHeader::read(data) {
        let mut buf = [0u8; HEADER_LEN];
        h.write(&mut buf);
        assert_eq!(&buf[..], &data[..HEADER_LEN]);
    }
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&r).expect("a request encodes");
        assert_eq!(
            serde_json::from_slice::<Request>(&again).expect("and decodes"),
            r
        );
    }
    if let Ok(r) = serde_json::from_slice::<Reply>(data) {
        let again = serde_json::to_vec(&r).expect("a reply encodes");
        assert_eq!(
            serde_json::from_slice::<Reply>(&again).expect("and decodes"),
            r
        );
    }
});
