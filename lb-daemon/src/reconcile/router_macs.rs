//! The router's own MAC addresses on each LAN port (map `ROUTER_MACS`):
//! the frames a client sends to the router, as opposed to those a bridge
//! port also sees on their way to another host. `lan_ingress` pins a new
//! flow only from the former; a frame for a second gateway on the LAN (a
//! VPN box that clients route the head office through, another router)
//! is the bridge's to forward, as it would be without lb.
//!
//! [`wanted`] is a function of the config and the snapshot; [`RouterMacs`]
//! converges the map to it and never writes another map. A port whose
//! MACs do not fit an entry gets none, and is served as before (every
//! frame taken as the router's): a missing MAC would cut its clients off.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use lb_common::maps::{self, MAX_ROUTER_MACS};

use crate::{config::LanConfig, dataplane::Dataplane, observe::kernel::Observed};

/// Each LAN port's entry, by ifindex, and the ports left without one
/// (named, with their count of MACs).
pub fn wanted(
    lans: &[LanConfig],
    observed: &Observed,
) -> (BTreeMap<u32, maps::RouterMacs>, Vec<(String, usize)>) {
    // Per port: its name, the router's own MACs, its bridge's ports'.
    type Macs = BTreeSet<[u8; 6]>;
    let mut per_port: BTreeMap<u32, (String, Macs, Macs)> = BTreeMap::new();
    for lan in lans {
        let Some(link) = observed.link(&lan.interface) else {
            continue;
        };
        // The LAN interface's own and those of the devices on top of it
        // (a VLAN, a VRRP macvlan): the addresses clients are given.
        let own: BTreeSet<[u8; 6]> = observed
            .links
            .iter()
            .filter(|l| l.index == link.index || l.lower == Some(link.index))
            .filter_map(|l| l.mac)
            .collect();
        // A bridge's ports' too, as room allows (the bridge takes a frame
        // to any of them as its own, but no client is told of them).
        let ports: BTreeSet<[u8; 6]> = observed
            .links
            .iter()
            .filter(|l| l.master == Some(link.index))
            .filter_map(|l| l.mac)
            .collect();
        for (ifindex, name) in observed.lan_ports(&lan.interface) {
            let entry = per_port
                .entry(ifindex)
                .or_insert((name, BTreeSet::new(), BTreeSet::new()));
            entry.1.extend(&own);
            entry.2.extend(&ports);
        }
    }
    let mut entries = BTreeMap::new();
    let mut unfit = Vec::new();
    for (ifindex, (name, own, ports)) in per_port {
        if own.len() > MAX_ROUTER_MACS {
            unfit.push((name, own.len()));
            continue;
        }
        let room = MAX_ROUTER_MACS - own.len();
        let macs = own
            .iter()
            .chain(ports.iter().filter(|m| !own.contains(*m)).take(room))
            .copied();
        // None without any MAC known yet: nothing to tell frames apart by.
        if let Some(entry) = maps::RouterMacs::new(macs).filter(|e| e.len > 0) {
            entries.insert(ifindex, entry);
        }
    }
    (entries, unfit)
}

/// The entries lbd wrote.
#[derive(Debug, Default)]
pub struct RouterMacs {
    /// As written; `None` until read from the data plane (an adopted one
    /// holds an earlier lbd's entries).
    written: Option<BTreeMap<u32, maps::RouterMacs>>,
    /// The ports last said to have too many MACs, so that it is said once.
    unfit: Vec<(String, usize)>,
}

