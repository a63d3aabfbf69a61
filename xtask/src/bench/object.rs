//! The lb-bench XDP object (lb-ebpf/src/bench.rs) from user space: loading
//! it, the frames it stamps ([`Stamp`], whose layout mirrors the kernel
//! side), and test runs.
//!
//! Frames are untagged Ethernet + IPv4 without options + UDP, 60 bytes (the
//! smallest Ethernet frame), built here with their checksums; the program
//! varies the UDP source port and the low half of the IP destination and
//! adds them into the checksums, so [`check_ipv4_udp`] verifies its work.
//! The program knows only IPv4's offsets; [`Stamp::flows6`] lays an
//! IPv6/UDP frame under them so that the same writes make IPv6 flows with
//! right checksums ([`check_ipv6_udp`]).

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::{Program, ProgramFd, SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};

/// The benchmark's XDP object (lb-ebpf's `lb-bench`: traffic generator,
/// sinks, a bare redirect and its tc twin, a test-run harness), built
/// beside lbd's and handed over by lb-daemon's build script (see
/// build.rs). lbd never loads it.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_BENCH_OBJECT"));

pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// Every frame the benchmark sends: 14 + 20 + 8 + 18 bytes of payload.
pub const FRAME_LEN: usize = 60;
/// Bytes the program rewrites, as in lb-ebpf/src/bench.rs.
const HEADER_LEN: usize = 56;
const IP: usize = 14;
const IP_CHECK: usize = 24;
const IP_DST_LOW: usize = 32;
const UDP: usize = 34;
const UDP_CHECK: usize = 40;
/// Offsets in an untagged IPv6/UDP frame without extension headers.
const IP6_NEXT: usize = 20;
const IP6_SRC: usize = 22;
const IP6_DST: usize = 38;
const UDP6: usize = 54;
const IPPROTO_UDP: u8 = 17;
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];

/// What the program stamps onto each frame: `Stamp` in
/// lb-ebpf/src/bench.rs, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    header: [u32; HEADER_LEN / 4],
    ip_sum: u32,
    udp_sum: u32,
    port_base: u32,
    port_count: u32,
    addr_base: u32,
    addr_count: u32,
}

const _: () = assert!(std::mem::size_of::<Stamp>() == 80);

// SAFETY: `repr(C)`, only u32 fields, no padding (asserted size).
unsafe impl aya::Pod for Stamp {}

impl Stamp {
    /// Whether each repetition gets a flow of its own.
    pub fn varies(&self) -> bool {
        self.port_count > 0
    }

    /// Every repetition gets `frame`'s headers as they are.
    pub fn fixed(frame: &[u8]) -> Result<Stamp> {
        ensure!(
            frame.len() >= HEADER_LEN,
            "frame shorter than {HEADER_LEN} bytes"
        );
        Ok(Stamp {
            header: words(&frame[..HEADER_LEN]),
            ip_sum: 0,
            udp_sum: 0,
            port_base: 0,
            port_count: 0,
            addr_base: 0,
            addr_count: 0,
        })
    }

    /// Repetition `n` becomes flow `n`: `frame` (IPv4/UDP, as [`udp`]
    /// builds it) with source port `port + n % ports` and the low half of
    /// its destination advanced by `(n / ports) % addrs`.
    pub fn flows(frame: &[u8], ports: u16, addrs: u16) -> Result<Stamp> {
        ensure!(
            frame.len() >= HEADER_LEN && ports > 0 && addrs > 0,
            "a varied stamp needs an IPv4/UDP frame and at least one port and address"
        );
        let port_base = be16(frame, UDP);
        let addr_base = be16(frame, IP_DST_LOW);
        ensure!(
            u32::from(port_base) + u32::from(ports) <= 0x1_0000
                && u32::from(addr_base) + u32::from(addrs) <= 0x1_0000,
            "ports or addresses would wrap around"
        );
        let mut f = frame.to_vec();
        for field in [IP_CHECK, IP_DST_LOW, UDP, UDP_CHECK] {
            f[field..field + 2].fill(0);
        }
        Ok(Stamp {
            header: words(&f[..HEADER_LEN]),
            ip_sum: u32::from(fold(sum16(&f[IP..UDP]))),
            udp_sum: u32::from(fold(udp_sum(&f))),
            port_base: u32::from(port_base),
            port_count: u32::from(ports),
            addr_base: u32::from(addr_base),
            addr_count: u32::from(addrs),
        })
    }

