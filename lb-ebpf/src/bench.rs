//! XDP programs for `cargo xtask bench`, and nothing else: a second object
//! (`lb-bench`), never loaded by lbd, sharing no code with lb's own programs.
//!
//! - `bench_gen`: the traffic generator. Run with `BPF_PROG_TEST_RUN` in
//!   live-frames mode, it stamps a UDP frame from [`STAMP`] (a new source
//!   port per packet, cycling over a fixed set of flows) and transmits it
//!   with `XDP_TX` out of the client's interface.
//! - `bench_sink`: at the ISP ends; counts and drops.
//! - `bench_redirect`: the lab's ceiling: only rewrites the MACs and
//!   redirects LAN frames to an uplink, as bare as XDP forwarding gets.
//! - `bench_queue`: the ceiling of any path through an uplink's qdisc: a
//!   tc ingress program that rewrites the MACs as `bench_redirect` does
//!   and redirects the frame into the uplink's egress (its qdisc), behind
//!   `bench_nop` in XDP. What lb's hand-off costs beyond it is lb's own.
//! - `bench_tap`: the generator's forwarder where frames are written into
//!   a tap (kernels that refuse live-frames test runs).
//! - `bench_run` / `bench_nop`: the harness for per-packet costs. A test run
//!   repeats on one buffer and keeps what the program wrote, so `bench_run`
//!   restores the frame from [`STAMP`] (and can make every repetition a new
//!   flow) before it tail-calls the program under test in [`TARGET`];
//!   `bench_nop` is the baseline that the harness's own cost is measured with.
//!
//! The layout of [`Stamp`] is repeated in xtask/src/bench/object.rs; the
//! size is asserted on both sides.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::bpf_redirect,
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};

/// Bytes of the frame that [`stamp`] rewrites: Ethernet, IPv4 without
/// options and UDP (42), or Ethernet and IPv6's addresses (54: a reply's
/// destination is rewritten there), rounded up to whole 32-bit words.
const HEADER_LEN: usize = 56;
/// Offsets in an untagged IPv4/UDP frame without IP options.
const IP_CHECK: usize = 24;
const IP_DST_LOW: usize = 32;
const UDP_SRC: usize = 34;
const UDP_CHECK: usize = 40;

/// A frame and how to vary it. Checksums are kept as ones'-complement sums
/// over the template with the varied fields zero, so that the program only
/// adds the new values in.
#[repr(C)]
pub struct Stamp {
    /// The first [`HEADER_LEN`] bytes of the frame, as words in memory
    /// order; the varied fields (UDP source port, low half of the IP
    /// destination) and both checksums zero.
    pub header: [u32; HEADER_LEN / 4],
    /// Sum of the IPv4 header's 16-bit words.
    pub ip_sum: u32,
    /// Sum of the UDP pseudo-header's and datagram's 16-bit words.
    pub udp_sum: u32,
    /// Flow `n` has source port `port_base + n % port_count`...
    pub port_base: u32,
    /// ...zero: copy the header as it is (one flow, checksums included).
    pub port_count: u32,
    /// ...and destination low half `addr_base + (n / port_count) % addr_count`.
    pub addr_base: u32,
    pub addr_count: u32,
}

const _: () = assert!(core::mem::size_of::<Stamp>() == 80);

#[map]
static STAMP: Array<Stamp> = Array::with_max_entries(1, 0);

/// Per-CPU sequence number of the next flow [`stamp`] makes.
#[map]
static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU count of frames `bench_sink` dropped.
#[map]
static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `bench_redirect`: per uplink, the first 12 bytes of its frames
/// (destination and source MAC) as words in memory order.
#[map]
static MACS: Array<[u32; 3]> = Array::with_max_entries(2, 0);

/// `bench_redirect`: per uplink, its device.
#[map]
static PORTS: DevMap = DevMap::with_max_entries(2, 0);

/// `bench_queue`: per uplink, its device's ifindex.
#[map]
static QUEUES: Array<u32> = Array::with_max_entries(2, 0);

