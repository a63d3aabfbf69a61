//! Header parsing: the one place that turns packet offsets into pointers.
//!
//! [`ptr_at`] is the only bounds check in the crate: every header access goes
//! through it, so the verifier sees the same idiom everywhere and no other
//! module does pointer arithmetic on packet data.
//!
//! Parsing works on a [`Frame`]: an Ethernet frame in XDP, or, at tc on an
//! L3 uplink (a tunnel, a raw-IP modem), an IP packet with no link-layer
//! header at all ([`L3Packet`]).

use core::mem::{align_of, size_of};

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_l4_csum_replace, bpf_skb_change_head, bpf_skb_pull_data},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{csum, egress::note, reason};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6's fragment extension header.
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// "More fragments" flag of the IPv4 header's flags and offset field.
const IP_MF: u16 = 0x2000;
/// Fragment offset bits of the same field.
const IP_OFFSET: u16 = 0x1fff;

#[repr(C, align(2))]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C, align(2))]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

#[repr(C, align(2))]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C, align(2))]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// One 16-bit field of a header (a port, a checksum), read and written a
/// half word at a time.
#[repr(C, align(2))]
pub struct Field16(pub [u8; 2]);

/// TCP header up to the checksum.
#[repr(C, align(2))]
pub struct TcpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub off_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
}

/// A TCP header without options.
pub const TCP_HDR_LEN: usize = 20;

/// A four-byte TCP option of kind and length and a 16-bit value (MSS).
#[repr(C, align(2))]
pub struct TcpOptHdr {
    pub kind: u8,
    pub len: u8,
    pub value: [u8; 2],
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C, align(2))]
pub struct UdpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// ICMP header with the echo identifier and sequence (for errors, those
/// four bytes are unused or hold the next-hop MTU).
#[repr(C, align(2))]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;

/// Whether an ICMP message of type `kind` is an error that quotes a packet
/// (destination unreachable, time exceeded, parameter problem).
#[inline(always)]
pub fn icmp_error(kind: u8) -> bool {
    matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
    )
}

/// A packet the data plane reads and rewrites in place.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The network protocol of a packet that starts with its IP header
    /// (no link-layer header); `None` for an Ethernet frame.
    fn l3_proto(&self) -> Option<u16>;
    /// Move the packet's start by `delta` bytes (negative: room in front).
    /// Every packet pointer taken before is stale afterwards.
    fn adjust_head(&self, delta: i32) -> Result<(), u32>;

    /// Account in the transport checksum at `check` (`off` bytes into the
    /// packet) for a rewrite already made: `pseudo` is what it added to
    /// the pseudo-header's sum (the addresses), `segment` what it added to
    /// the segment's own bytes (the ports), both unfolded as
    /// `lb_common::csum::delta16`/`delta32` give them. `udp`: a zero
    /// checksum means none and stays zero, and a computed zero is sent as
    /// all ones. Every packet pointer taken before is stale afterwards.
    ///
    /// A frame's checksum is complete, so it is updated in place. (In
    /// generic mode XDP runs on a socket buffer, but the kernel merges no
    /// segments (GRO) under a generic program. The devices that hand over
    /// a local sender's partial checksum, veth and tap, have native XDP;
    /// a veth whose peer's MTU exceeds a page, or whose peer has more
    /// transmit queues than it has receive queues, refuses it, and lb on
    /// such a port would mistranslate a peer's offloaded TCP: a known
    /// limit.)
    #[inline(always)]
    fn resum_l4(
        &self,
        check: *mut [u8; 2],
        _off: usize,
        udp: bool,
        pseudo: u32,
        segment: u32,
    ) -> Result<(), u32> {
        // SAFETY: the caller bounds-checked `check` (`ptr_at`).
        unsafe {
            let old = u16::from_ne_bytes(*check);
            if udp && old == 0 {
                return Ok(());
            }
            let new = csum::apply(old, pseudo + segment);
            *check = if udp { csum::udp(new) } else { new }.to_ne_bytes();
        }
        Ok(())
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn l3_proto(&self) -> Option<u16> {
        None
    }

    #[inline(always)]
    fn adjust_head(&self, delta: i32) -> Result<(), u32> {
        // SAFETY: the helper checks that the new head stays within the
        // buffer.
        if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(self.as_ptr().cast(), delta) } != 0 {
            return Err(reason::PASS_MALFORMED);
        }
        Ok(())
    }
}

