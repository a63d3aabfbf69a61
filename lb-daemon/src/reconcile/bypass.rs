//! Destinations the data plane leaves to the kernel: the router's own
//! addresses, and everything the main table (and `[routing]
//! lookup_tables`) routes other than by a default route, unless it leaves
//! through an uplink (connected LAN subnets, static and VPN routes). The
//! data plane looks them up for packets of no flow only (`BYPASS`). And
//! what an IPsec policy encrypts: the kernel's, wherever it is routed.
//!
//! [`wanted`] is a function of the kernel's snapshot; [`Bypass::converge`]
//! writes the difference to the data plane's trie and remembers what it
//! wrote. It never touches a flow.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::Result;

use crate::{dataplane::Dataplane, observe::kernel::Observed};

/// The destinations the kernel keeps, given the uplinks' interfaces (their
/// routes are the internet's, NATed like the rest), and those an IPsec
/// policy encrypts, whatever the routes say (`observe::xfrm`).
pub fn wanted(
    observed: &Observed,
    uplink_ifindexes: &[u32],
    lookup_tables: &[u32],
) -> BTreeSet<(Ipv4Addr, u8)> {
    let mut kept = observed.kernel_destinations(uplink_ifindexes, lookup_tables);
    kept.extend(
        observed
            .ipsec
            .iter()
            .flatten()
            .filter_map(|&(addr, len)| match addr {
                IpAddr::V4(a) => Some((masked(a, len), len)),
                IpAddr::V6(_) => None,
            }),
    );
    kept
}

/// `addr` with the bits past `len` cleared (a policy may name its prefix
/// by any address in it).
fn masked(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

/// What the data plane's bypass trie holds, as lbd wrote it.
#[derive(Debug, Default)]
pub struct Bypass {
    written: BTreeSet<(Ipv4Addr, u8)>,
}

impl Bypass {
    /// What an adopted data plane's trie holds: what the earlier lbd wrote,
    /// to converge from (a prefix it no longer wants is removed then).
    pub fn adopted(prefixes: impl IntoIterator<Item = (Ipv4Addr, u8)>) -> Self {
        Self {
            written: prefixes.into_iter().collect(),
        }
    }

    /// Make the trie hold `wanted`: new prefixes added, then gone ones
    /// removed (a covering prefix that replaces a narrower one leaves no
    /// gap), then what found no room added again. A prefix that cannot be
    /// written holds up no other; the errors are said together. Returns
    /// the prefixes added (whose pinned flows the caller lets go), even
    /// when some could not be.
    pub fn converge(
        &mut self,
        wanted: BTreeSet<(Ipv4Addr, u8)>,
        dataplane: &mut Dataplane,
    ) -> (Vec<(Ipv4Addr, u8)>, Result<()>) {
        let mut added = Vec::new();
        let first = self.add_new(&wanted, dataplane, &mut added);
        let mut errors = Vec::new();
        let gone: Vec<_> = self.written.difference(&wanted).copied().collect();
        for (addr, len) in gone {
            match dataplane.remove_bypass(addr, len) {
                Ok(()) => {
                    self.written.remove(&(addr, len));
                    log::debug!("{addr}/{len} is no longer left to the kernel");
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if !first.is_empty() {
            errors.extend(self.add_new(&wanted, dataplane, &mut added));
        }
        let result = if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{} of the destinations the kernel keeps: {}",
                errors.len(),
                errors.join("; ")
            ))
        };
        (added, result)
    }

    /// Add what of `wanted` the trie lacks, each added into `added`; the
    /// errors of those that could not be.
    fn add_new(
        &mut self,
        wanted: &BTreeSet<(Ipv4Addr, u8)>,
        dataplane: &mut Dataplane,
        added: &mut Vec<(Ipv4Addr, u8)>,
    ) -> Vec<String> {
        let new: Vec<_> = wanted.difference(&self.written).copied().collect();
        let mut errors = Vec::new();
        for (addr, len) in new {
            match dataplane.add_bypass(addr, len) {
                Ok(()) => {
                    self.written.insert((addr, len));
                    added.push((addr, len));
                    log::debug!("{addr}/{len} is left to the kernel");
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        errors
    }

    /// The prefixes left to the kernel now.
    pub fn prefixes(&self) -> &BTreeSet<(Ipv4Addr, u8)> {
        &self.written
    }
}