impl RouterMacs {
    /// Write the entries that differ from `wanted`'s, and remove those of
    /// ports that are no longer a LAN's.
    pub fn converge(
        &mut self,
        lans: &[LanConfig],
        observed: &Observed,
        dataplane: &mut Dataplane,
    ) -> Result<()> {
        let (wanted, unfit) = wanted(lans, observed);
        if unfit != self.unfit {
            for (name, n) in &unfit {
                log::warn!(
                    "LAN port {name}: the router answers at {n} MAC addresses, more than lb keeps ({MAX_ROUTER_MACS}); every frame on it is taken as the router's, including those to another gateway on the LAN"
                );
            }
            self.unfit = unfit;
        }
        let written = match self.written.take() {
            Some(written) => written,
            None => dataplane.router_macs()?.into_iter().collect(),
        };
        // What was written stays known whatever fails below: a failed
        // write is retried next round.
        let mut now = written.clone();
        let result = (|| {
            for (ifindex, entry) in &wanted {
                if written.get(ifindex) != Some(entry) {
                    dataplane.set_router_macs(*ifindex, Some(*entry))?;
                    now.insert(*ifindex, *entry);
                }
            }
            for ifindex in written.keys().filter(|i| !wanted.contains_key(i)) {
                dataplane.set_router_macs(*ifindex, None)?;
                now.remove(ifindex);
            }
            Ok(())
        })();
        self.written = Some(now);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::kernel::LinkFacts;

    fn link(
        index: u32,
        name: &str,
        kind: &str,
        master: Option<u32>,
        lower: Option<u32>,
    ) -> LinkFacts {
        LinkFacts {
            mac: Some([0x02, 0, 0, 0, 0, index as u8]),
            lower,
            ..LinkFacts::sample(index, name, kind, master)
        }
    }

    fn lans(names: &[&str]) -> Vec<LanConfig> {
        names
            .iter()
            .map(|n| LanConfig {
                prefix6: None,
                interface: (*n).into(),
            })
            .collect()
    }

    #[test]
    fn a_bridges_ports_know_the_bridges_its_ports_and_its_uppers_macs() {
        let observed = Observed {
            links: vec![
                link(2, "br-lan", "bridge", None, None),
                link(3, "lan1", "veth", Some(2), None),
                link(4, "lan2", "veth", Some(2), None),
                link(5, "vrrp", "macvlan", None, Some(2)),
                link(6, "guest", "veth", None, None),
                link(7, "wan1", "veth", None, None),
            ],
            ..Observed::default()
        };
        let (entries, unfit) = wanted(&lans(&["br-lan", "guest", "missing"]), &observed);
        assert!(unfit.is_empty());
        assert_eq!(entries.keys().copied().collect::<Vec<_>>(), [3, 4, 6]);
        let mac = |i: u8| [0x02, 0, 0, 0, 0, i];
        for port in [3, 4] {
            let entry = entries[&port];
            assert_eq!(entry.len, 4);
            for i in [2, 3, 4, 5] {
                assert!(entry.holds(&mac(i)), "port {port}, MAC {i}");
            }
            assert!(!entry.holds(&mac(6)) && !entry.holds(&mac(7)));
        }
        let guest = entries[&6];
        assert!(guest.holds(&mac(6)) && !guest.holds(&mac(2)));
    }

    #[test]
    fn the_ports_own_macs_give_way_first_and_too_many_of_the_routers_leave_no_entry() {
        // A bridge hosting many taps: its ports' MACs fill what room is
        // left beside the bridge's.
        let mut links = vec![link(2, "br-lan", "bridge", None, None)];
        links.extend(
            (0..2 * MAX_ROUTER_MACS as u32).map(|i| link(10 + i, "tap", "tun", Some(2), None)),
        );
        let observed = Observed {
            links,
            ..Observed::default()
        };
        let (entries, unfit) = wanted(&lans(&["br-lan"]), &observed);
        assert!(unfit.is_empty());
        let entry = entries[&10];
        assert_eq!(entry.len as usize, MAX_ROUTER_MACS);
        assert!(
            entry.holds(&[0x02, 0, 0, 0, 0, 2]),
            "the bridge's own is kept"
        );
        // More addresses clients are given than an entry holds: none.
        let mut links = vec![
            link(2, "br-lan", "bridge", None, None),
            link(3, "lan1", "veth", Some(2), None),
        ];
        links.extend(
            (0..MAX_ROUTER_MACS as u32).map(|i| link(40 + i, "vrrp", "macvlan", None, Some(2))),
        );
        let observed = Observed {
            links,
            ..Observed::default()
        };
        let (entries, unfit) = wanted(&lans(&["br-lan"]), &observed);
        assert!(entries.is_empty());
        assert_eq!(unfit, [("lan1".to_string(), MAX_ROUTER_MACS + 1)]);
    }
}
