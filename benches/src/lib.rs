//! pathprobe benchmarks: see `benches/` and BENCHMARKS.md.
