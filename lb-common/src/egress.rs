//! How a forwarded packet leaves: straight into the device's transmit ring
//! (`XDP_REDIRECT`), or through the device's queueing discipline.
//!
//! `XDP_REDIRECT` skips the egress qdisc, so a device with a qdisc that
//! shapes or queues (SQM's, an operator's `tbf`, lb's own shaper) is sent
//! to differently: the XDP program makes the whole decision and rewrite as
//! usual, then leaves a [`HandOff`] note in the frame's metadata and passes
//! it up; lb's tc program on the same device reads the note and redirects
//! the packet to the target's egress, where its qdisc sees it. One decision
//! and one rewrite, in one place; tc only carries the result.
//!
//! Also owns the numbering of lb's shaper classes (HTB class ids), which
//! the data plane writes into `skb->priority` and lbd creates with `tc`.
//!
//! A full ring. `XDP_REDIRECT` puts a frame straight into the target's
//! transmit ring (a veth's: its peer's 256-slot receive ring), and when
//! that ring is full the device map drops it: XDP has no queue to wait
//! in and nothing pushes back. The kernel's own path meets a full device
//! with its qdisc instead (the queue stops, the frame waits) or, on a
//! veth without one, the receiving CPU's 1,000-packet backlog. So a
//! device that lb's XDP feeds faster than it drains (a LAN client slower
//! than the router, an uplink slower than the LAN) loses frames that the
//! kernel would have queued, and TCP takes each loss for congestion.
//! lb watches for it rather than guessing: the ring watch, a raw
//! tracepoint program on `xdp_devmap_xmit` (fired by every device map
//! flush, whatever the driver, with the frames it could not place),
//! counts those frames per device in `RING_DROPS` (and as the
//! `drop_ring_full` reason) for the devices lb sends to (in lbd's network
//! namespace: see [`RingBinding`]); lbd reads them
//! every few milliseconds, and hands a device whose ring overflowed to
//! its queue (the hand-off below; a device without one gets lb's
//! [`QUEUE_MAJOR`]) for a while, going back to
//! `XDP_REDIRECT` after it, for longer each time the ring overflows
//! again soon (hysteresis). XDP's speed while the device keeps up, the
//! queue's manners while it does not. Batching cannot help: a full ring
//! stays full whatever the batch; and a per-packet test in the data
//! plane would cost every packet for what only a full ring needs.

/// Values of [`Egress::path`].
pub mod path {
    /// `XDP_REDIRECT`: no qdisc on the way.
    pub const XDP: u32 = 0;
    /// Through the device's qdisc, by lb's tc program.
    pub const QDISC: u32 = 1;
}

/// How to send out of one device (map `EGRESS`, keyed by ifindex; a device
/// without an entry takes the XDP path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// One of [`path`].
    pub path: u32,
    /// Handle major of lb's HTB shaper on this device, 0 when lb does not
    /// shape it: the packet's class is then left to the device's qdisc.
    pub shaper_major: u32,
    /// Where to send instead, when not 0: a LAN port's bridge, whose qdisc
    /// holds the download shaper that all its ports share.
    pub ifindex: u32,
}

/// The note `lan_ingress`/`wan_ingress` leave in front of a frame for lb's
/// tc program: where it goes, and in which class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandOff {
    /// [`HANDOFF_MAGIC`]: metadata that something else left is not a note.
    pub magic: u32,
    /// The device to send it out of (its egress, through its qdisc).
    pub ifindex: u32,
    /// `skb->priority` to set: an HTB class id of lb's shaper, or 0.
    pub priority: u32,
}

/// "lbH1".
pub const HANDOFF_MAGIC: u32 = 0x6c62_4831;

/// The kernel tracepoint the ring watch attaches to (as a raw tracepoint:
/// no tracefs needed). Its arguments (Linux 5.8 and later): `from_dev`,
/// `to_dev`, `sent`, `drops`, `err`.
pub const RING_TRACEPOINT: &str = "xdp_devmap_xmit";
/// Index of `to_dev` (a `struct net_device *`) among its arguments.
pub const RING_ARG_TO_DEV: usize = 1;
/// Index of `drops` (frames the flush could not place) among them.
pub const RING_ARG_DROPS: usize = 3;
/// The ring watch's global ([`RingBinding`]) that lbd sets at load.
pub const RING_BINDING_GLOBAL: &str = "RING_BINDING";

