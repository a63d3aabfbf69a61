//! The bucket table: which uplink each of the [`BUCKETS`] hash buckets sends
//! new flows to.
//!
//! [`rebalance`] turns weights into a table with as few changes to the
//! current table as possible: a bucket only moves when its uplink can no
//! longer take new flows, or when its uplink holds more than its share. So
//! when an uplink goes away only its buckets move, spread over the others in
//! proportion to their weights, and when it comes back it takes its share
//! from all of them. The kernel only indexes the result; all the arithmetic
//! lives here, where it is tested.
//!
//! Existing flows never look at this table (they are pinned in the flow
//! table), so a move here only changes where *new* flows go.
//!
//! [`steer`] is how the data plane reads the table, here so that the kernel
//! and user space (tests, `explain`) share it. When a flow's bucket points
//! at an uplink that cannot take new flows (it has just been marked down,
//! and the daemon's rebalanced table is not written yet), the flow tries
//! [`FALLBACK_TRIES`] other buckets of the same table. The data plane thus
//! moves traffic off a dead uplink as soon as that uplink's *state* changes,
//! one map write, and weights and tiers still hold for the flows that move:
//! the other buckets belong to the live uplinks in proportion.

use crate::{hash, BUCKETS, MAX_UPLINKS, NO_UPLINK};

const B: usize = BUCKETS as usize;
const N: usize = MAX_UPLINKS as usize;

/// A bucket table: `table[bucket] = uplink index` or [`NO_UPLINK`].
pub type Table = [u32; B];

/// An empty table: every bucket without an uplink.
pub const fn empty() -> Table {
    [NO_UPLINK; B]
}

/// Exact share of the buckets for weight `w` out of `total`, as the integer
/// part and the remainder over `total`.
fn share(w: u32, total: u64) -> (u64, u64) {
    let scaled = u64::from(w) * B as u64;
    (scaled / total, scaled % total)
}

/// Rewrite `table` so that uplink `i` owns a share of buckets proportional to
/// `weights[i]` (within one bucket of the exact share), moving as few buckets
/// as it can. A weight of zero means the uplink takes no new flows. Returns
/// how many buckets changed owner.
pub fn rebalance(table: &mut Table, weights: &[u32; N]) -> usize {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let mut moved = 0;
    if total == 0 {
        for slot in table.iter_mut() {
            if *slot != NO_UPLINK {
                *slot = NO_UPLINK;
                moved += 1;
            }
        }
        return moved;
    }

    // Each uplink's target is its exact share rounded down or up, the
    // round-ups going first to uplinks that already hold that many buckets
    // (so they need not give one up), then to the largest remainders.
    let mut current = [0u64; N];
    for &owner in table.iter() {
        if let Some(c) = current.get_mut(owner as usize) {
            *c += 1;
        }
    }
    let mut target = [0u64; N];
    let mut rem = [0u64; N];
    for (i, &w) in weights.iter().enumerate() {
        (target[i], rem[i]) = share(w, total);
    }
    let mut spare = B as u64 - target.iter().sum::<u64>();
    while spare > 0 {
        // Candidates have a non-zero remainder; rank (already holds the
        // rounded-up count, remainder), first index wins ties.
        let mut best: Option<(usize, (bool, u64))> = None;
        for i in 0..N {
            if rem[i] == 0 {
                continue;
            }
            let rank = (current[i] > target[i], rem[i]);
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((i, rank));
            }
        }
        let Some((i, _)) = best else { break };
        target[i] += 1;
        rem[i] = 0;
        spare -= 1;
    }

    // An uplink keeps its current buckets up to its target; anything above
    // that, or owned by an uplink with no weight, is freed.
    let mut count = [0u64; N];
    for slot in table.iter_mut() {
        let owner = *slot as usize;
        if owner < N && weights[owner] > 0 && count[owner] < target[owner] {
            count[owner] += 1;
        } else {
            *slot = NO_UPLINK;
        }
    }

    // Hand freed buckets out one at a time to the uplink furthest below its
    // exact share (`count * total` against `w * B` keeps it in integers),
    // never beyond its target. Walking the table in order interleaves the
    // receivers, so no uplink gets one long run of buckets.
    for slot in table.iter_mut() {
        if *slot != NO_UPLINK {
            continue;
        }
        let mut best = None;
        let mut best_deficit = i128::MIN;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 || count[i] >= target[i] {
                continue;
            }
            let deficit = i128::from(u64::from(w) * B as u64) - i128::from(count[i] * total);
            if deficit > best_deficit {
                best_deficit = deficit;
                best = Some(i);
            }
        }
        if let Some(i) = best {
            *slot = i as u32;
            count[i] += 1;
            moved += 1;
        }
    }
    moved
}

/// Other buckets a new flow tries when its own bucket's uplink cannot take
/// it. With half the buckets dead, a flow finds none alive in 1 of 512
/// cases, and waits (dropped, counted) for the daemon's new table.
pub const FALLBACK_TRIES: u32 = 8;

/// The uplink a new flow with classifier hash `hash` goes to: the owner of
/// its bucket if `takes_new_flows` says that uplink can take it, else the
/// first such owner of its fallback buckets ([`hash::bucket_for`]).
/// `owner(bucket)` reads the live table; `None` means no uplink.
#[inline(always)]
pub fn steer(
    hash: u32,
    mut owner: impl FnMut(u32) -> Option<u32>,
    mut takes_new_flows: impl FnMut(u32) -> bool,
) -> Option<u32> {
    (0..STEER_ATTEMPTS)
        .find_map(|attempt| steer_at(hash, attempt, &mut owner, &mut takes_new_flows))
}

