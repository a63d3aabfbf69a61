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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt {
    /// The first 64 bits of the new prefix, as big-endian words, zero
    /// outside the prefix.
    prefix: [u16; 4],
    /// The first 64 bits of the prefix translated from, as `prefix`.
    from: [u16; 4],
    /// Which bits of the first 64 the prefix covers.
    mask: [u16; 4],
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

/// The first 64 bits of `addr` as four big-endian words.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u16; 4] {
    [
        u16::from_be_bytes([addr[0], addr[1]]),
        u16::from_be_bytes([addr[2], addr[3]]),
        u16::from_be_bytes([addr[4], addr[5]]),
        u16::from_be_bytes([addr[6], addr[7]]),
    ]
}

/// The masks of a `len`-bit prefix over four words.
#[inline(always)]
fn masks(len: u8) -> [u16; 4] {
    let mut out = [0u16; 4];
    let mut w = 0;
    while w < 4 {
        let start = 16 * w as u32;
        let bits = (len as u32).saturating_sub(start).min(16);
        out[w] = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        w += 1;
    }
    out
}

/// Ones'-complement sum of four words.
#[inline(always)]
fn sum4(w: [u16; 4]) -> u16 {
    csum::add(csum::add(w[0], w[1]), csum::add(w[2], w[3]))
}

impl Npt {
    /// The translation from prefix `from` to prefix `to`, both `len` bits
    /// long (bits past `len` are ignored). `None` when `len` is 0 or
    /// longer than [`MAX_PREFIX_LEN`].
    pub fn new(from: [u8; 16], to: [u8; 16], len: u8) -> Option<Self> {
        if len == 0 || len > MAX_PREFIX_LEN {
            return None;
        }
        let mask = masks(len);
        let from = words(&from);
        let to = words(&to);
        let mut old = [0u16; 4];
        let mut prefix = [0u16; 4];
        for w in 0..4 {
            old[w] = from[w] & mask[w];
            prefix[w] = to[w] & mask[w];
        }
        // The prefix's words change the sum by `new - old`; the
        // adjustment word takes it back.
        Some(Self {
            prefix,
            from: old,
            mask,
            adjustment: csum::sub(sum4(old), sum4(prefix)),
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
        let mask = masks(len.min(MAX_PREFIX_LEN));
        let (a, f) = (words(addr), words(from));
        (0..4).all(|w| a[w] & mask[w] == f[w] & mask[w])
    }

    /// Whether `addr` is under the prefix this translates from.
    #[inline(always)]
    pub fn takes(&self, addr: &[u8; 16]) -> bool {
        let a = words(addr);
        (a[0] & self.mask[0]) == self.from[0]
            && (a[1] & self.mask[1]) == self.from[1]
            && (a[2] & self.mask[2]) == self.from[2]
            && (a[3] & self.mask[3]) == self.from[3]
    }

    /// Whether the translation changes nothing (from a prefix to itself).
    #[inline(always)]
    pub fn is_identity(&self) -> bool {
        self.from == self.prefix
    }

    /// Translate `addr` in place. The caller has checked that `addr` is
    /// under the source prefix ([`Npt::covers`]); an address that is not
    /// would be moved under the new prefix all the same.
    #[inline(always)]
    pub fn apply(&self, addr: &mut [u8; 16]) -> Result<(), Untranslatable> {
        // Which word absorbs the difference (a byte offset).
        let at = if self.len <= 48 {
            6
        } else {
            match [8usize, 10, 12, 14]
                .into_iter()
                .find(|&i| u16::from_be_bytes([addr[i], addr[i + 1]]) != 0xffff)
            {
                Some(i) => i,
                None => return Err(Untranslatable::NoAdjustableWord),
            }
        };
        let word = u16::from_be_bytes([addr[at], addr[at + 1]]);
        if word == 0xffff {
            return Err(Untranslatable::NoAdjustableWord);
        }
        let mut adjusted = csum::add(word, self.adjustment);
        if adjusted == 0xffff {
            adjusted = 0;
        }
        let old = words(addr);
        for w in 0..4 {
            let new = (old[w] & !self.mask[w]) | self.prefix[w];
            addr[2 * w..2 * w + 2].copy_from_slice(&new.to_be_bytes());
        }
        addr[at..at + 2].copy_from_slice(&adjusted.to_be_bytes());
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
    fn an_all_ones_host_part_is_not_translated() {
        let npt = Npt::new(addr("2001:db8:1::"), addr("2001:db8:2::"), 64).expect("translation");
        let mut a = addr("2001:db8:1::ffff:ffff:ffff:ffff");
        let before = a;
        assert_eq!(npt.apply(&mut a), Err(Untranslatable::NoAdjustableWord));
        assert_eq!(a, before, "left as it was");
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
            let mask = masks(len);
            let mut a = host;
            for w in 0..4 {
                let v = (u16::from_be_bytes([host[2 * w], host[2 * w + 1]]) & !mask[w])
                    | (u16::from_be_bytes([inside[2 * w], inside[2 * w + 1]]) & mask[w]);
                a[2 * w..2 * w + 2].copy_from_slice(&v.to_be_bytes());
            }
            prop_assert!(Npt::covers(&inside, len, &a));
            prop_assert!(out.takes(&a));
            let original = a;
            match out.apply(&mut a) {
                Ok(()) => {
                    prop_assert!(Npt::covers(&outside, len, &a));
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