/// What the ring watch needs to know of the running kernel and of lbd,
/// set at load (all zero keeps it idle). The tracepoint fires for every
/// device map flush on the machine, in every network namespace, and an
/// ifindex names a device only within its namespace: a flush counts only
/// when its device is in lbd's namespace. Offsets come from the kernel's
/// BTF (they change from build to build).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingBinding {
    /// Byte offset of `ifindex` (an `int`) in `struct net_device`.
    pub ifindex: u32,
    /// Byte offset of the device's `struct net *` (`nd_net.net`) in it.
    pub net: u32,
    /// Byte offset of the namespace's inode number (`ns.inum`, an
    /// `unsigned int`) in `struct net`.
    pub inum: u32,
    /// The inode number of lbd's network namespace (what `stat
    /// /proc/self/ns/net` says).
    pub netns: u32,
}

const _: () = assert!(core::mem::size_of::<RingBinding>() == 16);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, four u32s, no padding: every bit pattern is valid.
unsafe impl aya::Pod for RingBinding {}

/// Handle major of lb's HTB shapers (`1b:`), on uplinks and LAN ports.
pub const SHAPER_MAJOR: u32 = 0x1b;
/// Handle major of lb's queue (`1c:`): the FIFO lbd gives a device that
/// has none (a veth's default is `noqueue`) when its ring overflows, so
/// that the hand-off gets the backpressure a NIC's default queue gives:
/// a full device stops the queue, the packet waits. It does not shape,
/// and lb's packets take it only while their device overflows.
pub const QUEUE_MAJOR: u32 = 0x1c;
/// Class of everything that is not lb's forwarded traffic (the router's
/// own, bridged LAN traffic): `1b:1`.
pub const DEFAULT_MINOR: u32 = 0x1;
/// Fair leaves per uplink class: clients are hashed into this many.
pub const LEAVES: u32 = 16;

/// Minor of uplink `uplink`'s class (its rate): `0x10 + uplink`.
pub const fn uplink_minor(uplink: u32) -> u32 {
    0x10 + uplink
}

/// Minor of the leaf of `uplink` that client hash `client` falls into:
/// `0x100 + 0x10 * uplink + client % LEAVES`. Leaves of one uplink share
/// its rate equally while they are busy: fairness per client.
pub const fn leaf_minor(uplink: u32, client: u32) -> u32 {
    0x100 + 0x10 * uplink + client % LEAVES
}

/// The class id (`major:minor`) a packet of `uplink` from or to client
/// `client` (its IPv4 address, network order) takes on a device shaped by
/// lb (`shaper_major` non-zero); 0 elsewhere.
pub fn priority(shaper_major: u32, uplink: u32, client: [u8; 4]) -> u32 {
    if shaper_major == 0 {
        return 0;
    }
    // Fold the address so that neighbours land in different leaves.
    let a = u32::from_be_bytes(client);
    let spread = (a ^ (a >> 8) ^ (a >> 16) ^ (a >> 24)) & 0xff;
    (shaper_major << 16) | leaf_minor(uplink, spread)
}

const _: () = assert!(core::mem::size_of::<Egress>() == 12);
const _: () = assert!(core::mem::size_of::<HandOff>() == 12);
const _: () = assert!(crate::MAX_UPLINKS * 0x10 + 0x100 <= 0xffff);
const _: () = assert!(uplink_minor(crate::MAX_UPLINKS - 1) < 0x100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshaped_devices_leave_the_class_alone() {
        assert_eq!(priority(0, 3, [10, 10, 0, 2]), 0);
    }

    #[test]
    fn classes_are_under_their_uplink_and_clients_spread_over_leaves() {
        let mut leaves = [false; LEAVES as usize];
        for host in 1..=32u8 {
            let p = priority(SHAPER_MAJOR, 2, [10, 10, 0, host]);
            assert_eq!(p >> 16, SHAPER_MAJOR);
            let minor = p & 0xffff;
            assert!((0x120..0x130).contains(&minor), "{minor:#x}");
            leaves[(minor - 0x120) as usize] = true;
        }
        assert!(
            leaves.iter().all(|&l| l),
            "32 neighbours fill all 16 leaves"
        );
        // Two neighbours never share a leaf.
        assert_ne!(
            priority(SHAPER_MAJOR, 0, [10, 10, 0, 2]),
            priority(SHAPER_MAJOR, 0, [10, 10, 0, 3])
        );
    }

    #[test]
    fn class_ids_of_all_uplinks_are_distinct() {
        let mut minors: [u32; 2 * crate::MAX_UPLINKS as usize] = [0; 32];
        for u in 0..crate::MAX_UPLINKS {
            minors[u as usize * 2] = uplink_minor(u);
            minors[u as usize * 2 + 1] = leaf_minor(u, 0);
        }
        minors.sort_unstable();
        assert!(minors.windows(2).all(|w| w[0] != w[1]));
        assert!(!minors.contains(&DEFAULT_MINOR));
    }
}