    /// Repetition `n` becomes flow `n` of `frame` (IPv6/UDP, as [`Udp6`]
    /// builds it), through the program's IPv4 writes (lb-ebpf/src/bench.rs
    /// has no IPv6 of its own, and the benchmark leaves lb-ebpf alone). In
    /// an IPv6 frame those four 16-bit writes land in the addresses:
    ///
    /// - IPv4's checksum (24): the source's 2nd word. Its sum is made to
    ///   give that word back, so the source stays in its /64;
    /// - IPv4's destination low half (32): the source's 6th word, kept as
    ///   it is (one "address");
    /// - the UDP source port (34): the source's 7th word, which counts up
    ///   from the frame's own, `flows` values: the flow;
    /// - UDP's checksum (40): the destination's 2nd word. It gets the
    ///   ones' complement of (sum + port), so it counts down as the source
    ///   counts up, and the two together add the same into the UDP
    ///   checksum (IPv6's pseudo-header holds both addresses) for every
    ///   flow: the frame's own UDP checksum (past the stamped bytes) stays
    ///   right. Flow 0 is `frame` itself.
    pub fn flows6(frame: &[u8], flows: u16) -> Result<Stamp> {
        ensure!(
            frame.len() >= UDP6 + 8
                && frame[12..14] == ETHERTYPE_IPV6
                && frame[IP6_NEXT] == IPPROTO_UDP
                && flows > 0,
            "an IPv6 stamp needs an IPv6/UDP frame without extension headers and a flow"
        );
        let source_word = be16(frame, IP_CHECK);
        let kept = be16(frame, IP_DST_LOW);
        let first = be16(frame, UDP);
        let destination_word = be16(frame, UDP_CHECK);
        // The program writes !fold(ip_sum + addr); a sum that folds to
        // 0xffff would give 0, not 0xffff.
        ensure!(
            source_word != 0xffff,
            "the source's second word must not be ffff"
        );
        ensure!(
            u32::from(first) + u32::from(flows) <= 0x1_0000,
            "the source's seventh word would wrap around"
        );
        let mut f = frame.to_vec();
        for field in [IP_CHECK, IP_DST_LOW, UDP, UDP_CHECK] {
            f[field..field + 2].fill(0);
        }
        // x + !x is ones'-complement zero: fold(!w + !a + a) is !w.
        Ok(Stamp {
            header: words(&f[..HEADER_LEN]),
            ip_sum: u32::from(!source_word) + u32::from(!kept),
            udp_sum: u32::from(!destination_word) + u32::from(!first) + u32::from(!kept),
            port_base: u32::from(first),
            port_count: u32::from(flows),
            addr_base: u32::from(kept),
            addr_count: 1,
        })
    }
}

/// The first `4 * N` bytes as 32-bit words in memory order.
fn words<const N: usize>(bytes: &[u8]) -> [u32; N] {
    let mut out = [0u32; N];
    for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    out
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Ones'-complement sum of big-endian 16-bit words (odd tail zero-padded).
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Sum of the UDP pseudo-header, header and payload of an IPv4/UDP frame.
fn udp_sum(frame: &[u8]) -> u32 {
    let udp_len = be16(frame, UDP + 4);
    let end = (UDP + usize::from(udp_len)).min(frame.len());
    sum16(&frame[IP + 12..IP + 20]) + 17 + u32::from(udp_len) + sum16(&frame[UDP..end])
}

/// A UDP datagram as one Ethernet frame.
pub struct Udp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ttl: u8,
}

