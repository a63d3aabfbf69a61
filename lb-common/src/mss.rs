//! TCP MSS clamping: a SYN that leaves by an uplink narrower than the
//! client's own link gets its maximum segment size lowered to what the
//! uplink carries, so that the connection never sends a segment the path
//! would have to drop and report (PMTUD is often broken by filters that
//! eat the ICMP). What PPPoE routers and tunnels have always done.
//!
//! Only the first TCP option is looked at: every common stack (Linux,
//! Windows, macOS, the BSDs, Android) puts MSS first in a SYN, and a
//! bounded look keeps the data plane's verifier happy.

/// TCP option kind of the MSS option.
pub const KIND: u8 = 2;
/// Its length: kind, length and a 16-bit value.
pub const LEN: u8 = 4;
/// IPv4 and TCP headers without options: what an MSS excludes from the MTU.
pub const IPV4_OVERHEAD: u16 = 20 + 20;
/// IPv6 and TCP headers without options.
pub const IPV6_OVERHEAD: u16 = 40 + 20;
/// The smallest MSS lb writes: IPv4's minimum datagram (576) less headers.
pub const MIN: u16 = 536;

/// The MSS a SYN announcing `mss` must carry to leave by a link of MTU
/// `mtu` with `overhead` bytes of headers per segment; `None` when it
/// fits as it is.
#[inline(always)]
pub fn clamped(mss: u16, mtu: u16, overhead: u16) -> Option<u16> {
    let most = mtu.saturating_sub(overhead).max(MIN);
    (mss > most).then_some(most)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mss_is_lowered_only_when_it_does_not_fit() {
        assert_eq!(clamped(1460, 1500, IPV4_OVERHEAD), None);
        assert_eq!(clamped(1460, 1420, IPV4_OVERHEAD), Some(1380));
        assert_eq!(clamped(1460, 1492, IPV4_OVERHEAD), Some(1452), "PPPoE");
        assert_eq!(clamped(1200, 1420, IPV4_OVERHEAD), None, "already small");
        assert_eq!(clamped(1440, 1420, IPV6_OVERHEAD), Some(1360));
        assert_eq!(clamped(1460, 100, IPV4_OVERHEAD), Some(MIN), "never below");
        assert_eq!(clamped(500, 100, IPV4_OVERHEAD), None, "nor raised");
    }
}
