//! Source NAT: which port a new mapping takes, and a reference model of the
//! translation the XDP programs perform.
//!
//! The model works on whole frames in plain Rust and recomputes every
//! checksum from scratch; the kernel side updates them incrementally. Tests
//! run crafted frames through both and compare the bytes, so the two
//! implementations check each other. The model is for tests and tools only:
//! nothing on the fast path calls it.

use crate::{csum, maps::Settings};

/// How many ports a new flow tries before it gives up (bounded, for the
/// verifier): the client's own, then this many minus one from the range.
pub const PORT_ATTEMPTS: u32 = 16;

/// The NAT port to try at attempt `i` for a client port, or `None` when
/// that attempt has nothing to try. Attempt 0 keeps the client's port,
/// unless it is zero or one the router's own sockets may use; later
/// attempts walk the NAT range from a per-flow starting point `spread` (a
/// hash), so that colliding flows fan out instead of queueing.
#[inline(always)]
pub fn candidate(i: u32, client_port: u16, spread: u32, s: &Settings) -> Option<u16> {
    if i == 0 {
        let local = client_port >= s.local_port_min && client_port <= s.local_port_max;
        return (client_port != 0 && !local).then_some(client_port);
    }
    if s.nat_port_max < s.nat_port_min {
        return None;
    }
    let size = u32::from(s.nat_port_max - s.nat_port_min) + 1;
    let offset = spread.wrapping_add(i - 1) % size;
    Some(s.nat_port_min + offset as u16)
}

/// Ethernet + optional 802.1Q + IPv4 offsets of a frame.
struct Frame {
    l3: usize,
    l4: usize,
    proto: u8,
}

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

fn parse(f: &[u8]) -> Option<Frame> {
    let mut l3 = ETH_LEN;
    let mut ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 += VLAN_LEN;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ihl = usize::from(f.get(l3)? & 0x0f) * 4;
    let proto = *f.get(l3 + 9)?;
    Some(Frame {
        l3,
        l4: l3 + ihl,
        proto,
    })
}

fn ip_total_len(f: &[u8], l3: usize) -> usize {
    usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]))
}

