//! How a forwarded packet leaves: straight into the device's transmit ring
//! (`XDP_REDIRECT`), or through the device's queueing discipline.
//!
//! `XDP_REDIRECT` skips the egress qdisc, so a device with a qdisc that
//! shapes or queues (SQM's, an operator's `tbf`, lb's own shaper) is sent
//! to differently: the XDP program makes the whole decision and rewrite as
//! usual, then writes a [`Note`] in front of the frame and passes it up;
//! lb's tc program on the same device reads the note and redirects the
//! packet to the target's egress, where its qdisc sees it. One decision
//! and one rewrite, in one place; tc only carries the result.
//!
//! The note travels as two 802.1Q tags (see [`note`]), not as XDP
//! metadata: every driver and kernel that runs XDP can grow a frame's
//! head, where metadata is a per-driver feature, and some kernels refuse
//! the helper outright. The kernel takes the outer tag off by itself
//! before tc runs; tc reads both and pops them, and the packet leaves as
//! it was rewritten.
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
//! `drop_ring_full` reason; `drop_target_refused` where the device refused
//! the whole flush) for the devices lb sends to (in lbd's network
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

/// What lb's tc program needs of a packet handed over to it: the device
/// it goes out of (its qdisc decides the rest, or the bridge its EGRESS
/// entry names), and what picks its class on a device lb shapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Note {
    /// The device the XDP program would have redirected the packet to.
    pub ifindex: u32,
    /// The uplink it leaves by or came back through.
    pub uplink: u32,
    /// The client's leaf ([`leaf`]).
    pub leaf: u32,
}

/// The hand-off note on the wire of the stack: two 802.1Q tags between
/// the MAC addresses and the rewritten frame's own EtherType (or its own
/// tag). The outer one carries VID 4095, which 802.1Q reserves ("shall not
/// be transmitted"): no tag on a received frame may have it, so lb's XDP
/// programs drop any frame that does (`reason::DROP_RESERVED_VLAN`), and
/// a frame that reaches lb's tc program with it was tagged by them. The
/// note's 20 bits: the outer tag's priority bits the uplink, the inner
/// tag's the leaf, the inner VID the interface index.
pub mod note {
    use super::{Note, LEAVES};
    use crate::MAX_UPLINKS;

    /// The tags' EtherType (TPID).
    pub const TPID: u16 = 0x8100;
    /// The reserved VID that marks the outer tag as a note.
    pub const MARK: u16 = 0x0fff;
    /// Bytes the note adds to the frame: two tags of four.
    pub const LEN: usize = 8;
    /// The VID field of a tag control word.
    pub const VID_MASK: u16 = 0x0fff;
    /// Where the priority bits (PCP and DEI) start in it.
    const HIGH: u32 = 12;

    /// Whether tag control `tci` of a frame's outer tag is a note's.
    pub const fn marks(tci: u16) -> bool {
        tci & VID_MASK == MARK
    }

    /// The tag control words (outer, inner) of `note`; `None` when it does
    /// not fit (an interface index of 4095 or more, the reserved VID and
    /// above: that device's packets take the XDP path).
    pub const fn tags(note: &Note) -> Option<[u16; 2]> {
        if note.ifindex == 0
            || note.ifindex >= MARK as u32
            || note.uplink >= MAX_UPLINKS
            || note.leaf >= LEAVES
        {
            return None;
        }
        Some([
            ((note.uplink << HIGH) | MARK as u32) as u16,
            ((note.leaf << HIGH) | note.ifindex) as u16,
        ])
    }

    /// The note that tags `outer` and `inner` carry; `None` when the outer
    /// one is not a note's.
    pub const fn read(outer: u16, inner: u16) -> Option<Note> {
        if !marks(outer) || inner & VID_MASK == 0 {
            return None;
        }
        Some(Note {
            ifindex: (inner & VID_MASK) as u32,
            uplink: (outer >> HIGH) as u32,
            leaf: (inner >> HIGH) as u32,
        })
    }

    const _: () = assert!(MAX_UPLINKS <= 1 << (16 - HIGH));
    const _: () = assert!(LEAVES <= 1 << (16 - HIGH));
}

/// The kernel tracepoint the ring watch attaches to (as a raw tracepoint:
/// no tracefs needed). Its arguments (Linux 5.8 and later): `from_dev`,
/// `to_dev`, `sent`, `drops`, `err`.
pub const RING_TRACEPOINT: &str = "xdp_devmap_xmit";
/// Index of `to_dev` (a `struct net_device *`) among its arguments.
pub const RING_ARG_TO_DEV: usize = 1;
/// Index of `drops` (frames the flush could not place) among them.
pub const RING_ARG_DROPS: usize = 3;
/// Index of `err` among them: set when the target refused the whole
/// flush (a veth whose peer is down, a NIC with no XDP transmit queue for
/// the CPU), zero when its ring was full or a frame too big for it.
pub const RING_ARG_ERR: usize = 4;
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

/// The leaf (`0..LEAVES`) of client `client` (its IPv4 address, network
/// order; an IPv6 client's folded to 32 bits).
pub const fn leaf(client: [u8; 4]) -> u32 {
    // Fold the address so that neighbours land in different leaves.
    let a = u32::from_be_bytes(client);
    ((a ^ (a >> 8) ^ (a >> 16) ^ (a >> 24)) & 0xff) % LEAVES
}

/// The class id (`major:minor`) a packet of `uplink` in leaf `leaf` takes
/// on a device shaped by lb (`shaper_major` non-zero); 0 elsewhere.
pub const fn class(shaper_major: u32, uplink: u32, leaf: u32) -> u32 {
    if shaper_major == 0 {
        return 0;
    }
    (shaper_major << 16) | leaf_minor(uplink, leaf)
}

/// The class id of a packet of `uplink` from or to client `client`.
pub const fn priority(shaper_major: u32, uplink: u32, client: [u8; 4]) -> u32 {
    class(shaper_major, uplink, leaf(client))
}

const _: () = assert!(core::mem::size_of::<Egress>() == 12);
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
    fn a_note_reads_back_as_written_and_nothing_else_reads_as_one() {
        for ifindex in [1, 2, 7, 300, crate::IFINDEX_SLOTS - 2] {
            for uplink in [0, 1, crate::MAX_UPLINKS - 1] {
                for leaf in [0, 5, LEAVES - 1] {
                    let n = Note {
                        ifindex,
                        uplink,
                        leaf,
                    };
                    let [outer, inner] = note::tags(&n).expect("fits");
                    assert!(note::marks(outer));
                    assert!(!note::marks(inner), "{n:?}");
                    assert_eq!(note::read(outer, inner), Some(n));
                }
            }
        }
        // Real tags: any VID but the reserved one.
        for vid in [0u16, 1, 100, 4094] {
            assert!(!note::marks(vid) && !note::marks(0xe000 | vid));
            assert_eq!(note::read(vid, 7), None);
        }
    }

    #[test]
    fn a_note_that_does_not_fit_is_not_written() {
        let fits = Note {
            ifindex: 5,
            uplink: 1,
            leaf: 2,
        };
        assert!(note::tags(&fits).is_some());
        for n in [
            Note {
                ifindex: crate::IFINDEX_SLOTS - 1,
                ..fits
            },
            Note { ifindex: 0, ..fits },
            Note {
                uplink: crate::MAX_UPLINKS,
                ..fits
            },
            Note {
                leaf: LEAVES,
                ..fits
            },
        ] {
            assert_eq!(note::tags(&n), None, "{n:?}");
        }
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
