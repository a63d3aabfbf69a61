//! The ICMP errors the data plane answers a client with itself: "host
//! unreachable" for a refused new flow (`fallback = unreachable`), so that
//! the client gives up at once instead of retrying into silence (RFC 1122
//! 3.2.2.1; Linux aborts a connecting TCP socket on it), and
//! "fragmentation needed" with the uplink's MTU for a packet with DF set
//! that is too big for its uplink (RFC 1191: path MTU discovery), which
//! XDP can neither send nor fragment.
//!
//! The error quotes the offending packet's IPv4 header (without options)
//! and the first eight bytes after it (RFC 792), which is how the client's
//! stack finds the socket it is for. The data plane builds it in place:
//! the quote already sits where it belongs once the frame has grown by the
//! two new headers at its front.

use crate::csum;

/// Bytes quoted: an IPv4 header without options and eight bytes of
/// transport header.
pub const QUOTED_LEN: usize = IPV4_HDR_LEN + 8;
/// IPv4 header without options.
pub const IPV4_HDR_LEN: usize = 20;
/// ICMP header.
pub const ICMP_HDR_LEN: usize = 8;
/// What goes in front of the quote: a new IPv4 header and the ICMP header.
pub const HEADERS_LEN: usize = IPV4_HDR_LEN + ICMP_HDR_LEN;
/// The whole error, IPv4 header to the end of the quote.
pub const ERROR_LEN: usize = HEADERS_LEN + QUOTED_LEN;

const ICMP_DEST_UNREACH: u8 = 3;
const CODE_HOST_UNREACH: u8 = 1;
const CODE_FRAG_NEEDED: u8 = 4;
const IPPROTO_ICMP: u8 = 1;
/// TOS of ICMP errors: precedence "internetwork control", as Linux sends
/// them.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
/// TTL of the error: the client is one hop away, any sane value does.
const TTL: u8 = 64;

/// The IPv4 and ICMP headers of a "host unreachable" from `from` that
/// quotes `quoted` (the offending packet's header and first eight bytes),
/// addressed to that packet's source. Checksums filled in.
#[inline(always)]
pub fn host_unreachable(quoted: &[u8; QUOTED_LEN], from: [u8; 4]) -> [u8; HEADERS_LEN] {
    unreachable(quoted, from, CODE_HOST_UNREACH, 0)
}

/// As [`host_unreachable`], a "fragmentation needed and DF set" telling
/// the next-hop MTU `mtu` (RFC 1191).
#[inline(always)]
pub fn fragmentation_needed(
    quoted: &[u8; QUOTED_LEN],
    from: [u8; 4],
    mtu: u16,
) -> [u8; HEADERS_LEN] {
    unreachable(quoted, from, CODE_FRAG_NEEDED, mtu)
}

/// A "destination unreachable" of `code`, with `mtu` in the second half of
/// the header's last word (zero but for fragmentation needed).
#[inline(always)]
fn unreachable(quoted: &[u8; QUOTED_LEN], from: [u8; 4], code: u8, mtu: u16) -> [u8; HEADERS_LEN] {
    let mut out = [0u8; HEADERS_LEN];
    let total = (ERROR_LEN as u16).to_be_bytes();
    out[0] = 0x45;
    out[1] = TOS_INTERNETWORK_CONTROL;
    out[2] = total[0];
    out[3] = total[1];
    // Identification 0, no fragment bits: it is far below any MTU.
    out[8] = TTL;
    out[9] = IPPROTO_ICMP;
    out[12..16].copy_from_slice(&from);
    out[16..20].copy_from_slice(&quoted[12..16]);
    let ip = csum::checksum(&out[..IPV4_HDR_LEN], 0).to_be_bytes();
    out[10] = ip[0];
    out[11] = ip[1];

    out[IPV4_HDR_LEN] = ICMP_DEST_UNREACH;
    out[IPV4_HDR_LEN + 1] = code;
    out[IPV4_HDR_LEN + 6..IPV4_HDR_LEN + 8].copy_from_slice(&mtu.to_be_bytes());
    let icmp = csum::checksum(quoted, csum::sum(&out[IPV4_HDR_LEN..], 0)).to_be_bytes();
    out[IPV4_HDR_LEN + 2] = icmp[0];
    out[IPV4_HDR_LEN + 3] = icmp[1];
    out
}