/// Recompute the IPv4 header checksum at `l3`.
fn fix_ip(f: &mut [u8], l3: usize) {
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    f[l3 + 10..l3 + 12].fill(0);
    let c = csum::checksum(&f[l3..l3 + ihl], 0);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Recompute the TCP/UDP/ICMP checksum of the segment at `l4`.
fn fix_l4(f: &mut [u8], fr: &Frame) {
    let end = fr.l3 + ip_total_len(f, fr.l3);
    let (src, dst) = (addr(f, fr.l3 + 12), addr(f, fr.l3 + 16));
    let off = match fr.proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    if fr.proto == UDP && f[fr.l4 + 6..fr.l4 + 8] == [0, 0] {
        return; // no checksum: leave it so
    }
    f[fr.l4 + off..fr.l4 + off + 2].fill(0);
    let initial = match fr.proto {
        TCP | UDP => csum::pseudo_header(src, dst, fr.proto, (end - fr.l4) as u16),
        _ => 0,
    };
    let c = csum::checksum(&f[fr.l4..end], initial);
    let c = if fr.proto == UDP { csum::udp(c) } else { c };
    f[fr.l4 + off..fr.l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

fn addr(f: &[u8], at: usize) -> [u8; 4] {
    [f[at], f[at + 1], f[at + 2], f[at + 3]]
}

/// What an outbound translation writes.
#[derive(Clone, Copy, Debug)]
pub struct Outbound {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
}

/// Model of `lan_ingress` forwarding a TCP/UDP/ICMP-echo packet: the VLAN
/// tag removed, new MACs, TTL minus one, source address and port (or echo
/// identifier) translated, checksums right. Writes into `out` and returns
/// the new length, or `None` for a frame it does not translate.
pub fn outbound(frame: &[u8], t: &Outbound, out: &mut [u8]) -> Option<usize> {
    let fr = parse(frame)?;
    let len = frame.len() - (fr.l3 - ETH_LEN);
    let out = out.get_mut(..len)?;
    out[..6].copy_from_slice(&t.dst_mac);
    out[6..12].copy_from_slice(&t.src_mac);
    out[12..14].copy_from_slice(&[0x08, 0x00]);
    out[ETH_LEN..].copy_from_slice(&frame[fr.l3..]);
    let fr = Frame {
        l3: ETH_LEN,
        l4: fr.l4 - (fr.l3 - ETH_LEN),
        proto: fr.proto,
    };
    out[fr.l3 + 8] = out[fr.l3 + 8].checked_sub(1)?;
    out[fr.l3 + 12..fr.l3 + 16].copy_from_slice(&t.nat_addr);
    let port_at = if fr.proto == ICMP { fr.l4 + 4 } else { fr.l4 };
    out[port_at..port_at + 2].copy_from_slice(&t.nat_port.to_be_bytes());
    fix_ip(out, fr.l3);
    fix_l4(out, &fr);
    Some(len)
}

/// What an inbound translation writes.
#[derive(Clone, Copy, Debug)]
pub struct Inbound {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 802.1Q tag to push, or zero for an untagged LAN.
    pub vlan_tci: u16,
    pub client_addr: [u8; 4],
    pub client_port: u16,
}

/// Model of `wan_ingress` translating a reply back: new MACs (and the
/// client's VLAN tag), TTL minus one, destination address and port (or echo
/// identifier) back to the client's.
pub fn inbound(frame: &[u8], t: &Inbound, out: &mut [u8]) -> Option<usize> {
    let (fr, len) = relink(frame, t, out)?;
    out[fr.l3 + 16..fr.l3 + 20].copy_from_slice(&t.client_addr);
    let port_at = if fr.proto == ICMP {
        fr.l4 + 4
    } else {
        fr.l4 + 2
    };
    out[port_at..port_at + 2].copy_from_slice(&t.client_port.to_be_bytes());
    fix_ip(out, fr.l3);
    fix_l4(out, &fr);
    Some(len)
}

/// Model of `wan_ingress` translating an ICMP error about a NATed packet:
/// the outer destination and the embedded packet's source address and port
/// go back to the client's; the embedded IP checksum is recomputed, the
/// embedded transport checksum updated where quoted (a UDP one if in
/// use), the outer ICMP checksum recomputed.
pub fn icmp_error_inbound(frame: &[u8], t: &Inbound, out: &mut [u8]) -> Option<usize> {
    let (fr, len) = relink(frame, t, out)?;
    // What the error quotes ends with the frame.
    let out = &mut out[..len];
    out[fr.l3 + 16..fr.l3 + 20].copy_from_slice(&t.client_addr);
    let inner = fr.l4 + 8;
    let inner_l4 = inner + usize::from(out[inner] & 0x0f) * 4;
    let inner_proto = out[inner + 9];
    let old_addr = u32::from_be_bytes(addr(out, inner + 12));
    out[inner + 12..inner + 16].copy_from_slice(&t.client_addr);
    let port_at = if inner_proto == ICMP {
        inner_l4 + 4
    } else {
        inner_l4
    };
    let old_port = u16::from_be_bytes([out[port_at], out[port_at + 1]]);
    out[port_at..port_at + 2].copy_from_slice(&t.client_port.to_be_bytes());
    fix_ip(out, inner);
    // The quoted transport checksum, where the quote holds it: UDP's (if
    // in use) and TCP's cover the address (pseudo-header) and the port, an
    // echo's its identifier.
    let check_at = inner_l4
        + match inner_proto {
            UDP => 6,
            TCP => 16,
            _ => 2,
        };
    if let Some(field) = out.get(check_at..check_at + 2) {
        let c = u16::from_be_bytes([field[0], field[1]]);
        if !(inner_proto == UDP && c == 0) {
            let mut c = csum::replace16(c, old_port, t.client_port);
            if inner_proto != ICMP {
                c = csum::replace32(c, old_addr, u32::from_be_bytes(t.client_addr));
            }
            if inner_proto == UDP {
                c = csum::udp(c);
            }
            out[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    fix_ip(out, fr.l3);
    fix_l4(out, &fr);
    Some(len)
}

/// Copy `frame` into `out` with the new Ethernet header (and VLAN tag) and
/// TTL minus one; the offsets in `out` and its length.
fn relink(frame: &[u8], t: &Inbound, out: &mut [u8]) -> Option<(Frame, usize)> {
    let fr = parse(frame)?;
    let l3 = if t.vlan_tci != 0 {
        ETH_LEN + VLAN_LEN
    } else {
        ETH_LEN
    };
    let len = l3 + frame.len() - fr.l3;
    let out = out.get_mut(..len)?;
    out[..6].copy_from_slice(&t.dst_mac);
    out[6..12].copy_from_slice(&t.src_mac);
    if t.vlan_tci != 0 {
        out[12..14].copy_from_slice(&[0x81, 0x00]);
        out[14..16].copy_from_slice(&t.vlan_tci.to_be_bytes());
    }
    out[l3 - 2..l3].copy_from_slice(&[0x08, 0x00]);
    out[l3..].copy_from_slice(&frame[fr.l3..]);
    out[l3 + 8] = out[l3 + 8].checked_sub(1)?;
    Some((
        Frame {
            l3,
            l4: fr.l4 - fr.l3 + l3,
            proto: fr.proto,
        },
        len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            nat_port_min: 20_000,
            nat_port_max: 20_009,
            local_port_min: 32_768,
            local_port_max: 60_999,
            ..Settings::default()
        }
    }

    #[test]
    fn keeps_client_port_unless_the_router_may_use_it() {
        let s = settings();
        assert_eq!(candidate(0, 5353, 0, &s), Some(5353));
        assert_eq!(candidate(0, 40_000, 0, &s), None);
        assert_eq!(candidate(0, 0, 0, &s), None);
    }

    #[test]
    fn later_attempts_stay_in_range_and_differ() {
        let s = settings();
        let mut seen = [false; 10];
        for i in 1..=10 {
            let p = candidate(i, 40_000, 7, &s).expect("a port");
            assert!((20_000..=20_009).contains(&p));
            seen[usize::from(p - 20_000)] = true;
        }
        assert!(seen.iter().all(|&s| s), "ten attempts cover the ten ports");
    }

    /// A UDP packet, optionally tagged, with correct checksums.
    fn udp_frame(vlan: bool) -> [u8; 64] {
        let mut f = [0u8; 64];
        let mut at = 12;
        if vlan {
            f[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
            at = 16;
        }
        f[at..at + 2].copy_from_slice(&[0x08, 0x00]);
        let l3 = at + 2;
        let total = 20 + 8 + 4;
        f[l3] = 0x45;
        f[l3 + 2..l3 + 4].copy_from_slice(&(total as u16).to_be_bytes());
        f[l3 + 8] = 64;
        f[l3 + 9] = UDP;
        f[l3 + 12..l3 + 16].copy_from_slice(&[10, 10, 0, 2]);
        f[l3 + 16..l3 + 20].copy_from_slice(&[198, 51, 100, 10]);
        let l4 = l3 + 20;
        f[l4..l4 + 2].copy_from_slice(&40_000u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&53u16.to_be_bytes());
        f[l4 + 4..l4 + 6].copy_from_slice(&12u16.to_be_bytes());
        f[l4 + 6..l4 + 8].copy_from_slice(&[0xff, 0xff]); // non-zero, fixed below
        f[l4 + 8..l4 + 12].copy_from_slice(b"ping");
        fix_ip(&mut f, l3);
        fix_l4(&mut f, &Frame { l3, l4, proto: UDP });
        f
    }

    fn verifies_udp(f: &[u8], l3: usize) -> bool {
        let l4 = l3 + 20;
        let len = ip_total_len(f, l3) - 20;
        let ph = csum::pseudo_header(addr(f, l3 + 12), addr(f, l3 + 16), UDP, len as u16);
        csum::verifies(&f[l3..l3 + 20], 0) && csum::verifies(&f[l4..l4 + len], ph)
    }

    #[test]
    fn outbound_then_inbound_round_trips_with_valid_checksums() {
        let frame = udp_frame(true);
        let mut out = [0u8; 128];
        let t = Outbound {
            src_mac: [2; 6],
            dst_mac: [3; 6],
            nat_addr: [100, 64, 1, 2],
            nat_port: 20_001,
        };
        let len = outbound(&frame, &t, &mut out).expect("translates");
        assert_eq!(len, frame.len() - 4, "tag removed");
        assert!(verifies_udp(&out[..len], 14));
        assert_eq!(addr(&out, 14 + 12), [100, 64, 1, 2]);
        assert_eq!(out[14 + 8], 63);

        // The server's reply: swap addresses and ports.
        let mut reply = [0u8; 60];
        reply[..len].copy_from_slice(&out[..len]);
        reply[14 + 12..14 + 16].copy_from_slice(&[198, 51, 100, 10]);
        reply[14 + 16..14 + 20].copy_from_slice(&[100, 64, 1, 2]);
        reply[34..36].copy_from_slice(&53u16.to_be_bytes());
        reply[36..38].copy_from_slice(&20_001u16.to_be_bytes());
        fix_ip(&mut reply, 14);
        fix_l4(
            &mut reply,
            &Frame {
                l3: 14,
                l4: 34,
                proto: UDP,
            },
        );
        let mut back = [0u8; 128];
        let t = Inbound {
            src_mac: [4; 6],
            dst_mac: [5; 6],
            vlan_tci: 42,
            client_addr: [10, 10, 0, 2],
            client_port: 40_000,
        };
        let n = inbound(&reply[..len], &t, &mut back).expect("translates");
        assert_eq!(n, len + 4, "tag pushed");
        assert!(verifies_udp(&back[..n], 18));
        assert_eq!(addr(&back, 18 + 16), [10, 10, 0, 2]);
        assert_eq!(
            back[40..42],
            40_000u16.to_be_bytes(),
            "destination port back to the client's"
        );
    }
}
