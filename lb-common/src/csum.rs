//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Values are 16-bit words of the packet, all read in one byte order and
//! the results written back in the same: the ones'-complement sum does
//! not depend on it (RFC 1071, 2.B), so the XDP programs take the CPU's
//! own order and skip the byte swaps, and the reference model takes
//! network order. Shared by the XDP programs and by the tests' reference
//! model; the tests also check against a full recomputation.

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `a + b` in ones'-complement arithmetic (end-around carry). Never 0
/// unless both are 0.
#[inline(always)]
pub fn add(a: u16, b: u16) -> u16 {
    fold(u32::from(a) + u32::from(b))
}

/// `a - b` in ones'-complement arithmetic.
#[inline(always)]
pub fn sub(a: u16, b: u16) -> u16 {
    add(a, !b)
}

/// What changing one 16-bit word of the covered data from `old` to `new`
/// adds to a checksum's sum (RFC 1624, eqn. 3's `~m + m'`), unfolded: the
/// deltas of several changes add up, and [`apply`] folds them once.
#[inline(always)]
pub fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// [`delta16`] for a 32-bit field such as an IPv4 address.
#[inline(always)]
pub fn delta32(old: u32, new: u32) -> u32 {
    delta16((old >> 16) as u16, (new >> 16) as u16) + delta16(old as u16, new as u16)
}

/// The checksum `check` after the changes whose deltas sum to `delta`
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`, for every change at
/// once). One fold gives the same bits as a fold after each change: both
/// are the one non-zero ones'-complement value of the same sum, and two
/// rounds of [`fold`] take any `u32` to 16 bits. Each delta is below
/// 2^17, so thousands of them fit a `u32`.
#[inline(always)]
pub fn apply(check: u16, delta: u32) -> u16 {
    !fold(u32::from(!check) + delta)
}

/// What taking one off an IPv4 TTL adds to the header's sum, whatever the
/// TTL (as long as it is at least 1): the TTL is the first byte of its
/// 16-bit word, which therefore drops by the word `[1, 0]` read in the
/// same byte order, and `~m + (m - d)` is `~d` for any `m >= d` (RFC 1624;
/// RFC 1141 used the same constant). A constant, so a forwarded packet's
/// TTL and its address change share one update of the header checksum.
#[inline(always)]
pub fn ttl_decrement(word: fn([u8; 2]) -> u16) -> u32 {
    delta16(word([1, 0]), 0)
}

/// The checksum after one 16-bit word of the covered data changed from `old`
/// to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    apply(check, delta16(old, new))
}

/// As [`replace16`], for a 32-bit field such as an IPv4 address.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    apply(check, delta32(old, new))
}

/// A UDP checksum as sent: zero means "no checksum" on the wire (RFC 768),
/// so a computed zero goes out as all ones (in either byte order).
#[inline(always)]
pub fn udp(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// Ones'-complement sum of `data` (odd length padded with a zero byte), not
/// yet complemented. For building reference packets and for tests; the
/// kernel side only ever updates incrementally.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// The checksum to store for `data` (with its checksum field zeroed).
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    !fold(sum(data, initial))
}

/// Whether `data`, checksum field included, verifies.
pub fn verifies(data: &[u8], initial: u32) -> bool {
    fold(sum(data, initial)) == 0xffff
}

/// The IPv4 pseudo-header sum for a TCP or UDP checksum.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let mut acc = sum(&src, 0);
    acc = sum(&dst, acc);
    acc + u32::from(proto) + u32::from(l4_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 section 3's example header bytes, with its checksum.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn full_checksum_matches_known_header() {
        assert_eq!(checksum(&HDR, 0), 0xb861);
    }

    #[test]
    fn incremental_equals_full_for_every_ttl() {
        let mut hdr = HDR;
        let c = checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        for ttl in (1..=255u8).rev() {
            let old = u16::from_be_bytes([hdr[8], hdr[9]]);
            hdr[8] = ttl - 1;
            let new = u16::from_be_bytes([hdr[8], hdr[9]]);
            let check = u16::from_be_bytes([hdr[10], hdr[11]]);
            hdr[10..12].copy_from_slice(&replace16(check, old, new).to_be_bytes());
            assert!(verifies(&hdr, 0), "ttl {ttl}");
            let mut zeroed = hdr;
            zeroed[10..12].fill(0);
            assert_eq!(checksum(&zeroed, 0).to_be_bytes(), [hdr[10], hdr[11]]);
        }
    }

    /// `hdr` with TTL `ttl` and its checksum computed afresh.
    fn with_ttl(mut hdr: [u8; 20], ttl: u8) -> [u8; 20] {
        hdr[8] = ttl;
        hdr[10..12].fill(0);
        let c = checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        hdr
    }

    #[test]
    fn the_ttl_delta_is_the_same_for_every_ttl_and_adds_to_an_address_change() {
        let new_src: u32 = 0x6440_0102;
        for ttl in 1..=255u8 {
            let mut h = with_ttl(HDR, ttl);
            let old_src = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            h[8] = ttl - 1;
            h[12..16].copy_from_slice(&new_src.to_be_bytes());
            let check = u16::from_be_bytes([h[10], h[11]]);
            let delta = delta32(old_src, new_src) + ttl_decrement(u16::from_be_bytes);
            h[10..12].copy_from_slice(&apply(check, delta).to_be_bytes());
            assert!(verifies(&h, 0), "ttl {ttl}");
            // In the other byte order, as the XDP programs read words.
            let mut le = with_ttl(HDR, ttl);
            le[8] = ttl - 1;
            let check = u16::from_le_bytes([le[10], le[11]]);
            le[10..12]
                .copy_from_slice(&apply(check, ttl_decrement(u16::from_le_bytes)).to_le_bytes());
            assert!(verifies(&le, 0), "ttl {ttl}, little-endian words");
        }
    }

    #[test]
    fn incremental_address_rewrite() {
        let mut hdr = HDR;
        let c = checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        let old = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let new: u32 = 0x6440_0102;
        hdr[12..16].copy_from_slice(&new.to_be_bytes());
        let check = u16::from_be_bytes([hdr[10], hdr[11]]);
        hdr[10..12].copy_from_slice(&replace32(check, old, new).to_be_bytes());
        assert!(verifies(&hdr, 0));
    }

    proptest::proptest! {
        /// Several words changed, their deltas applied at once: the bits
        /// of changing them one at a time, and of a full recomputation.
        #[test]
        fn deltas_applied_at_once_match_one_at_a_time(
            data in proptest::collection::vec(proptest::prelude::any::<u16>(), 4..32),
            changes in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u16>()),
                1..8,
            ),
        ) {
            let mut words = data;
            let bytes = |w: &[u16]| {
                let mut b = [0u8; 64];
                for (i, x) in w.iter().enumerate() {
                    b[2 * i..2 * i + 2].copy_from_slice(&x.to_be_bytes());
                }
                (b, 2 * w.len())
            };
            // Word 0 holds the checksum.
            words[0] = 0;
            let (b, n) = bytes(&words);
            words[0] = checksum(&b[..n], 0);
            let mut one_at_a_time = words[0];
            let mut delta = 0;
            for (at, new) in changes {
                let at = 1 + at.index(words.len() - 1);
                one_at_a_time = replace16(one_at_a_time, words[at], new);
                delta += delta16(words[at], new);
                words[at] = new;
            }
            let at_once = apply(words[0], delta);
            proptest::prop_assert_eq!(at_once, one_at_a_time);
            words[0] = at_once;
            let (b, n) = bytes(&words);
            proptest::prop_assert!(verifies(&b[..n], 0));
        }
    }
}
