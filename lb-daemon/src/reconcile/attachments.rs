//! Where lb's programs are attached: `lan_ingress` on every interface the
//! LANs' frames arrive on (a LAN interface, or each port of a LAN bridge:
//! XDP cannot redirect into a bridge), `wan_ingress` on every uplink whose
//! interface exists, and the hand-off program (tc ingress) beside each,
//! attached first: a frame XDP hands over must always find it. An L3
//! uplink (no Ethernet header: a tunnel, a raw-IP modem) gets
//! `wan_ingress_l3` at tc ingress instead: XDP frames are Ethernet frames.
//!
//! [`wanted_lan_ports`] is a function of the config and the snapshot;
//! [`Attachments`] converges and remembers the links it holds. It never
//! attaches to an interface nobody configured.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::programs::{tc::SchedClassifierLinkId, xdp::XdpLinkId};
use lb_common::maps::program;

use crate::{
    config::LanConfig,
    dataplane::{AttachMode, Dataplane},
    observe::kernel::Observed,
};

/// The interfaces `lan_ingress` belongs on, by index: every LAN's, or its
/// bridge's ports, as the kernel has them now.
pub fn wanted_lan_ports(lans: &[LanConfig], observed: &Observed) -> BTreeMap<u32, String> {
    lans.iter()
        .flat_map(|lan| observed.lan_ports(&lan.interface))
        .collect()
}

/// The attachments lbd holds.
#[derive(Debug, Default)]
pub struct Attachments {
    /// `lan_ingress`'s, by interface index.
    lan_ports: BTreeMap<u32, (String, XdpLinkId)>,
    /// The hand-off program's, by interface name.
    handoffs: BTreeMap<String, SchedClassifierLinkId>,
    /// Why the hand-off program could not be attached somewhere, if it
    /// could not: no qdisc is honoured then.
    handoff_failed: Option<String>,
    /// `wan_ingress_l3`'s, on L3 uplinks, by interface name.
    l3_uplinks: BTreeMap<String, SchedClassifierLinkId>,
    /// LAN ports `lan_ingress` could not be attached to, and why: their
    /// clients' traffic takes the kernel's path meanwhile.
    lan_faults: BTreeMap<String, String>,
}

impl Attachments {
    /// Attach `lan_ingress` to every interface of `wanted` (ports that
    /// join a bridge while lbd runs too), and detach it from those that
    /// left; replies are redirected to them.
    pub fn converge_lans(
        &mut self,
        wanted: BTreeMap<u32, String>,
        dataplane: &mut Dataplane,
    ) -> Result<()> {
        let gone: Vec<u32> = self
            .lan_ports
            .iter()
            .filter(|(i, (name, _))| wanted.get(i) != Some(name))
            .map(|(i, _)| *i)
            .collect();
        for ifindex in gone {
            // Replies stop going to it first; should that fail, the port
            // stays on the books and the next round tries again.
            dataplane.remove_lan(ifindex)?;
            if let Some((name, link)) = self.lan_ports.remove(&ifindex) {
                dataplane.detach(program::LAN_INGRESS, &name, link)?;
                if let Some(link) = self.handoffs.remove(&name) {
                    dataplane.detach_handoff(&name, link)?;
                }
                log::info!("LAN port {name} left: lan_ingress detached from it");
            }
        }
        // One port lbd cannot attach to (someone else's XDP program on
        // it) holds up no other, nor the rest of the round: its clients
        // take the kernel's path, as they would without lb, until it can.
        self.lan_faults
            .retain(|name, _| wanted.values().any(|n| n == name));
        for (ifindex, name) in wanted {
            if self.lan_ports.contains_key(&ifindex) {
                continue;
            }
            match self.attach_lan(ifindex, &name, dataplane) {
                Ok(link) => {
                    if self.lan_faults.remove(&name).is_some() {
                        log::info!("LAN port {name}: lan_ingress attached at last");
                    }
                    self.lan_ports.insert(ifindex, (name, link));
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if self.lan_faults.get(&name) != Some(&why) {
                        log::warn!(
                            "LAN port {name}: lan_ingress not attached, so its clients take the \
                             kernel's path (tried again every round): {why}"
                        );
                        self.lan_faults.insert(name, why);
                    }
                }
            }
        }
        Ok(())
    }

    /// Attach `lan_ingress` to LAN port `name` (index `ifindex`), replies
    /// allowed to it first; should the attachment fail, they are not.
    fn attach_lan(
        &mut self,
        ifindex: u32,
        name: &str,
        dataplane: &mut Dataplane,
    ) -> Result<XdpLinkId> {
        self.attach_handoff(name, dataplane);
        dataplane.add_lan(ifindex)?;
        match dataplane.attach(program::LAN_INGRESS, name) {
            Ok((mode, link)) => {
                log_attach(program::LAN_INGRESS, name, mode);
                if mode == AttachMode::Generic {
                    // Generic XDP runs after the port's own checksum work:
                    // a sender on this host (a container's veth, a VM's
                    // tap) may hand over TCP with its checksum left to
                    // offload, which lb's rewrite cannot see.
                    log::warn!(
                        "{name}: in generic mode lb needs complete checksums from the port's                          senders; a container or VM behind it must not offload them (`ethtool                          -K <its interface> tx off`), or its connections break"
                    );
                }
                Ok(link)
            }
            Err(e) => {
                let _ = dataplane.remove_lan(ifindex);
                Err(e)
            }
        }
    }

