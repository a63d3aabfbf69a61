//! The fast path's clock: the kernel's coarse monotonic clock, as
//! `bpf_ktime_get_coarse_ns` reads it, but asked once per tick rather
//! than once per packet.
//!
//! The coarse clock only moves on a timer tick, and so does `jiffies`; the
//! verifier turns `bpf_jiffies64` into one load, where the clock is a
//! helper call (three calls deep, each return paying the CPU's
//! return-thunk mitigation: about a tenth of an established packet's
//! cost). So the programs keep the last tick's pair in a global, which
//! they reach without a lookup, and read the clock again only when
//! `jiffies` moved: a few hundred times a second, on whichever CPU sees
//! the new tick first. The values are the helper's, to within the tick (a
//! reader between the tick's two updates, or one that sees another CPU's
//! new `jiffies` before its clock, keeps the old clock for a packet or a
//! tick), which is the coarse clock's resolution anyway. It owns no other
//! time: lbd compares these stamps with `CLOCK_MONOTONIC_COARSE`.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

/// The last tick the programs saw: its `jiffies`, and the coarse clock
/// then. Written clock first, `jiffies` second.
#[repr(C)]
struct Tick {
    jiffies: u64,
    ns: u64,
}

static mut TICK: Tick = Tick { jiffies: 0, ns: 0 };

/// Now, on the coarse monotonic clock, in nanoseconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: the helpers have no preconditions. `TICK` is shared by every
    // CPU, hence the volatile accesses, one word at a time: a racing
    // writer stores the same tick's values.
    unsafe {
        let jiffies = bpf_jiffies64();
        let tick = &raw mut TICK;
        if core::ptr::read_volatile(&raw const (*tick).jiffies) == jiffies {
            return core::ptr::read_volatile(&raw const (*tick).ns);
        }
        let ns = bpf_ktime_get_coarse_ns();
        core::ptr::write_volatile(&raw mut (*tick).ns, ns);
        core::ptr::write_volatile(&raw mut (*tick).jiffies, jiffies);
        ns
    }
}