/// `bench_run`: the program under test, in slot 0.
#[map]
static TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Rewrite the frame's headers from [`STAMP`], varying the flow when asked.
#[inline(always)]
fn stamp(ctx: &XdpContext) -> Option<()> {
    let s = STAMP.get(0)?;
    let start = ctx.data();
    if start + HEADER_LEN > ctx.data_end() {
        return None;
    }
    let to = start as *mut u32;
    for (i, word) in s.header.iter().enumerate() {
        // SAFETY: the packet holds HEADER_LEN bytes (checked above). Frames
        // of test runs start 4-byte aligned (256 bytes of headroom after a
        // page or a pointer-sized page head), so word stores are aligned;
        // byte-wise copies would cost four times the instructions.
        unsafe { to.add(i).write(*word) };
    }
    if s.port_count == 0 {
        return Some(());
    }
    let seq = SEQ.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; nothing else runs on this CPU meanwhile.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let port_count = u64::from(s.port_count);
    let addr_count = u64::from(s.addr_count.max(1));
    let port = (u64::from(s.port_base) + n % port_count) as u32 & 0xffff;
    let addr = (u64::from(s.addr_base) + (n / port_count) % addr_count) as u32 & 0xffff;
    let ip_check = !fold(s.ip_sum + addr);
    let udp_check = match !fold(s.udp_sum + port + addr) {
        // Zero means "no checksum" in UDP over IPv4.
        0 => 0xffff,
        c => c,
    };
    put16(start, IP_DST_LOW, addr as u16);
    put16(start, UDP_SRC, port as u16);
    put16(start, IP_CHECK, ip_check);
    put16(start, UDP_CHECK, udp_check);
    Some(())
}

/// Fold a 32-bit ones'-complement sum into 16 bits.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// Store `value` big-endian at `start + offset` (within HEADER_LEN).
#[inline(always)]
fn put16(start: usize, offset: usize, value: u16) {
    // SAFETY: callers pass offsets below HEADER_LEN, which `stamp` checked.
    unsafe { ((start + offset) as *mut [u8; 2]).write_unaligned(value.to_be_bytes()) };
}

/// The generator: one new frame per call, transmitted back out of the
/// interface it "arrived" on (live-frames test runs turn `XDP_TX` into a
/// redirect to `ingress_ifindex`).
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    match stamp(&ctx) {
        Some(()) => XDP_TX,
        None => XDP_ABORTED,
    }
}

/// Count and drop.
#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(count) = SINK.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; nothing else runs on this CPU meanwhile.
        unsafe { *count += 1 };
    }
    XDP_DROP
}

/// LAN to uplink with nothing but new MACs: uplink = low bit of the UDP
/// source port (an untagged IPv4 frame without options assumed); anything
/// that is not IPv4 goes to the kernel.
#[xdp]
pub fn bench_redirect(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + HEADER_LEN > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: within the first HEADER_LEN bytes, checked above.
    let (ether_type, port_low) = unsafe {
        (
            ((start + 12) as *const [u8; 2]).read_unaligned(),
            *((start + UDP_SRC + 1) as *const u8),
        )
    };
    if ether_type != [0x08, 0x00] {
        return XDP_PASS;
    }
    let uplink = u32::from(port_low & 1);
    let Some(macs) = MACS.get(uplink) else {
        return XDP_ABORTED;
    };
    let to = start as *mut u32;
    for (i, word) in macs.iter().enumerate() {
        // SAFETY: within the checked header; aligned as in `stamp`.
        unsafe { to.add(i).write(*word) };
    }
    PORTS.redirect(uplink, 0).unwrap_or(XDP_ABORTED)
}

/// LAN to uplink through the uplink's qdisc, as bare as that gets: the
/// MACs of `bench_redirect`, then a redirect to the device's egress.
#[classifier]
pub fn bench_queue(ctx: TcContext) -> i32 {
    let start = ctx.data();
    if start + HEADER_LEN > ctx.data_end() {
        return TC_ACT_OK;
    }
    // SAFETY: within the first HEADER_LEN bytes, checked above.
    let (ether_type, port_low) = unsafe {
        (
            ((start + 12) as *const [u8; 2]).read_unaligned(),
            *((start + UDP_SRC + 1) as *const u8),
        )
    };
    if ether_type != [0x08, 0x00] {
        return TC_ACT_OK;
    }
    let uplink = u32::from(port_low & 1);
    let (Some(macs), Some(&ifindex)) = (MACS.get(uplink), QUEUES.get(uplink)) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: within the checked header; an skb's data need not be
    // word-aligned, hence unaligned writes.
    unsafe { (start as *mut [u32; 3]).write_unaligned(*macs) };
    // SAFETY: no preconditions; it names the device and tc does the rest.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The tap generator's forwarder (xtask/src/bench/gen.rs): every frame
/// written into the tap leaves, as it is, by the device in slot 0 of
/// `PORTS` (the client's eth0), reaching its peer as an XDP frame.
#[xdp]
pub fn bench_tap(_ctx: XdpContext) -> u32 {
    PORTS.redirect(0, 0).unwrap_or(XDP_ABORTED)
}

/// The per-packet cost harness: restore (and vary) the frame, then run the
/// program under test on it.
#[xdp]
pub fn bench_run(ctx: XdpContext) -> u32 {
    if stamp(&ctx).is_none() {
        return XDP_ABORTED;
    }
    // SAFETY: a tail call does not return when it succeeds.
    unsafe { TARGET.tail_call(&ctx, 0) };
    XDP_ABORTED
}

/// The baseline target of `bench_run`.
#[xdp]
pub fn bench_nop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
