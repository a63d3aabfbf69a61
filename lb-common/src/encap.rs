//! The link-layer headers of an uplink that is not plain Ethernet: an
//! 802.1Q tag (a VLAN-tagged WAN, e.g. VLAN 7 for many fibre lines), a
//! PPPoE session header (RFC 2516: DSL and many fibre lines), or both, in
//! that order, between the Ethernet header and the IP packet.
//!
//! Pure: what the data plane pushes in front of a packet leaving by such
//! an uplink ([`header`]) and where the IP packet of a frame arriving on
//! it starts ([`inner`]). The same code the XDP programs run, tested here
//! against frames written out by hand from the RFCs.

/// Ethernet header.
pub const ETH_LEN: usize = 14;
/// An 802.1Q tag: TCI and the inner EtherType.
pub const VLAN_LEN: usize = 4;
/// PPPoE session header (6) and the PPP protocol field (2).
pub const PPPOE_LEN: usize = 8;
/// The most any uplink's headers take: Ethernet, a tag and PPPoE.
pub const MAX_LEN: usize = ETH_LEN + VLAN_LEN + PPPOE_LEN;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
/// PPPoE session stage (discovery, 0x8863, is the kernel's).
pub const ETH_P_PPP_SES: u16 = 0x8864;
/// PPPoE version 1, type 1 (RFC 2516 section 4).
const PPPOE_VER_TYPE: u8 = 0x11;
/// Code of a session frame.
const PPPOE_CODE_SESSION: u8 = 0;
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;

/// How an uplink wraps its IP packets. Zero means absent: VLAN 0 is a
/// priority tag, not a VLAN, and session 0 is reserved (RFC 2516).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encap {
    /// 802.1Q tag control (priority and VLAN ID), or 0.
    pub vlan_tci: u16,
    /// PPPoE session ID, or 0.
    pub pppoe_session: u16,
}

impl Encap {
    /// Bytes between the Ethernet header and the IP packet.
    #[inline(always)]
    pub const fn extra_len(&self) -> usize {
        (if self.vlan_tci != 0 { VLAN_LEN } else { 0 })
            + (if self.pppoe_session != 0 {
                PPPOE_LEN
            } else {
                0
            })
    }

    /// Bytes of headers in front of the IP packet.
    #[inline(always)]
    pub const fn len(&self) -> usize {
        ETH_LEN + self.extra_len()
    }

    /// Whether the uplink is plain Ethernet.
    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.vlan_tci == 0 && self.pppoe_session == 0
    }
}

/// The headers in front of an IP packet of `ip_len` bytes and EtherType
/// `ether_type` ([`ETH_P_IPV4`] or [`ETH_P_IPV6`]) leaving by an uplink
/// wrapped as `encap`, from `src` to `dst`: the first [`Encap::len`] bytes
/// of the result. `None` for another protocol, or a packet too long for a
/// PPPoE length.
#[inline(always)]
pub fn header(
    encap: &Encap,
    src: [u8; 6],
    dst: [u8; 6],
    ether_type: u16,
    ip_len: usize,
) -> Option<[u8; MAX_LEN]> {
    let ppp_proto = match ether_type {
        ETH_P_IPV4 => PPP_IPV4,
        ETH_P_IPV6 => PPP_IPV6,
        _ => return None,
    };
    let mut out = [0u8; MAX_LEN];
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    let mut at = 12;
    if encap.vlan_tci != 0 {
        out[at..at + 2].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        out[at + 2..at + 4].copy_from_slice(&encap.vlan_tci.to_be_bytes());
        at += VLAN_LEN;
    }
    if encap.pppoe_session != 0 {
        // The PPPoE length counts the PPP protocol field and the packet.
        let length = u16::try_from(ip_len + 2).ok()?;
        out[at..at + 2].copy_from_slice(&ETH_P_PPP_SES.to_be_bytes());
        out[at + 2] = PPPOE_VER_TYPE;
        out[at + 3] = PPPOE_CODE_SESSION;
        out[at + 4..at + 6].copy_from_slice(&encap.pppoe_session.to_be_bytes());
        out[at + 6..at + 8].copy_from_slice(&length.to_be_bytes());
        out[at + 8..at + 10].copy_from_slice(&ppp_proto.to_be_bytes());
    } else {
        out[at..at + 2].copy_from_slice(&ether_type.to_be_bytes());
    }
    Some(out)
}