/// A packet at tc ingress of an L3 device: its IP header first.
pub struct L3Packet<'a> {
    ctx: &'a TcContext,
    proto: u16,
}

impl<'a> L3Packet<'a> {
    /// The packet of `ctx`, made readable directly (its bytes pulled into
    /// the linear part of the socket buffer); `None` for a protocol that
    /// is not IP, or when it cannot be pulled.
    #[inline(always)]
    pub fn of(ctx: &'a TcContext) -> Option<L3Packet<'a>> {
        let skb = ctx.skb.skb;
        // SAFETY: reading the context's fields.
        let (len, proto) = unsafe { ((*skb).len, u16::from_be((*skb).protocol as u16)) };
        if proto != ETH_P_IPV4 && proto != ETH_P_IPV6 {
            return None;
        }
        // SAFETY: the helper checks `len` against the packet.
        if unsafe { bpf_skb_pull_data(skb.cast(), len) } != 0 {
            return None;
        }
        Some(L3Packet { ctx, proto })
    }
}

impl Frame for L3Packet<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn l3_proto(&self) -> Option<u16> {
        Some(self.proto)
    }

    /// Only room in front (a link-layer header to push before sending the
    /// packet to an Ethernet device); taking bytes off is never needed.
    #[inline(always)]
    fn adjust_head(&self, delta: i32) -> Result<(), u32> {
        if delta > 0 {
            return Err(reason::PASS_MALFORMED);
        }
        // SAFETY: the helper grows the buffer as needed and checks `len`.
        if unsafe { bpf_skb_change_head(self.ctx.skb.skb.cast(), delta.unsigned_abs(), 0) } != 0 {
            return Err(reason::PASS_MALFORMED);
        }
        Ok(())
    }

    /// By the kernel's helper: a packet merged from several segments (GRO:
    /// kernel WireGuard, a modem driver) carries a partial checksum, whose
    /// field holds the pseudo-header's sum alone, for the device that sends
    /// it on to finish; only an address change moves it. The helper knows
    /// which kind of checksum the packet has (and keeps a complete one's
    /// running sum right too).
    #[inline(always)]
    fn resum_l4(
        &self,
        _check: *mut [u8; 2],
        off: usize,
        udp: bool,
        pseudo: u32,
        segment: u32,
    ) -> Result<(), u32> {
        let skb = self.ctx.skb.skb.cast();
        let keep_none = if udp {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        // A size of 0 in the flags: `to` is a sum to add, `from` unused.
        for (diff, pseudo_hdr) in [(pseudo, u64::from(BPF_F_PSEUDO_HDR)), (segment, 0)] {
            // SAFETY: the helper checks `off` against the packet.
            let rc = unsafe {
                bpf_l4_csum_replace(skb, off as u32, 0, u64::from(diff), pseudo_hdr | keep_none)
            };
            if rc != 0 {
                // The address is rewritten already.
                return Err(reason::DROP_UNFINISHED);
            }
        }
        Ok(())
    }
}

/// The IP packet inside a frame from a wrapped uplink (a VLAN tag, a PPPoE
/// session: `lb_common::encap`), read as if it had no link-layer header:
/// offsets count from its IP header. Moving its head moves the frame's,
/// from the IP header: room for a new Ethernet header is made by dropping
/// the uplink's.
pub struct Inner<'a> {
    ctx: &'a XdpContext,
    /// Where the IP header starts in the frame; 0 once the head moved.
    off: core::cell::Cell<usize>,
    proto: u16,
}