/// IPv6 header.
pub const IPV6_HDR_LEN: usize = 40;
/// Bytes an ICMPv6 error of lb's quotes: the offending packet's IPv6
/// header and eight bytes past it (RFC 4443 asks for as much as fits in
/// 1280 bytes; this much is what a client's stack needs to find its
/// socket, and keeps the error's size fixed).
pub const QUOTED6_LEN: usize = IPV6_HDR_LEN + 8;
/// What goes in front of the quote: a new IPv6 header and the ICMPv6
/// header.
pub const HEADERS6_LEN: usize = IPV6_HDR_LEN + ICMP_HDR_LEN;
/// The whole ICMPv6 error, IPv6 header to the end of the quote.
pub const ERROR6_LEN: usize = HEADERS6_LEN + QUOTED6_LEN;

const ICMPV6_DEST_UNREACH: u8 = 1;
/// "Address unreachable": Linux gives a connecting socket EHOSTUNREACH,
/// as for IPv4's "host unreachable".
const CODE6_ADDR_UNREACH: u8 = 3;
const IPPROTO_ICMPV6: u8 = 58;

/// ICMPv6 "Packet Too Big" (RFC 4443 3.2): its MTU in the four bytes
/// after the checksum.
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// The IPv6 and ICMPv6 headers of an "address unreachable" from `from`
/// to `to` (the quoted packet's source), for a quote whose ones'-
/// complement sum ([`csum::sum`] of its bytes) is `quote_sum`. Checksum
/// filled in. The quote itself is never copied: in XDP it stays in the
/// packet, summed there by the kernel (48 bytes more on the BPF stack do
/// not fit beside the rest).
#[inline(always)]
pub fn address_unreachable6(quote_sum: u32, to: [u8; 16], from: [u8; 16]) -> [u8; HEADERS6_LEN] {
    error6(
        ICMPV6_DEST_UNREACH,
        CODE6_ADDR_UNREACH,
        [0; 4],
        quote_sum,
        to,
        from,
    )
}

/// As [`address_unreachable6`], a "Packet Too Big" that tells `to` the
/// path's `mtu`: an IPv6 router never fragments, it says this instead.
#[inline(always)]
pub fn packet_too_big6(
    quote_sum: u32,
    to: [u8; 16],
    from: [u8; 16],
    mtu: u32,
) -> [u8; HEADERS6_LEN] {
    error6(
        ICMPV6_PACKET_TOO_BIG,
        0,
        mtu.to_be_bytes(),
        quote_sum,
        to,
        from,
    )
}

