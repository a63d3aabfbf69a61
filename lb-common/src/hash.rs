//! The per-connection classifier hash (PCC).
//!
//! One function, used by the XDP program to pick a bucket for a new flow and
//! by tests to predict that choice. It is keyed with a random per-boot seed so
//! that nobody outside can craft flows that all land on one uplink. It must
//! stay cheap: a handful of multiplies and rotates, no loops with a variable
//! bound, nothing the verifier could object to.

/// Which parts of a packet pick its uplink (as MikroTik's PCC classifiers).
pub mod mode {
    /// Source and destination address and port, and protocol (the default).
    pub const FIVE_TUPLE: u32 = 0;
    /// Source and destination address: all connections between two hosts
    /// share an uplink.
    pub const SRC_DST_ADDRESS: u32 = 1;
    /// Source address only: every connection of one client uses one uplink,
    /// for sites that pin a session to the client's public address.
    pub const SRC_ADDRESS: u32 = 2;
}

/// The fields of a packet the classifier may look at, in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

// Murmur3's 32-bit mixing constants: well studied, and a multiply-rotate
// round is all the kernel side can afford per packet.
const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// An IPv6 address folded into the 32 bits a [`Tuple`] holds, every word
/// mixed in: the classifier then keys it with the seed as it does an
/// IPv4 address. (A plain XOR of the words would let two hosts of one
/// /64 cancel their prefix out and always collide.)
#[inline(always)]
pub fn fold6(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    finish(mix(mix(mix(mix(0, w(0)), w(4)), w(8)), w(12)), 16)
}

impl crate::maps::FlowKey6 {
    /// This connection as the classifier sees it ([`Tuple::of6`]): one
    /// place for the data plane and `lbctl explain` to make it.
    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple::of6(
            &self.src_addr,
            &self.dst_addr,
            u16::from_be_bytes(self.src_port),
            u16::from_be_bytes(self.dst_port),
            self.proto,
        )
    }
}

impl Tuple {
    /// An IPv6 connection as the classifier sees it: each address
    /// [`fold6`]ed. The data plane and `lbctl explain` both build it here,
    /// so that they can never fold differently.
    #[inline(always)]
    pub fn of6(src: &[u8; 16], dst: &[u8; 16], src_port: u16, dst_port: u16, proto: u8) -> Self {
        Self {
            src_addr: fold6(src),
            dst_addr: fold6(dst),
            src_port,
            dst_port,
            proto,
        }
    }
}

/// An IPv6 address cheaply folded to 32 bits (its words XORed): for what
/// needs only to tell flows apart roughly on every packet (the passive
/// signals' bit masks, a shaper's class), never for choosing an uplink.
#[inline(always)]
pub fn xor6(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    w(0) ^ w(4) ^ w(8) ^ w(12)
}

/// Seeded hash of the fields `mode` selects. An unknown mode hashes like
/// [`mode::FIVE_TUPLE`], so a bad value can never leave the data plane
/// without a choice.
#[inline(always)]
pub fn classify(seed: u32, mode: u32, t: &Tuple) -> u32 {
    let h = mix(seed, t.src_addr);
    match mode {
        mode::SRC_ADDRESS => finish(h, 4),
        mode::SRC_DST_ADDRESS => finish(mix(h, t.dst_addr), 8),
        _ => {
            let h = mix(h, t.dst_addr);
            let h = mix(h, (u32::from(t.src_port) << 16) | u32::from(t.dst_port));
            finish(mix(h, u32::from(t.proto)), 16)
        }
    }
}

/// The bucket a hash falls into.
#[inline(always)]
pub fn bucket(hash: u32) -> u32 {
    hash & (crate::BUCKETS - 1)
}

/// The bucket a new flow with classifier hash `hash` looks at on its
/// `attempt`: 0 is its own bucket ([`bucket`]); later attempts, used only
/// while the own bucket's uplink cannot take new flows, are other buckets
/// picked by a remix of the same hash, so a flow always retries the same
/// ones and the classifier mode still decides which flows go together.
#[inline(always)]
pub fn bucket_for(hash: u32, attempt: u32) -> u32 {
    if attempt == 0 {
        bucket(hash)
    } else {
        bucket(finish(mix(hash, attempt), 8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(i: u32) -> Tuple {
        Tuple {
            src_addr: 0x0a0a_0002,
            dst_addr: 0xc633_640a,
            src_port: 1024 + (i as u16),
            dst_port: 443,
            proto: 6,
        }
    }

    #[test]
    fn seed_changes_the_hash() {
        let t = tuple(1);
        assert_ne!(
            classify(1, mode::FIVE_TUPLE, &t),
            classify(2, mode::FIVE_TUPLE, &t)
        );
    }

    #[test]
    fn modes_ignore_what_they_should() {
        let (a, mut b) = (tuple(1), tuple(2));
        assert_ne!(
            classify(7, mode::FIVE_TUPLE, &a),
            classify(7, mode::FIVE_TUPLE, &b)
        );
        // Ports differ: address modes must not care.
        assert_eq!(
            classify(7, mode::SRC_DST_ADDRESS, &a),
            classify(7, mode::SRC_DST_ADDRESS, &b)
        );
        b.dst_addr ^= 1;
        assert_ne!(
            classify(7, mode::SRC_DST_ADDRESS, &a),
            classify(7, mode::SRC_DST_ADDRESS, &b)
        );
        assert_eq!(
            classify(7, mode::SRC_ADDRESS, &a),
            classify(7, mode::SRC_ADDRESS, &b)
        );
    }

    #[test]
    fn later_attempts_look_elsewhere() {
        let h = classify(7, mode::FIVE_TUPLE, &tuple(1));
        assert_eq!(bucket_for(h, 0), bucket(h));
        let others: [u32; 4] = core::array::from_fn(|i| bucket_for(h, i as u32 + 1));
        assert!(others.iter().any(|&b| b != bucket(h)));
    }

    #[test]
    fn buckets_are_spread_evenly_over_ports() {
        // 64k flows from one client into 4096 buckets: 16 per bucket on
        // average; no bucket should be wildly over- or under-used.
        let mut counts = [0u32; crate::BUCKETS as usize];
        for i in 0..65_536u32 {
            let t = Tuple {
                src_port: i as u16,
                ..tuple(0)
            };
            counts[bucket(classify(0xdead_beef, mode::FIVE_TUPLE, &t)) as usize] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            min >= Some(&2) && max <= Some(&40),
            "min {min:?} max {max:?}"
        );
    }

    proptest::proptest! {
        /// The data plane folds a flow key's addresses from whole words;
        /// `lbctl` and the tests fold them byte by byte: the same values.
        #[test]
        fn a_keys_words_fold_as_its_bytes(src: [u8; 16], dst: [u8; 16], port: u16) {
            let key = crate::maps::FlowKey6 {
                src_addr: src,
                dst_addr: dst,
                src_port: port.to_be_bytes(),
                ..Default::default()
            };
            proptest::prop_assert_eq!(key.folded(), (xor6(&src), xor6(&dst)));
        }
    }
}