impl Udp {
    /// The frame, [`FRAME_LEN`] bytes, checksums filled in.
    pub fn frame(&self) -> Vec<u8> {
        let payload = FRAME_LEN - UDP - 8;
        let mut f = Vec::with_capacity(FRAME_LEN);
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        f.extend([0x08, 0x00]);
        f.extend([0x45, 0]);
        f.extend(((FRAME_LEN - IP) as u16).to_be_bytes());
        f.extend([0, 0, 0x40, 0, self.ttl, 17, 0, 0]); // id, DF, TTL, UDP, checksum
        f.extend(self.src.octets());
        f.extend(self.dst.octets());
        f.extend(self.src_port.to_be_bytes());
        f.extend(self.dst_port.to_be_bytes());
        f.extend(((8 + payload) as u16).to_be_bytes());
        f.extend([0, 0]);
        f.extend((0..payload).map(|i| b'a' + (i % 26) as u8));
        let ip_check = !fold(sum16(&f[IP..UDP]));
        f[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
        let udp_check = match !fold(udp_sum(&f)) {
            0 => 0xffff,
            c => c,
        };
        f[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&udp_check.to_be_bytes());
        f
    }
}

/// A UDP datagram over IPv6 as one Ethernet frame (no extension header;
/// 80 bytes, IPv6's header being 20 bytes longer than IPv4's).
pub struct Udp6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: std::net::Ipv6Addr,
    pub dst: std::net::Ipv6Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub hop_limit: u8,
}

impl Udp6 {
    /// The frame, its UDP checksum filled in.
    pub fn frame(&self) -> Vec<u8> {
        const L4: usize = 14 + 40;
        let payload = 18;
        let udp_len = (8 + payload) as u16;
        let mut f = Vec::with_capacity(L4 + usize::from(udp_len));
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend(udp_len.to_be_bytes());
        f.extend([17, self.hop_limit]);
        f.extend(self.src.octets());
        f.extend(self.dst.octets());
        f.extend(self.src_port.to_be_bytes());
        f.extend(self.dst_port.to_be_bytes());
        f.extend(udp_len.to_be_bytes());
        f.extend([0, 0]);
        f.extend((0..payload).map(|i| b'a' + (i % 26) as u8));
        let sum = sum16(&f[22..L4]) + 17 + u32::from(udp_len) + sum16(&f[L4..]);
        let check = match !fold(sum) {
            0 => 0xffff,
            c => c,
        };
        f[L4 + 6..L4 + 8].copy_from_slice(&check.to_be_bytes());
        f
    }
}