/// How many buckets [`steer`] tries: the flow's own and its fallbacks.
pub const STEER_ATTEMPTS: u32 = FALLBACK_TRIES + 1;

/// One turn of [`steer`]: the uplink of the flow's bucket for `attempt`
/// (0 is its own bucket), if that uplink can take it. The data plane runs
/// the turns in a loop the verifier checks once, rather than once a turn.
#[inline(always)]
pub fn steer_at(
    hash: u32,
    attempt: u32,
    owner: impl FnOnce(u32) -> Option<u32>,
    takes_new_flows: impl FnOnce(u32) -> bool,
) -> Option<u32> {
    owner(hash::bucket_for(hash, attempt))
        .filter(|&uplink| uplink != NO_UPLINK && takes_new_flows(uplink))
}

/// How many buckets each uplink owns.
pub fn counts(table: &Table) -> [u32; N] {
    let mut c = [0u32; N];
    for &owner in table.iter() {
        if let Some(slot) = c.get_mut(owner as usize) {
            *slot += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn weights(ws: &[u32]) -> [u32; N] {
        let mut out = [0; N];
        out[..ws.len()].copy_from_slice(ws);
        out
    }

    /// Every uplink within one bucket of its exact share.
    fn assert_fair(table: &Table, w: &[u32; N]) {
        let total: u64 = w.iter().map(|&x| u64::from(x)).sum();
        let c = counts(table);
        for i in 0..N {
            let exact = u64::from(w[i]) * B as u64;
            let have = u64::from(c[i]) * total;
            assert!(
                have + total > exact && have < exact + total,
                "uplink {i}: {} buckets, weights {w:?}",
                c[i]
            );
        }
    }

    #[test]
    fn three_to_one_is_exact() {
        let mut t = empty();
        rebalance(&mut t, &weights(&[3, 1]));
        assert_eq!(counts(&t)[..2], [3072, 1024]);
    }

    #[test]
    fn no_weight_means_no_uplink() {
        let mut t = empty();
        rebalance(&mut t, &weights(&[1, 1]));
        assert_eq!(rebalance(&mut t, &weights(&[])), B);
        assert!(t.iter().all(|&u| u == NO_UPLINK));
    }

    #[test]
    fn receivers_are_interleaved() {
        let mut t = empty();
        rebalance(&mut t, &weights(&[1, 1]));
        // Alternating, not two halves: no run longer than one.
        assert!(t.windows(2).all(|p| p[0] != p[1]));
    }

    #[test]
    fn steer_keeps_live_buckets_and_skips_dead_ones() {
        let mut t = empty();
        rebalance(&mut t, &weights(&[1, 1, 1]));
        let owner = |b: u32| t.get(b as usize).copied();
        let mut moved = [0u32; 3];
        for h in 0..20_000u32 {
            let h = h.wrapping_mul(0x9e37_79b9);
            let own = t[hash::bucket(h) as usize];
            // All alive: always the own bucket's uplink.
            assert_eq!(steer(h, owner, |_| true), Some(own));
            // Uplink 0 dead: its flows go to 1 or 2, the others stay.
            let got = steer(h, owner, |u| u != 0);
            if own == 0 {
                if let Some(u) = got {
                    moved[u as usize] += 1;
                }
            } else {
                assert_eq!(got, Some(own));
            }
            assert_eq!(steer(h, owner, |_| false), None);
        }
        assert_eq!(moved[0], 0);
        // Spread over both survivors, roughly evenly.
        let (a, b) = (moved[1], moved[2]);
        assert!(a > 2_500 && b > 2_500, "moved to 1: {a}, to 2: {b}");
    }

    proptest! {
        #[test]
        fn any_weights_are_fair(ws in proptest::collection::vec(0u32..1000, 1..=N)) {
            let w = weights(&ws);
            prop_assume!(w.iter().any(|&x| x > 0));
            let mut t = empty();
            rebalance(&mut t, &w);
            assert_fair(&t, &w);
        }

        #[test]
        fn removing_an_uplink_moves_only_its_buckets(
            ws in proptest::collection::vec(1u32..1000, 2..=N),
            gone in 0usize..N,
        ) {
            let gone = gone % ws.len();
            let w = weights(&ws);
            let mut before = empty();
            rebalance(&mut before, &w);
            let mut after = before;
            let mut w2 = w;
            w2[gone] = 0;
            let moved = rebalance(&mut after, &w2);
            for (b, a) in before.iter().zip(after.iter()) {
                if *b as usize != gone {
                    prop_assert_eq!(a, b);
                } else {
                    prop_assert_ne!(*a as usize, gone);
                }
            }
            prop_assert_eq!(moved as u32, counts(&before)[gone]);
            assert_fair(&after, &w2);
        }

        #[test]
        fn bringing_one_back_only_moves_buckets_to_it(
            ws in proptest::collection::vec(1u32..1000, 2..=N),
            back in 0usize..N,
        ) {
            let back = back % ws.len();
            let mut w = weights(&ws);
            let full = w;
            w[back] = 0;
            let mut before = empty();
            rebalance(&mut before, &w);
            let mut after = before;
            rebalance(&mut after, &full);
            for (b, a) in before.iter().zip(after.iter()) {
                prop_assert!(a == b || *a as usize == back);
            }
            assert_fair(&after, &full);
        }
    }
}
