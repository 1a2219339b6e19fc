//! Capacity tests: what a path carries before it loses packets or bloats its queue, and
//! which ExpressRoute circuit and gateway sizes the traffic needs.
//!
//! - [`rate`]: bit rates as people write them (`50mbit`), and fractions (`95%`); in
//!   `pathprobe_proto::rate`, since the collector's fleet planner reads them too.
//! - [`wire`]: the load datagram and the control messages between the two ends (they
//!   live in `pathprobe_proto::capacity`, with the other wire formats).
//! - [`pacer`]: paced UDP load (GSO or `sendmmsg` batches against absolute deadlines).
//! - [`sink`]: counting what arrives, per stage, in 100 ms intervals.
//! - [`server`]: the far end, inside a reflector started with `--allow-capacity`.
//! - [`client`]: the stages, with a STAMP stream under each.
//! - [`knee`]: judging stages and finding the knee (sans-IO).
//! - [`sizing`]: the Azure table and the recommendation (sans-IO).
//! - [`present`]: the table, the JSON objects and the collector reports of a test.

pub mod client;
pub mod knee;
pub mod pacer;
pub mod present;
pub mod server;
pub mod sink;
pub mod sizing;
pub use pathprobe_proto::capacity as wire;
pub use pathprobe_proto::rate;
