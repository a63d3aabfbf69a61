//! NPTv6 (RFC 6296): stateless IPv6 prefix translation that leaves every
//! checksum over the address valid.
//!
//! A flow from the LAN's prefix leaving by an uplink with another prefix
//! gets that uplink's prefix in place of the LAN's; its replies get the
//! LAN's back. The prefix bits are replaced, and one 16-bit word outside
//! the prefix absorbs the difference, so the address's ones'-complement
//! sum (which TCP, UDP and ICMPv6 checksums cover through the pseudo
//! header) is unchanged: no L4 checksum is touched. The word is the subnet
//! word (bits 48-63) for prefixes of /48 or shorter, else the first word
//! of the interface identifier that is not 0xffff. The mapping is a
//! bijection on the addresses it translates, so a reply maps back to the
//! very host.
//!
//! Owns the arithmetic only: which prefixes map to which, and the packet
//! rewrites (headers, quoted headers of ICMPv6 errors), are the callers'.
//! Same code in XDP and in lbd; no allocation, no panic.

use crate::csum;

/// The longest prefix translated: the interface identifier (bits 64-127)
/// always has a word for the adjustment.
pub const MAX_PREFIX_LEN: u8 = 64;

/// One direction of a translation: from one prefix to another of the
/// same length. The reverse is another `Npt` ([`Npt::new`] with the
/// prefixes swapped).
///
/// Every field holds its value as it lies in memory (the address's bytes
/// in network order, read in the CPU's): masks and ones'-complement sums
/// give the same bytes in either byte order (RFC 1071, 2.B), so neither
/// side of a translation swaps a byte, and the prefix is one 64-bit
/// operation, not four 16-bit ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt {
    /// The first 64 bits of the new prefix, zero outside the prefix.
    prefix: u64,
    /// The first 64 bits of the prefix translated from, as `prefix`.
    from: u64,
    /// Which of the first 64 bits the prefix covers.
    mask: u64,
    /// Added (ones' complement) to the adjustment word.
    adjustment: u16,
    /// The prefix length, 1 to [`MAX_PREFIX_LEN`].
    len: u8,
    _pad: [u8; 5],
}

/// Why an address is not translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untranslatable {
    /// It is not under the translation's prefix.
    OutsidePrefix,
    /// Its adjustment word is 0xffff (RFC 6296 leaves such addresses
    /// alone: 0xffff and 0 are both zero in ones' complement, and only 0
    /// maps back).
    NoAdjustableWord,
}

/// The first 64 bits of `addr`, as they lie in memory.
#[inline(always)]
fn head(addr: &[u8; 16]) -> u64 {
    u64::from_ne_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ])
}

/// The 16-bit word of `addr` at byte `at`, as it lies in memory.
#[inline(always)]
fn word(addr: &[u8; 16], at: usize) -> u16 {
    u16::from_ne_bytes([addr[at], addr[at + 1]])
}

/// The mask of a `len`-bit prefix over the first 64 bits, as [`head`]
/// reads it.
#[inline(always)]
fn mask(len: u8) -> u64 {
    let mut bytes = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        let bits = (len as u32).saturating_sub(8 * i as u32).min(8);
        bytes[i] = if bits == 0 { 0 } else { 0xff << (8 - bits) };
        i += 1;
    }
    u64::from_ne_bytes(bytes)
}

/// Ones'-complement sum of the four 16-bit words of `head`.
#[inline(always)]
fn sum_head(head: u64) -> u16 {
    let b = head.to_ne_bytes();
    let w = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    csum::add(csum::add(w(0), w(2)), csum::add(w(4), w(6)))
}