impl<'a> Inner<'a> {
    /// The packet of `ctx` whose IP header (of EtherType `proto`) starts
    /// at `off`, at most `lb_common::encap::MAX_LEN`.
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext, off: usize, proto: u16) -> Inner<'a> {
        Inner {
            ctx,
            off: core::cell::Cell::new(off.min(lb_common::encap::MAX_LEN)),
            proto,
        }
    }
}

impl Frame for Inner<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data() + self.off.get()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn l3_proto(&self) -> Option<u16> {
        Some(self.proto)
    }

    #[inline(always)]
    fn adjust_head(&self, delta: i32) -> Result<(), u32> {
        Frame::adjust_head(self.ctx, self.off.get() as i32 + delta)?;
        self.off.set(0);
        Ok(())
    }
}

/// A pointer to a `T` at `offset` bytes into the packet, if the packet is
/// long enough to hold it and `offset` is aligned for a `T`.
///
/// The headers are declared 2-byte aligned, so that the compiler reads a
/// 16-bit field, or an address, a half word at a time rather than a byte
/// at a time. Every header lb reads sits at an even offset (Ethernet's 14
/// bytes, tags and PPPoE's 4 and 8, IP options in 4-byte words) of a frame
/// the kernel starts at an even address (behind its XDP headroom of 256
/// bytes, or a driver's NET_IP_ALIGN of 0 or 2). The offset is checked
/// here; the start cannot be (the verifier allows no arithmetic but
/// addition on a packet pointer), and a wrong one would cost nothing on
/// x86 and arm64, which load misaligned words.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Result<*mut T, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end || offset % align_of::<T>() != 0 {
        return Err(reason::PASS_MALFORMED);
    }
    Ok((start + offset) as *mut T)
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the transport header.
    First,
    /// Any later fragment: no transport header, only more payload.
    Later,
}

/// Where the headers of an IPv4 packet are.
pub struct Ipv4Packet {
    /// Offset of the IPv4 header (14, or 18 behind a VLAN tag).
    pub l3_off: usize,
    /// Offset of the TCP/UDP/ICMP header.
    pub l4_off: usize,
    pub ip: *mut Ipv4Hdr,
    pub proto: u8,
    /// 802.1Q tag control of a tagged frame, zero otherwise.
    pub vlan_tci: [u8; 2],
    pub fragment: Fragment,
}

impl Ipv4Packet {
    /// Whether a transport header follows the IPv4 header (not in a later
    /// fragment).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.fragment != Fragment::Later
    }

    /// Whether the packet carried an 802.1Q tag.
    #[inline(always)]
    pub fn tagged(&self) -> bool {
        self.l3_off != size_of::<EthHdr>()
    }

    /// Whether an Ethernet frame's tag is still in front of the packet
    /// (never for a frame read past its wrapping, or without a link
    /// layer: those start at the packet).
    #[inline(always)]
    pub fn behind_a_tag(&self) -> bool {
        self.l3_off == size_of::<EthHdr>() + size_of::<VlanHdr>()
    }
}

/// The network protocol of a frame, behind one VLAN tag at most; 0 for a
/// frame too short to say. (A plain value rather than a `Result`: the
/// verifier must never see a branch on a register the error path left
/// unset.)
#[inline(always)]
pub fn ether_type<C: Frame>(ctx: &C) -> u16 {
    if let Some(proto) = ctx.l3_proto() {
        return proto;
    }
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return 0;
    };
    // SAFETY: `ptr_at` checked the bounds.
    let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
        return ether_type;
    }
    match ptr_at::<VlanHdr>(ctx, size_of::<EthHdr>()) {
        // SAFETY: as above.
        Ok(vlan) => u16::from_be_bytes(unsafe { (*vlan).ether_type }),
        Err(_) => 0,
    }
}

/// Whether the frame's outer tag is a hand-off note's (VID 4095, which
/// 802.1Q reserves: see `lb_common::egress::note`). Only lb's own XDP
/// programs write one, on the way to lb's tc program; one that arrives
/// is forged.
#[inline(always)]
pub fn note_tagged(ctx: &XdpContext) -> bool {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the bounds.
    let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
        return false;
    }
    match ptr_at::<VlanHdr>(ctx, size_of::<EthHdr>()) {
        // SAFETY: as above.
        Ok(vlan) => note::marks(u16::from_be_bytes(unsafe { (*vlan).tci })),
        Err(_) => false,
    }
}

