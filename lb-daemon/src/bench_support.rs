//! The benchmark's XDP object (lb-ebpf's `lb-bench` binary: traffic
//! generator, sinks, a bare redirect and a test-run harness), embedded for
//! `cargo xtask bench`. lbd never loads it.

/// The lb-bench object built by build.rs.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench.bpf.o"));