/// The headers of an ICMPv6 error of `kind` and `code`, whose four bytes
/// after the checksum are `rest`; see [`address_unreachable6`].
#[inline(always)]
fn error6(
    kind: u8,
    code: u8,
    rest: [u8; 4],
    quote_sum: u32,
    to: [u8; 16],
    from: [u8; 16],
) -> [u8; HEADERS6_LEN] {
    let mut out = [0u8; HEADERS6_LEN];
    let payload = (ICMP_HDR_LEN + QUOTED6_LEN) as u16;
    out[0] = 0x60;
    out[4..6].copy_from_slice(&payload.to_be_bytes());
    out[6] = IPPROTO_ICMPV6;
    out[7] = TTL;
    out[8..24].copy_from_slice(&from);
    out[24..40].copy_from_slice(&to);
    out[IPV6_HDR_LEN] = kind;
    out[IPV6_HDR_LEN + 1] = code;
    out[IPV6_HDR_LEN + 4..IPV6_HDR_LEN + 8].copy_from_slice(&rest);
    // The pseudo-header (both addresses, the length, the next header),
    // the ICMPv6 header, the quote.
    let pseudo = csum::sum(&out[8..40], u32::from(payload) + u32::from(IPPROTO_ICMPV6));
    let all = csum::sum(&out[IPV6_HDR_LEN..], pseudo) + u32::from(csum::fold(quote_sum));
    let check = (!csum::fold(all)).to_be_bytes();
    out[IPV6_HDR_LEN + 2] = check[0];
    out[IPV6_HDR_LEN + 3] = check[1];
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    const SERVER: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
    ];

    /// The start of a packet from the client to the server, of `proto`,
    /// with its ports: what an error quotes.
    fn quote6(proto: u8) -> [u8; QUOTED6_LEN] {
        let mut quoted = [0u8; QUOTED6_LEN];
        quoted[0] = 0x60;
        quoted[6] = proto;
        quoted[8..24].copy_from_slice(&CLIENT);
        quoted[24..40].copy_from_slice(&SERVER);
        quoted[40..44].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        quoted
    }

    /// Whether the ICMPv6 error of headers `h` and quote `quoted` verifies
    /// as a receiver checks it, written out here: the pseudo-header
    /// (source, destination, length, next header) then the message.
    fn verifies6(h: &[u8; HEADERS6_LEN], quoted: &[u8; QUOTED6_LEN]) -> bool {
        let mut whole = [0u8; 32 + 8 + ICMP_HDR_LEN + QUOTED6_LEN];
        whole[..32].copy_from_slice(&h[8..40]);
        whole[32..36].copy_from_slice(&56u32.to_be_bytes());
        whole[39] = 58;
        whole[40..48].copy_from_slice(&h[IPV6_HDR_LEN..]);
        whole[48..].copy_from_slice(quoted);
        csum::verifies(&whole, 0)
    }

    #[test]
    fn an_address_unreachable_verifies_and_quotes_the_packet() {
        let quoted = quote6(6);
        let h = address_unreachable6(csum::sum(&quoted, 0), CLIENT, SERVER);
        assert_eq!(h[0] >> 4, 6);
        assert_eq!(h[6], IPPROTO_ICMPV6);
        assert_eq!(&h[8..24], &SERVER, "from where the client was going");
        assert_eq!(&h[24..40], &CLIENT, "to the client");
        assert_eq!(
            usize::from(u16::from_be_bytes([h[4], h[5]])),
            ICMP_HDR_LEN + QUOTED6_LEN
        );
        assert_eq!((h[40], h[41]), (1, 3), "destination unreachable, address");
        assert!(verifies6(&h, &quoted), "ICMPv6 checksum");
    }

    #[test]
    fn a_packet_too_big_says_the_mtu_and_verifies() {
        let quoted = quote6(17);
        let h = packet_too_big6(csum::sum(&quoted, 0), CLIENT, SERVER, 1492);
        assert_eq!((h[40], h[41]), (2, 0), "packet too big");
        assert_eq!(u32::from_be_bytes([h[44], h[45], h[46], h[47]]), 1492);
        assert_eq!(&h[24..40], &CLIENT, "to the client");
        assert!(verifies6(&h, &quoted), "ICMPv6 checksum");
    }

    #[test]
    fn a_host_unreachable_verifies_and_quotes_the_packet() {
        let mut quoted = [0u8; QUOTED_LEN];
        quoted[0] = 0x45;
        quoted[9] = 17;
        quoted[12..16].copy_from_slice(&[10, 0, 0, 5]);
        quoted[16..20].copy_from_slice(&[198, 51, 100, 10]);
        quoted[20..24].copy_from_slice(&[0x9c, 0x40, 0x13, 0xc4]);
        let h = host_unreachable(&quoted, [10, 0, 0, 1]);
        assert!(csum::verifies(&h[..IPV4_HDR_LEN], 0), "IPv4 checksum");
        let mut icmp = [0u8; ICMP_HDR_LEN + QUOTED_LEN];
        icmp[..ICMP_HDR_LEN].copy_from_slice(&h[IPV4_HDR_LEN..]);
        icmp[ICMP_HDR_LEN..].copy_from_slice(&quoted);
        assert!(csum::verifies(&icmp, 0), "ICMP checksum");
        assert_eq!(h[9], IPPROTO_ICMP);
        assert_eq!(&h[12..16], &[10, 0, 0, 1], "from the router");
        assert_eq!(&h[16..20], &[10, 0, 0, 5], "to the client");
        assert_eq!(u16::from_be_bytes([h[2], h[3]]) as usize, ERROR_LEN);
        assert_eq!((h[20], h[21]), (3, 1), "destination unreachable, host");
        assert_eq!(&h[24..28], &[0; 4], "unused");

        let f = fragmentation_needed(&quoted, [10, 0, 0, 1], 1420);
        assert_eq!((f[20], f[21]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([f[26], f[27]]), 1420, "next-hop MTU");
        icmp[..ICMP_HDR_LEN].copy_from_slice(&f[IPV4_HDR_LEN..]);
        assert!(csum::verifies(&icmp, 0), "ICMP checksum with the MTU");
    }
}