/// An ARP request, padded to [`FRAME_LEN`].
pub fn arp(src_mac: [u8; 6], src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend([0xff; 6]);
    f.extend(src_mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(src_mac);
    f.extend(src.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f.resize(FRAME_LEN, 0);
    f
}

/// Whether an IPv4/UDP frame's checksums are both right.
pub fn check_ipv4_udp(frame: &[u8]) -> Result<()> {
    ensure!(
        frame.len() >= UDP + 8,
        "frame of {} bytes is no IPv4/UDP frame",
        frame.len()
    );
    ensure!(
        fold(sum16(&frame[IP..UDP])) == 0xffff,
        "IPv4 header checksum wrong"
    );
    ensure!(
        be16(frame, UDP_CHECK) == 0 || fold(udp_sum(frame)) == 0xffff,
        "UDP checksum wrong"
    );
    Ok(())
}

/// Whether an IPv6/UDP frame's UDP checksum is right (IPv6 has no header
/// checksum, and UDP's is mandatory).
pub fn check_ipv6_udp(frame: &[u8]) -> Result<()> {
    ensure!(
        frame.len() >= UDP6 + 8
            && frame[12..14] == ETHERTYPE_IPV6
            && frame[IP6_NEXT] == IPPROTO_UDP,
        "frame of {} bytes is no IPv6/UDP frame",
        frame.len()
    );
    let udp_len = be16(frame, UDP6 + 4);
    let end = UDP6 + usize::from(udp_len);
    ensure!(
        udp_len >= 8 && end <= frame.len(),
        "UDP length {udp_len} does not fit the frame"
    );
    let sum = sum16(&frame[IP6_SRC..UDP6])
        + u32::from(IPPROTO_UDP)
        + u32::from(udp_len)
        + sum16(&frame[UDP6..end]);
    ensure!(
        be16(frame, UDP6 + 6) != 0 && fold(sum) == 0xffff,
        "UDP checksum wrong"
    );
    Ok(())
}

/// The source and destination of an IPv6 frame.
pub fn ipv6_addresses(frame: &[u8]) -> Result<(std::net::Ipv6Addr, std::net::Ipv6Addr)> {
    let field = |at: usize| -> Result<std::net::Ipv6Addr> {
        let bytes: [u8; 16] = frame
            .get(at..at + 16)
            .and_then(|b| b.try_into().ok())
            .context("frame too short for an IPv6 header")?;
        Ok(bytes.into())
    };
    Ok((field(IP6_SRC)?, field(IP6_DST)?))
}

/// One loaded instance of the lb-bench object (each has its own maps).
pub struct BenchObject {
    ebpf: Ebpf,
}

impl BenchObject {
    /// Load the object and the programs `programs` (not attached).
    pub fn load(programs: &[&str]) -> Result<BenchObject> {
        let ebpf = Ebpf::load(BENCH_OBJECT)
            .context("loading the lb-bench XDP object (needs root and a kernel with BTF)")?;
        let mut object = BenchObject { ebpf };
        for name in programs {
            let loaded = match object.ebpf.program_mut(name) {
                Some(Program::Xdp(p)) => p.load(),
                Some(Program::SchedClassifier(p)) => p.load(),
                Some(_) => bail!("lb-bench program {name} is neither XDP nor tc"),
                None => bail!("program {name} missing from lb-bench"),
            };
            loaded.with_context(|| format!("the verifier refused lb-bench program {name}"))?;
        }
        Ok(object)
    }

    /// One of its tc programs (`bench_queue`).
    pub fn tc_mut(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from lb-bench"))?
            .try_into()
            .with_context(|| format!("lb-bench program {name} is not a tc program"))
    }

    pub fn xdp(&self, name: &str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from lb-bench"))?
            .try_into()
            .with_context(|| format!("lb-bench program {name} is not XDP"))
    }

    pub fn xdp_mut(&mut self, name: &str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from lb-bench"))?
            .try_into()
            .with_context(|| format!("lb-bench program {name} is not XDP"))
    }

    pub fn set_stamp(&mut self, stamp: &Stamp) -> Result<()> {
        let map = self.ebpf.map_mut("STAMP").context("map STAMP missing")?;
        let mut stamps: Array<_, Stamp> = Array::try_from(map).context("map STAMP")?;
        stamps.set(0, stamp, 0).context("writing STAMP")
    }

    /// Make `program` the target of `bench_run`'s tail call.
    pub fn set_target(&mut self, program: &ProgramFd) -> Result<()> {
        let map = self.ebpf.map_mut("TARGET").context("map TARGET missing")?;
        let mut targets = ProgramArray::try_from(map).context("map TARGET")?;
        targets
            .set(0, program, 0)
            .context("putting the program under test into TARGET (are both XDP programs?)")
    }

    /// `bench_redirect`'s uplink `index`: the device and the frame's new
    /// destination and source MACs. The device map resolves `ifindex` in
    /// the calling thread's network namespace.
    pub fn set_redirect(
        &mut self,
        index: u32,
        ifindex: u32,
        dst: [u8; 6],
        src: [u8; 6],
    ) -> Result<()> {
        self.set_macs(index, dst, src)?;
        self.set_port(index, ifindex)
    }

    /// Slot `index` of `PORTS` (`bench_redirect`'s uplinks, `bench_tap`'s
    /// way out): device `ifindex`, resolved in the calling thread's
    /// network namespace.
    pub fn set_port(&mut self, index: u32, ifindex: u32) -> Result<()> {
        let map = self.ebpf.map_mut("PORTS").context("map PORTS missing")?;
        let mut ports = DevMap::try_from(map).context("map PORTS")?;
        ports
            .set(index, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to the device map"))
    }

    /// `bench_queue`'s uplink `index`: the device whose egress it
    /// redirects to, and the frame's new destination and source MACs.
    pub fn set_queue(
        &mut self,
        index: u32,
        ifindex: u32,
        dst: [u8; 6],
        src: [u8; 6],
    ) -> Result<()> {
        self.set_macs(index, dst, src)?;
        let map = self.ebpf.map_mut("QUEUES").context("map QUEUES missing")?;
        let mut queues: Array<_, u32> = Array::try_from(map).context("map QUEUES")?;
        queues.set(index, ifindex, 0).context("writing QUEUES")
    }

    fn set_macs(&mut self, index: u32, dst: [u8; 6], src: [u8; 6]) -> Result<()> {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&dst);
        macs[6..].copy_from_slice(&src);
        let map = self.ebpf.map_mut("MACS").context("map MACS missing")?;
        let mut by_uplink: Array<_, [u32; 3]> = Array::try_from(map).context("map MACS")?;
        by_uplink
            .set(index, words::<3>(&macs), 0)
            .context("writing MACS")
    }

    /// A per-CPU counter (`SEQ` or `SINK`), summed over CPUs.
    pub fn counter(&self, map: &str) -> Result<u64> {
        let m = self
            .ebpf
            .map(map)
            .with_context(|| format!("map {map} missing"))?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(m).with_context(|| format!("map {map}"))?;
        Ok(counters
            .get(&0, 0)
            .with_context(|| format!("reading {map}"))?
            .iter()
            .sum())
    }
}

/// Run `xdp` once on `frame`: the verdict and the frame that came out.
pub fn run_once(xdp: &Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Run `xdp` `repeat` times on `frame`: the last verdict and the kernel's
/// average time per repetition, in ns.
pub fn time(xdp: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, u64)> {
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((result.return_value, result.duration.as_nanos() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<u8> {
        Udp {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src: Ipv4Addr::new(10, 10, 0, 2),
            dst: Ipv4Addr::new(198, 51, 100, 10),
            src_port: 10_000,
            dst_port: 9,
            ttl: 64,
        }
        .frame()
    }

    #[test]
    fn built_frames_have_valid_checksums() {
        let f = frame();
        assert_eq!(f.len(), FRAME_LEN);
        assert!(check_ipv4_udp(&f).is_ok());
    }

    /// What bench.rs's `stamp` does, in user space: flow `n` of `s` over
    /// `frame`.
    fn stamped(s: &Stamp, frame: &[u8], n: u32) -> Vec<u8> {
        let mut f = frame.to_vec();
        for (i, word) in s.header.iter().enumerate() {
            f[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let port = (s.port_base + n % s.port_count) & 0xffff;
        let addr = (s.addr_base + (n / s.port_count) % s.addr_count.max(1)) & 0xffff;
        let ip_check = !fold(s.ip_sum + addr);
        let udp_check = match !fold(s.udp_sum + port + addr) {
            0 => 0xffff,
            c => c,
        };
        f[IP_DST_LOW..IP_DST_LOW + 2].copy_from_slice(&(addr as u16).to_be_bytes());
        f[UDP..UDP + 2].copy_from_slice(&(port as u16).to_be_bytes());
        f[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
        f[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&udp_check.to_be_bytes());
        f
    }

    #[test]
    fn ipv6_flows_keep_their_prefix_and_checksum_and_are_all_distinct() {
        let frame = Udp6 {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src: "fd00:10:0:1::1000:2".parse().expect("address"),
            dst: "3fff:ffff::10".parse().expect("address"),
            src_port: 10_000,
            dst_port: 9,
            hop_limit: 64,
        }
        .frame();
        assert!(check_ipv6_udp(&frame).is_ok());
        const FLOWS: u16 = 4096;
        let s = Stamp::flows6(&frame, FLOWS).expect("stamp");
        assert_eq!(stamped(&s, &frame, 0), frame);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..u32::from(FLOWS) {
            let f = stamped(&s, &frame, n);
            check_ipv6_udp(&f).unwrap_or_else(|e| panic!("flow {n}: {e:#}"));
            assert_eq!(f[IP6_SRC..IP6_SRC + 8], frame[IP6_SRC..IP6_SRC + 8]);
            assert_eq!(f[IP6_DST..IP6_DST + 2], frame[IP6_DST..IP6_DST + 2]);
            seen.insert(ipv6_addresses(&f).expect("addresses"));
        }
        assert_eq!(seen.len(), usize::from(FLOWS));
        // The next round repeats the first.
        assert_eq!(stamped(&s, &frame, u32::from(FLOWS)), frame);
    }

    /// What bench.rs's `stamp` does, in user space: flow 0 of a varied
    /// stamp is the frame it was made from.
    #[test]
    fn flow_zero_of_a_stamp_is_the_original_frame() {
        let f = frame();
        let s = Stamp::flows(&f, 16, 4).expect("stamp");
        let port = s.port_base;
        let addr = s.addr_base;
        let ip_check = !fold(s.ip_sum + addr);
        let udp_check = !fold(s.udp_sum + port + addr);
        assert_eq!(ip_check, be16(&f, IP_CHECK));
        assert_eq!(udp_check, be16(&f, UDP_CHECK));
    }
}