impl Npt {
    /// The translation from prefix `from` to prefix `to`, both `len` bits
    /// long (bits past `len` are ignored). `None` when `len` is 0 or
    /// longer than [`MAX_PREFIX_LEN`].
    pub fn new(from: [u8; 16], to: [u8; 16], len: u8) -> Option<Self> {
        if len == 0 || len > MAX_PREFIX_LEN {
            return None;
        }
        let mask = mask(len);
        let old = head(&from) & mask;
        let prefix = head(&to) & mask;
        // The prefix's words change the sum by `new - old`; the
        // adjustment word takes it back.
        Some(Self {
            prefix,
            from: old,
            mask,
            adjustment: csum::sub(sum_head(old), sum_head(prefix)),
            len,
            _pad: [0; 5],
        })
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` is under the translation's source prefix (given
    /// as the same prefix the translation was made from: `from`).
    pub fn covers(from: &[u8; 16], len: u8, addr: &[u8; 16]) -> bool {
        let mask = mask(len.min(MAX_PREFIX_LEN));
        head(addr) & mask == head(from) & mask
    }

    /// Whether `addr` is under the prefix this translates from.
    #[inline(always)]
    pub fn takes(&self, addr: &[u8; 16]) -> bool {
        head(addr) & self.mask == self.from
    }

    /// Whether the translation changes nothing (from a prefix to itself).
    #[inline(always)]
    pub fn is_identity(&self) -> bool {
        self.from == self.prefix
    }

    /// Translate `addr` in place. The caller has checked that `addr` is
    /// under the source prefix ([`Npt::covers`]); an address that is not
    /// would be moved under the new prefix all the same. For XDP, `addr`
    /// is best a copy on the stack: its words are then read and written
    /// whole, where a packet's bytes would go one by one.
    #[inline(always)]
    pub fn apply(&self, addr: &mut [u8; 16]) -> Result<(), Untranslatable> {
        // Which word absorbs the difference (a byte offset): the subnet
        // word, outside any prefix of /48 or shorter, else the first word
        // of the interface identifier that is not all ones.
        let at = if self.len <= 48 {
            6
        } else if word(addr, 8) != 0xffff {
            8
        } else if word(addr, 10) != 0xffff {
            10
        } else if word(addr, 12) != 0xffff {
            12
        } else {
            14
        };
        let old = word(addr, at);
        if old == 0xffff {
            return Err(Untranslatable::NoAdjustableWord);
        }
        let mut adjusted = csum::add(old, self.adjustment);
        if adjusted == 0xffff {
            adjusted = 0;
        }
        // A /48 or shorter leaves bytes 6-7 (the adjusted word) alone.
        let new = (head(addr) & !self.mask) | self.prefix;
        addr[..8].copy_from_slice(&new.to_ne_bytes());
        addr[at..at + 2].copy_from_slice(&adjusted.to_ne_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().expect("address").octets()
    }

    /// The address's ones'-complement sum, with 0xffff and 0 the same.
    fn sum(a: &[u8; 16]) -> u16 {
        let s = csum::checksum(a, 0);
        if s == 0xffff {
            0
        } else {
            s
        }
    }

    #[test]
    fn a_64_keeps_its_host_part_and_its_sum() {
        let npt =
            Npt::new(addr("2001:db8:1:10::"), addr("2001:db8:2:20::"), 64).expect("translation");
        let mut a = addr("2001:db8:1:10:aaaa:bbbb:cccc:dddd");
        npt.apply(&mut a).expect("translated");
        assert_eq!(&a[..8], &addr("2001:db8:2:20::")[..8]);
        assert_eq!(&a[10..], &addr("::bbbb:cccc:dddd")[10..]);
        assert_eq!(sum(&a), sum(&addr("2001:db8:1:10:aaaa:bbbb:cccc:dddd")));
    }

    #[test]
    fn a_48_adjusts_the_subnet_word() {
        let npt = Npt::new(addr("fd01:203:405::"), addr("2001:db8:1::"), 48).expect("translation");
        // RFC 6296's own example (appendix B): the subnet word 0001
        // becomes d550.
        let before = addr("fd01:203:405:1::1234");
        let mut a = before;
        npt.apply(&mut a).expect("translated");
        assert_eq!(a, addr("2001:db8:1:d550::1234"));
        assert_eq!(sum(&a), sum(&before));
    }

    #[test]
    fn an_adjusted_word_of_all_ones_is_written_as_zero() {
        // RFC 6296's example pair, whose adjustment is worked out here
        // from the prefixes' big-endian words: a subnet word that it
        // brings to 0xffff leaves as 0 (the same in ones' complement, and
        // the one that maps back).
        let (from, to) = (addr("fd01:203:405::"), addr("2001:db8:1::"));
        let be = |a: &[u8; 16], w: usize| u16::from_be_bytes([a[2 * w], a[2 * w + 1]]);
        let sum = |a: &[u8; 16]| csum::add(csum::add(be(a, 0), be(a, 1)), be(a, 2));
        let adjustment = csum::sub(sum(&from), sum(&to));
        let mut before = from;
        before[6..8].copy_from_slice(&(!adjustment).to_be_bytes());
        let out = Npt::new(from, to, 48).expect("translation");
        let mut a = before;
        out.apply(&mut a).expect("translated");
        assert_eq!(&a[6..8], &[0, 0], "{:?}", a);
        let back = Npt::new(to, from, 48).expect("translation");
        back.apply(&mut a).expect("maps back");
        assert_eq!(a, before);
    }

    #[test]
    fn an_address_without_an_adjustable_word_is_left_alone() {
        // A /48's subnet word of all ones; a /64's interface identifier of
        // all ones.
        for (len, host) in [
            (48, "2001:db8:1:ffff::1"),
            (64, "2001:db8:1::ffff:ffff:ffff:ffff"),
        ] {
            let npt =
                Npt::new(addr("2001:db8:1::"), addr("2001:db8:2::"), len).expect("translation");
            let mut a = addr(host);
            let before = a;
            assert_eq!(
                npt.apply(&mut a),
                Err(Untranslatable::NoAdjustableWord),
                "{host}/{len}"
            );
            assert_eq!(a, before, "{host}/{len}: left as it was");
        }
    }

    #[test]
    fn lengths_out_of_range_are_refused() {
        let a = addr("2001:db8::");
        assert!(Npt::new(a, a, 0).is_none());
        assert!(Npt::new(a, a, 65).is_none());
        assert!(Npt::new(a, a, 64).is_some());
    }

    fn v6() -> impl Strategy<Value = [u8; 16]> {
        any::<[u8; 16]>()
    }

    proptest! {
        /// Out and back is the identity, the sum never changes, and the
        /// result is under the new prefix, for every length.
        #[test]
        fn out_and_back(inside in v6(), outside in v6(), host in v6(), len in 1u8..=64) {
            let out = Npt::new(inside, outside, len).expect("translation");
            let back = Npt::new(outside, inside, len).expect("translation");
            // An address under `inside` with `host`'s other bits.
            // Bit by bit, independently of `mask`.
            let mut a = host;
            for bit in 0..usize::from(len) {
                let (byte, m) = (bit / 8, 0x80u8 >> (bit % 8));
                a[byte] = (a[byte] & !m) | (inside[byte] & m);
            }
            prop_assert!(Npt::covers(&inside, len, &a));
            prop_assert!(out.takes(&a));
            let original = a;
            match out.apply(&mut a) {
                Ok(()) => {
                    prop_assert!(Npt::covers(&outside, len, &a));
                    // Bit by bit: the prefix is `outside`'s; past it, only
                    // one 16-bit word changed.
                    for bit in 0..usize::from(len) {
                        let (byte, m) = (bit / 8, 0x80u8 >> (bit % 8));
                        prop_assert_eq!(a[byte] & m, outside[byte] & m, "bit {}", bit);
                    }
                    // Past it, every bit is the host's but those of the
                    // one word RFC 6296 adjusts, chosen here on its own.
                    let all_ones = |w: usize| original[2 * w..2 * w + 2] == [0xff, 0xff];
                    let adjusted = if len <= 48 {
                        3
                    } else {
                        (4..8).find(|&w| !all_ones(w)).expect("an adjustable word")
                    };
                    for bit in usize::from(len)..128 {
                        if bit / 16 == adjusted {
                            continue;
                        }
                        let (byte, m) = (bit / 8, 0x80u8 >> (bit % 8));
                        prop_assert_eq!(a[byte] & m, original[byte] & m, "bit {}", bit);
                    }
                    prop_assert_eq!(sum(&a), sum(&original));
                    back.apply(&mut a).expect("what went out comes back");
                    prop_assert_eq!(a, original);
                }
                Err(Untranslatable::NoAdjustableWord) => prop_assert_eq!(a, original),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
    }
}