/// Where the headers of an IPv6 packet are. Only packets whose first
/// next header is the transport's are parsed: the fast path takes no
/// extension header (fragments, routing headers, ESP go to the kernel).
pub struct Ipv6Packet {
    /// Offset of the IPv6 header (14, or 18 behind a VLAN tag).
    pub l3_off: usize,
    /// Offset of the TCP/UDP/ICMPv6 header.
    pub l4_off: usize,
    pub ip: *mut Ipv6Hdr,
    pub proto: u8,
    /// 802.1Q tag control of a tagged frame, zero otherwise.
    pub vlan_tci: [u8; 2],
}

impl Ipv6Packet {
    /// Whether the packet carried an 802.1Q tag.
    #[inline(always)]
    pub fn tagged(&self) -> bool {
        self.l3_off != size_of::<EthHdr>()
    }

    /// Whether an Ethernet frame's tag is still in front of the packet
    /// (never for a frame read past its wrapping, or without a link
    /// layer: those start at the packet).
    #[inline(always)]
    pub fn behind_a_tag(&self) -> bool {
        self.l3_off == size_of::<EthHdr>() + size_of::<VlanHdr>()
    }
}

/// Parse Ethernet (one VLAN tag allowed) and IPv6 carrying TCP, UDP or
/// ICMPv6 directly. `Err` is the reason to give it to the kernel.
#[inline(always)]
pub fn ipv6<C: Frame>(ctx: &C) -> Result<Ipv6Packet, u32> {
    let (ether_type, l3_off, vlan_tci) = link(ctx)?;
    if ether_type != ETH_P_IPV6 {
        return Err(reason::PASS_NOT_IPV4);
    }
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: `ptr_at` checked the bounds, for this and every read below.
    if unsafe { (*ip).version_class_flow[0] } >> 4 != 6 {
        return Err(reason::PASS_MALFORMED);
    }
    let payload_len = usize::from(u16::from_be_bytes(unsafe { (*ip).payload_len }));
    let l4_off = l3_off + size_of::<Ipv6Hdr>();
    // A jumbogram (payload length 0) is never forwarded here either.
    if payload_len == 0 || l4_off + payload_len > ctx.data_end() - ctx.data() {
        return Err(reason::PASS_MALFORMED);
    }
    let proto = unsafe { (*ip).next_header };
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 => {}
        IPPROTO_FRAGMENT => return Err(reason::PASS_FRAGMENT),
        _ => return Err(reason::PASS_UNSUPPORTED),
    }
    Ok(Ipv6Packet {
        l3_off,
        l4_off,
        ip,
        proto,
        vlan_tci,
    })
}

/// Source and destination port of a TCP or UDP packet over IPv6, or the
/// identifier (and zero) of an ICMPv6 echo of `echo_kind`.
#[inline(always)]
pub fn ports6<C: Frame>(
    ctx: &C,
    pkt: &Ipv6Packet,
    echo_kind: u8,
) -> Result<([u8; 2], [u8; 2]), u32> {
    match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, pkt.l4_off)?;
            // SAFETY: bounds-checked; TCP and UDP share the port layout.
            Ok(unsafe { ((*udp).src, (*udp).dst) })
        }
        _ => {
            let icmp: *const IcmpHdr = ptr_at(ctx, pkt.l4_off)?;
            // SAFETY: bounds-checked.
            if unsafe { (*icmp).kind } != echo_kind {
                return Err(reason::PASS_UNSUPPORTED);
            }
            Ok((unsafe { (*icmp).id }, [0, 0]))
        }
    }
}

/// TCP flags of a TCP packet over IPv6, zero for anything else.
#[inline(always)]
pub fn tcp_flags6<C: Frame>(ctx: &C, pkt: &Ipv6Packet) -> u8 {
    if pkt.proto != IPPROTO_TCP {
        return 0;
    }
    match ptr_at::<TcpHdr>(ctx, pkt.l4_off) {
        // SAFETY: bounds-checked.
        Ok(tcp) => unsafe { (*tcp).flags },
        Err(_) => 0,
    }
}

