//! The packet and connection marks lb gives the kernel's side meaning
//! with, where the data plane and lbd's nftables table must agree.
//!
//! Only the bits the data plane itself writes live here; lbd's other
//! marks (policies, probes, the router's inside replies) are its table's
//! own (`reconcile::nftables`).

/// The bits of the packet and connection marks that name an uplink: the
/// uplink a connection came in on, or the one the kernel must send it
/// out of. `uplink(index)` within them, for 1 to 255 uplinks.
pub const UPLINK_MASK: u32 = 0x00ff_0000;

/// The connmark bit of a connection the data plane handed to the kernel
/// with its translation already written into conntrack: a UDP flow of
/// the fast path whose datagram was too big for its uplink without DF,
/// which only the kernel can fragment. With [`uplink`] of the flow's
/// uplink beside it, so that lbd's table routes the datagram out of that
/// uplink, whatever the main table's default route says.
pub const HANDED: u32 = 0x4000_0000;

/// The mark of uplink `index` (within [`UPLINK_MASK`]).
pub const fn uplink(index: u32) -> u32 {
    (index.wrapping_add(1) << UPLINK_MASK.trailing_zeros()) & UPLINK_MASK
}

/// The connmark of a connection handed to the kernel for uplink `index`.
pub const fn handed(index: u32) -> u32 {
    HANDED | uplink(index)
}

const _: () = assert!(HANDED & UPLINK_MASK == 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uplink_has_a_mark_of_its_own_within_the_mask() {
        assert_eq!(uplink(0), 0x0001_0000);
        assert_eq!(uplink(254), 0x00ff_0000);
        assert_eq!(handed(1), 0x4002_0000);
        for i in 0..255 {
            assert_eq!(uplink(i) & !UPLINK_MASK, 0);
            assert_ne!(uplink(i), 0);
        }
    }
}