/// Where the IP packet of a frame that arrived on an uplink wrapped as
/// `encap` starts, and its EtherType, from the frame's first
/// [`MAX_LEN`] bytes (`head`, zero-padded when the frame is shorter);
/// `None` unless the frame is wrapped exactly so (another VLAN, another
/// session, PPPoE discovery or LCP: the kernel's).
#[inline(always)]
pub fn inner(encap: &Encap, head: &[u8; MAX_LEN]) -> Option<(usize, u16)> {
    let be16 = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    let mut at = 12;
    if encap.vlan_tci != 0 {
        // The VLAN ID must match; the priority bits may differ.
        if be16(at) != ETH_P_8021Q || be16(at + 2) & 0x0fff != encap.vlan_tci & 0x0fff {
            return None;
        }
        at += VLAN_LEN;
    }
    if encap.pppoe_session == 0 {
        return Some((at + 2, be16(at)));
    }
    if be16(at) != ETH_P_PPP_SES
        || head[at + 2] != PPPOE_VER_TYPE
        || head[at + 3] != PPPOE_CODE_SESSION
        || be16(at + 4) != encap.pppoe_session
    {
        return None;
    }
    let ether_type = match be16(at + 8) {
        PPP_IPV4 => ETH_P_IPV4,
        PPP_IPV6 => ETH_P_IPV6,
        _ => return None,
    };
    Some((at + PPPOE_LEN + 2, ether_type))
}

const _: () = assert!(core::mem::size_of::<Encap>() == 4);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, two u16s, no padding: every bit pattern is valid.
unsafe impl aya::Pod for Encap {}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    fn padded(bytes: &[u8]) -> [u8; MAX_LEN] {
        let mut out = [0u8; MAX_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }

    #[test]
    fn plain_ethernet_is_fourteen_bytes() {
        let e = Encap::default();
        assert!(e.is_empty());
        let h = header(&e, SRC, DST, ETH_P_IPV4, 60).expect("IPv4");
        assert_eq!(e.len(), 14);
        assert_eq!(&h[..14], &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        assert_eq!(inner(&e, &h), Some((14, ETH_P_IPV4)));
    }

    #[test]
    fn a_vlan_7_wan_tags_and_untags() {
        let e = Encap {
            vlan_tci: 7,
            pppoe_session: 0,
        };
        let h = header(&e, SRC, DST, ETH_P_IPV6, 60).expect("IPv6");
        // dst, src, 0x8100, TCI 0x0007, 0x86dd.
        let want = [
            2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0x00, 0x07, 0x86, 0xdd,
        ];
        assert_eq!(&h[..e.len()], &want);
        assert_eq!(inner(&e, &h), Some((18, ETH_P_IPV6)));
        // Priority 5 on VLAN 7 from the ISP: still ours.
        let mut prio = h;
        prio[14] = 0xa0;
        assert_eq!(inner(&e, &prio), Some((18, ETH_P_IPV6)));
        // VLAN 8: not.
        let mut other = h;
        other[15] = 8;
        assert_eq!(inner(&e, &other), None);
        // Untagged: not.
        assert_eq!(inner(&e, &padded(&want[..12])), None);
    }

    #[test]
    fn a_pppoe_session_on_vlan_7_as_rfc_2516_writes_it() {
        let e = Encap {
            vlan_tci: 7,
            pppoe_session: 0x1234,
        };
        assert_eq!(e.len(), 26);
        let h = header(&e, SRC, DST, ETH_P_IPV4, 1492 - 2).expect("IPv4");
        // ... 0x8100 0x0007, 0x8864, ver/type 0x11, code 0, session
        // 0x1234, length 1492 (0x05d4), PPP protocol 0x0021.
        let want = [
            2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0x00, 0x07, 0x88, 0x64, 0x11, 0x00,
            0x12, 0x34, 0x05, 0xd4, 0x00, 0x21,
        ];
        assert_eq!(h, want);
        assert_eq!(inner(&e, &h), Some((26, ETH_P_IPV4)));

        // Another session, LCP, or discovery: the kernel's.
        let mut other = h;
        other[21] = 0x35;
        assert_eq!(inner(&e, &other), None);
        let mut lcp = h;
        lcp[24..26].copy_from_slice(&[0xc0, 0x21]);
        assert_eq!(inner(&e, &lcp), None);
        let mut discovery = h;
        discovery[17] = 0x63;
        assert_eq!(inner(&e, &discovery), None);
    }

    #[test]
    fn pppoe_without_a_vlan_and_over_ipv6() {
        let e = Encap {
            vlan_tci: 0,
            pppoe_session: 1,
        };
        let h = header(&e, SRC, DST, ETH_P_IPV6, 100).expect("IPv6");
        assert_eq!(
            &h[12..22],
            &[0x88, 0x64, 0x11, 0x00, 0x00, 0x01, 0x00, 102, 0x00, 0x57]
        );
        assert_eq!(inner(&e, &h), Some((22, ETH_P_IPV6)));
    }

    #[test]
    fn other_protocols_and_giants_are_refused() {
        let e = Encap {
            vlan_tci: 0,
            pppoe_session: 1,
        };
        assert_eq!(header(&e, SRC, DST, 0x0806, 28), None, "ARP");
        assert_eq!(header(&e, SRC, DST, ETH_P_IPV4, 70_000), None);
    }
}
