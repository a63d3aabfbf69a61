//! Address and port translation of packets in place, with incremental
//! checksum updates (RFC 1624, through `lb_common::csum`).
//!
//! Owns the byte-level rewriting of IPv4, TCP, UDP and ICMP headers,
//! including the packet embedded in an ICMP error. It does not decide
//! mappings: `lan` and `wan` look those up and hand them in. The reference
//! model in `lb_common::nat` must produce the same bytes; the test-run tests
//! compare the two.

use lb_common::csum;

use crate::parse::{
    ptr_at, Field16, Frame, IcmpHdr, Ipv4Hdr, Ipv4Packet, TcpHdr, UdpHdr, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP,
};

// Checksum arithmetic takes the packet's words in the CPU's byte order
// (`lb_common::csum` says why that gives the same bytes): `word16` and
// `word32` read them so, `bytes` writes a checksum back.

#[inline(always)]
fn word16(b: [u8; 2]) -> u16 {
    u16::from_ne_bytes(b)
}

#[inline(always)]
fn word32(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

#[inline(always)]
fn bytes(c: u16) -> [u8; 2] {
    c.to_ne_bytes()
}

/// Where TCP's and UDP's checksums sit in their headers.
const TCP_CHECK_OFF: usize = core::mem::offset_of!(TcpHdr, check);
const UDP_CHECK_OFF: usize = core::mem::offset_of!(UdpHdr, check);

/// A UDP checksum after an update, as sent (`lb_common::csum::udp`).
#[inline(always)]
fn udp_sum(c: u16) -> [u8; 2] {
    bytes(csum::udp(c))
}

/// Which end of the packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Source address and port: outbound (SNAT).
    Source,
    /// Destination address and port: replies coming back.
    Destination,
}

/// Rewrite one end's address and port (ICMP: the echo identifier) to
/// `addr`/`port`, and take one off the TTL (every translated packet is
/// forwarded; the caller checked that the TTL allows it), fixing the IP
/// and L4 checksums. Checks every bound before it writes: an `Err` leaves
/// the packet as it came, but for one of tc's checksum helpers failing in
/// the last step (`Frame::resum_l4`), whose packet the caller drops. Every
/// packet pointer taken before is stale afterwards.
#[inline(always)]
pub fn translate<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    end: End,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), u32> {
    // A later fragment has no transport header: its address alone changes
    // (the transport checksum, in the first fragment, covered it).
    let l4 = if pkt.has_l4() { pkt.proto } else { 0 };
    match l4 {
        IPPROTO_TCP | IPPROTO_UDP => {
            // Both begin with the two ports; their checksums sit apart.
            let udp = l4 == IPPROTO_UDP;
            let check_off = pkt.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
            let port_off = pkt.l4_off + if end == End::Source { 0 } else { 2 };
            let field: *mut Field16 = ptr_at(ctx, port_off)?;
            let check: *mut Field16 = ptr_at(ctx, check_off)?;
            let addr_delta = readdress(pkt, end, addr);
            // SAFETY: bounds-checked by `ptr_at`.
            let (old_port, check) = unsafe {
                let old = (*field).0;
                (*field).0 = port;
                (old, core::ptr::addr_of_mut!((*check).0))
            };
            let port_delta = csum::delta16(word16(old_port), word16(port));
            ctx.resum_l4(check, check_off, udp, addr_delta, port_delta)
        }
        IPPROTO_ICMP => {
            let icmp: *mut IcmpHdr = ptr_at(ctx, pkt.l4_off)?;
            readdress(pkt, end, addr);
            // SAFETY: bounds-checked by `ptr_at`. ICMP's checksum has no
            // pseudo-header, and no device leaves it partial.
            unsafe {
                let old_id = (*icmp).id;
                (*icmp).id = port;
                (*icmp).check = bytes(csum::replace16(
                    word16((*icmp).check),
                    word16(old_id),
                    word16(port),
                ));
            }
            Ok(())
        }
        _ => {
            readdress(pkt, end, addr);
            Ok(())
        }
    }
}

/// Rewrite one end's address in the IP header and take one off the TTL,
/// with one update of the header checksum; returns what the address
/// change adds to the sums that cover it (the IP header's, and TCP's or
/// UDP's through their pseudo-header, which holds no TTL), worked out
/// once and folded once per checksum.
#[inline(always)]
fn readdress(pkt: &Ipv4Packet, end: End, addr: [u8; 4]) -> u32 {
    let ip = pkt.ip;
    // SAFETY: `parse::ipv4` bounds-checked the IPv4 header.
    unsafe {
        let old = if end == End::Source {
            core::mem::replace(&mut (*ip).src, addr)
        } else {
            core::mem::replace(&mut (*ip).dst, addr)
        };
        (*ip).ttl = (*ip).ttl.wrapping_sub(1);
        let delta = csum::delta32(word32(old), word32(addr));
        let header = delta + csum::ttl_decrement(word16);
        (*ip).check = bytes(csum::apply(word16((*ip).check), header));
        delta
    }
}

/// The packet an ICMP error quotes: where its header is, and its fields.
pub struct Embedded {
    pub ip_off: usize,
    pub l4_off: usize,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Source and destination port, or echo identifier and zero.
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
}