    /// LAN ports `lan_ingress` could not be attached to, with why.
    pub fn lan_faults(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lan_faults
            .iter()
            .map(|(n, why)| (n.as_str(), why.as_str()))
    }

    /// Attach `wan_ingress` to uplink interface `interface` (index
    /// `ifindex`, `None` while it does not exist), or `wan_ingress_l3` to
    /// an `l3` one, unless `attached` says it is there already; records it
    /// in `attached`.
    pub fn converge_uplink(
        &mut self,
        interface: &str,
        ifindex: Option<u32>,
        l3: bool,
        attached: &mut Option<u32>,
        dataplane: &mut Dataplane,
    ) -> Result<()> {
        let Some(ifindex) = ifindex else {
            *attached = None;
            return Ok(());
        };
        if *attached != Some(ifindex) && l3 {
            if let Some(link) = self.l3_uplinks.remove(interface) {
                dataplane.detach_tc(program::WAN_INGRESS_L3, interface, link)?;
            }
            let link = dataplane
                .attach_tc(program::WAN_INGRESS_L3, interface)
                .with_context(|| format!("uplink {interface} (an L3 device)"))?;
            log::info!(
                "attached {} to the tc ingress of {interface} (an L3 device: no XDP)",
                program::WAN_INGRESS_L3
            );
            self.l3_uplinks.insert(interface.to_owned(), link);
            *attached = Some(ifindex);
        }
        if *attached != Some(ifindex) {
            self.attach_handoff(interface, dataplane);
            let (mode, _) = dataplane.attach(program::WAN_INGRESS, interface)?;
            log_attach(program::WAN_INGRESS, interface, mode);
            *attached = Some(ifindex);
        }
        Ok(())
    }

    /// The LAN ports `lan_ingress` is attached to, by index.
    pub fn lan_ports(&self) -> impl Iterator<Item = (u32, &str)> {
        self.lan_ports.iter().map(|(i, (n, _))| (*i, n.as_str()))
    }

    /// Whether `lan_ingress` is attached to interface `ifindex`.
    pub fn has_lan_port(&self, ifindex: u32) -> bool {
        self.lan_ports.contains_key(&ifindex)
    }

    /// Why the hand-off program is missing somewhere, if it is.
    pub fn handoff_failed(&self) -> Option<&str> {
        self.handoff_failed.as_deref()
    }

    /// (Re)attach the hand-off program to `interface`'s tc ingress. A
    /// kernel without TCX (before 6.6) cannot have it: lb then sends by
    /// XDP alone, says so once, and honours no qdisc.
    fn attach_handoff(&mut self, interface: &str, dataplane: &mut Dataplane) {
        match dataplane.attach_handoff(interface) {
            Ok(link) => {
                self.handoffs.insert(interface.to_owned(), link);
            }
            Err(e) => {
                let e = format!("{e:#}");
                if self.handoff_failed.is_none() {
                    log::warn!("{interface}: {e}; lb's packets skip every qdisc (XDP alone)");
                }
                self.handoff_failed = Some(e);
            }
        }
    }
}

fn log_attach(prog: &str, ifname: &str, mode: AttachMode) {
    match mode {
        AttachMode::Native => log::info!("attached {prog} to {ifname} (native XDP)"),
        AttachMode::Adopted => {
            log::info!("took over {prog} on {ifname} from the pinned data plane (no packet missed)")
        }
        AttachMode::Generic => {
            log::warn!("attached {prog} to {ifname} in generic (skb) mode: the driver has no native XDP, expect lower throughput")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::kernel::LinkFacts;

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> LinkFacts {
        LinkFacts::sample(index, name, kind, master)
    }

    #[test]
    fn lan_ingress_belongs_on_a_lans_own_interface_or_its_bridges_ports() {
        let observed = Observed {
            links: vec![
                link(2, "br-lan", "bridge", None),
                link(3, "lan0", "veth", Some(2)),
                link(4, "lan1", "veth", Some(2)),
                link(5, "guest", "veth", None),
                link(6, "wan1", "veth", None),
            ],
            ..Observed::default()
        };
        let lans = |names: &[&str]| -> Vec<LanConfig> {
            names
                .iter()
                .map(|n| LanConfig {
                    prefix6: None,
                    interface: (*n).into(),
                })
                .collect()
        };
        let wanted = wanted_lan_ports(&lans(&["br-lan", "guest", "missing"]), &observed);
        let names: Vec<&str> = wanted.values().map(String::as_str).collect();
        assert_eq!(names, ["lan0", "lan1", "guest"]);
        assert!(wanted_lan_ports(&lans(&["missing"]), &observed).is_empty());
    }
}