/// Parse Ethernet (one VLAN tag allowed) and IPv4 (options allowed). `Err`
/// carries the reason to give the packet to the kernel: not IPv4, or a
/// header that does not fit the frame. Fragments are parsed like whole
/// packets; [`Ipv4Packet::fragment`] says which they are.
#[inline(always)]
pub fn ipv4<C: Frame>(ctx: &C) -> Result<Ipv4Packet, u32> {
    let (ether_type, l3_off, vlan_tci) = link(ctx)?;
    if ether_type != ETH_P_IPV4 {
        return Err(reason::PASS_NOT_IPV4);
    }

    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: `ptr_at` checked the bounds, for this and every read below.
    let version_ihl = unsafe { (*ip).version_ihl };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Err(reason::PASS_MALFORMED);
    }
    let total_len = usize::from(u16::from_be_bytes(unsafe { (*ip).total_len }));
    if total_len < ihl || l3_off + total_len > ctx.data_end() - ctx.data() {
        return Err(reason::PASS_MALFORMED);
    }
    let frag = u16::from_be_bytes(unsafe { (*ip).frag });
    let fragment = if frag & IP_OFFSET != 0 {
        Fragment::Later
    } else if frag & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    let proto = unsafe { (*ip).proto };
    Ok(Ipv4Packet {
        l3_off,
        l4_off: l3_off + ihl,
        ip,
        proto,
        vlan_tci,
        fragment,
    })
}

/// The link layer of a frame: its network protocol, where the network
/// header starts and the 802.1Q tag control (zero when untagged). A
/// packet without a link-layer header starts with its network header.
#[inline(always)]
fn link<C: Frame>(ctx: &C) -> Result<(u16, usize, [u8; 2]), u32> {
    if let Some(proto) = ctx.l3_proto() {
        return Ok((proto, 0, [0, 0]));
    }
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the bounds, for this and every read below.
    let mut ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    let mut l3_off = size_of::<EthHdr>();
    let mut vlan_tci = [0, 0];
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, l3_off)?;
        ether_type = u16::from_be_bytes(unsafe { (*vlan).ether_type });
        vlan_tci = unsafe { (*vlan).tci };
        l3_off += size_of::<VlanHdr>();
    }
    Ok((ether_type, l3_off, vlan_tci))
}

/// Source and destination port of a TCP or UDP packet, or the identifier
/// (and zero) of an ICMP echo of `echo_kind`; `Err` for anything else.
#[inline(always)]
pub fn ports<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    echo_kind: u8,
) -> Result<([u8; 2], [u8; 2]), u32> {
    match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, pkt.l4_off)?;
            // SAFETY: bounds-checked; TCP and UDP share the port layout.
            Ok(unsafe { ((*udp).src, (*udp).dst) })
        }
        IPPROTO_ICMP => {
            let icmp: *const IcmpHdr = ptr_at(ctx, pkt.l4_off)?;
            // SAFETY: bounds-checked.
            if unsafe { (*icmp).kind } != echo_kind {
                return Err(reason::PASS_UNSUPPORTED);
            }
            Ok((unsafe { (*icmp).id }, [0, 0]))
        }
        _ => Err(reason::PASS_UNSUPPORTED),
    }
}

/// TCP flags of a TCP packet, zero for anything else (and for a later
/// fragment, which has no TCP header).
#[inline(always)]
pub fn tcp_flags<C: Frame>(ctx: &C, pkt: &Ipv4Packet) -> u8 {
    if pkt.proto != IPPROTO_TCP || !pkt.has_l4() {
        return 0;
    }
    match ptr_at::<TcpHdr>(ctx, pkt.l4_off) {
        // SAFETY: bounds-checked.
        Ok(tcp) => unsafe { (*tcp).flags },
        Err(_) => 0,
    }
}