/// Parse the packet quoted by the ICMP error at `pkt.l4_off`.
#[inline(always)]
pub fn embedded<C: Frame>(ctx: &C, pkt: &Ipv4Packet) -> Result<Embedded, u32> {
    let ip_off = pkt.l4_off + core::mem::size_of::<IcmpHdr>();
    let ip: *const Ipv4Hdr = ptr_at(ctx, ip_off)?;
    // SAFETY: bounds-checked, here and below.
    let (version_ihl, src, dst, proto) =
        unsafe { ((*ip).version_ihl, (*ip).src, (*ip).dst, (*ip).proto) };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < core::mem::size_of::<Ipv4Hdr>() {
        return Err(lb_common::reason::PASS_MALFORMED);
    }
    let l4_off = ip_off + ihl;
    let (src_port, dst_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            // Only the ports are sure to be quoted (RFC 792: 8 bytes).
            let ports: *const [[u8; 2]; 2] = ptr_at(ctx, l4_off)?;
            unsafe { ((*ports)[0], (*ports)[1]) }
        }
        IPPROTO_ICMP => {
            let icmp: *const IcmpHdr = ptr_at(ctx, l4_off)?;
            (unsafe { (*icmp).id }, [0, 0])
        }
        _ => return Err(lb_common::reason::PASS_UNSUPPORTED),
    };
    Ok(Embedded {
        ip_off,
        l4_off,
        src,
        dst,
        proto,
        src_port,
        dst_port,
    })
}

/// Translate an ICMP error about a NATed flow: `end` is the outer end
/// rewritten to `addr`, and the quoted packet's other end (address and
/// port) with it. [`End::Destination`]: an error from the internet about a
/// packet the client sent (the quote's source) goes back to the client.
/// [`End::Source`]: a client's error about a reply it got (the quote's
/// destination) goes out as from the uplink. Fixes the quoted IP checksum,
/// the quoted transport checksum if quoted (a UDP one if in use), the ICMP
/// checksum and the outer IP checksum, and takes one off the outer TTL.
/// An echo is quoted with its identifier as its source port, so only
/// [`End::Destination`] takes one.
#[inline(always)]
pub fn translate_icmp_error<C: Frame>(
    ctx: &C,
    pkt: &Ipv4Packet,
    inner: &Embedded,
    end: End,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), u32> {
    if end == End::Source && inner.proto == IPPROTO_ICMP {
        return Err(lb_common::reason::PASS_UNSUPPORTED);
    }
    // The quoted end: the other one than the outer.
    let (quoted_addr, quoted_port, port_off) = match end {
        End::Destination if inner.proto == IPPROTO_ICMP => {
            (inner.src, inner.src_port, inner.l4_off + 4)
        }
        End::Destination => (inner.src, inner.src_port, inner.l4_off),
        End::Source => (inner.dst, inner.dst_port, inner.l4_off + 2),
    };
    let icmp: *mut IcmpHdr = ptr_at(ctx, pkt.l4_off)?;
    let inner_ip: *mut Ipv4Hdr = ptr_at(ctx, inner.ip_off)?;
    let port_field: *mut [u8; 2] = ptr_at(ctx, port_off)?;
    // SAFETY: bounds-checked by `ptr_at` (and `parse::ipv4` for `pkt.ip`),
    // all before the first write.
    unsafe {
        let mut icmp_c = word16((*icmp).check);

        // Quoted address, and the quoted header's checksum.
        let old_inner_c = (*inner_ip).check;
        match end {
            End::Destination => (*inner_ip).src = addr,
            End::Source => (*inner_ip).dst = addr,
        }
        let inner_c = bytes(csum::replace32(
            word16(old_inner_c),
            word32(quoted_addr),
            word32(addr),
        ));
        (*inner_ip).check = inner_c;
        icmp_c = csum::replace32(icmp_c, word32(quoted_addr), word32(addr));
        icmp_c = csum::replace16(icmp_c, word16(old_inner_c), word16(inner_c));

        // Quoted port (or echo identifier).
        *port_field = port;
        icmp_c = csum::replace16(icmp_c, word16(quoted_port), word16(port));

        // The quoted transport checksum, when the quote reaches it (RFC 792
        // promises 8 bytes; most routers quote more): the client then gets
        // back what it sent, as the kernel's NAT gives it.
        let port_delta = csum::delta16(word16(quoted_port), word16(port));
        let addr_delta = csum::delta32(word32(quoted_addr), word32(addr));
        let quoted_check: Option<*mut [u8; 2]> = match inner.proto {
            IPPROTO_UDP => ptr_at::<UdpHdr>(ctx, inner.l4_off)
                .ok()
                .map(|udp| core::ptr::addr_of_mut!((*udp).check))
                .filter(|check| **check != [0, 0]),
            IPPROTO_TCP => ptr_at::<TcpHdr>(ctx, inner.l4_off)
                .ok()
                .map(|tcp| core::ptr::addr_of_mut!((*tcp).check)),
            // An echo's identifier is in its own checksum, without a
            // pseudo-header.
            _ => ptr_at::<IcmpHdr>(ctx, inner.l4_off)
                .ok()
                .map(|echo| core::ptr::addr_of_mut!((*echo).check)),
        };
        if let Some(check) = quoted_check {
            let old = *check;
            let delta = if inner.proto == IPPROTO_ICMP {
                port_delta
            } else {
                port_delta + addr_delta
            };
            let new = csum::apply(word16(old), delta);
            let new = if inner.proto == IPPROTO_UDP {
                udp_sum(new)
            } else {
                bytes(new)
            };
            *check = new;
            icmp_c = csum::replace16(icmp_c, word16(old), word16(new));
        }
        (*icmp).check = bytes(icmp_c);
    }
    // The outer end, and its TTL.
    readdress(pkt, end, addr);
    Ok(())
}
