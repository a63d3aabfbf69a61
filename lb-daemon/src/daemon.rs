//! The daemon's state and its one write path to the data plane.
//!
//! Owns the runtime view of every uplink (operator state, health, weight)
//! and turns it into data-plane state: per-uplink states, then a rebalanced
//! bucket table, always in that order so that no bucket ever points at an
//! uplink the data plane believes is down. Startup (`Daemon::start`) checks
//! everything it needs from the kernel before it attaches anything.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use lb_common::{
    hash,
    maps::{program, tcp_state, uplink_state, FlowKey, FlowValue, NatKey, UplinkInfo},
    reason,
    table::{self, Table},
};

use crate::{
    api::{Status, UplinkStatus},
    balancer::{self, Candidate},
    config::{ClassifierMode, Config, UplinkConfig},
    dataplane::{AttachMode, Dataplane},
    netlink::Netlink,
};

/// How long to wait for a gateway to answer ARP at startup.
const GATEWAY_ARP_WAIT: Duration = Duration::from_secs(3);

/// The operator's say over an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    Enabled,
    Disabled,
    Drain,
}

/// What probes and link events say about an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

#[derive(Debug)]
pub struct Uplink {
    pub cfg: UplinkConfig,
    pub index: u32,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub admin: Admin,
    pub health: Health,
    pub weight: u32,
}

impl Uplink {
    /// The state the data plane should have for this uplink.
    pub fn dataplane_state(&self) -> u32 {
        match (self.admin, self.health) {
            (Admin::Disabled, _) | (_, Health::Down) => uplink_state::DOWN,
            (Admin::Drain, Health::Up) => uplink_state::DRAIN,
            (Admin::Enabled, Health::Up) => uplink_state::ACTIVE,
        }
    }
}

pub struct Daemon {
    pub config: Config,
    pub uplinks: Vec<Uplink>,
    dataplane: Dataplane,
    table: Table,
}

fn mode_number(mode: ClassifierMode) -> u32 {
    match mode {
        ClassifierMode::FiveTuple => hash::mode::FIVE_TUPLE,
        ClassifierMode::SrcDstAddress => hash::mode::SRC_DST_ADDRESS,
        ClassifierMode::SrcAddress => hash::mode::SRC_ADDRESS,
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        uplink_state::ACTIVE => "active",
        uplink_state::DRAIN => "drain",
        uplink_state::DOWN => "down",
        _ => "unused",
    }
}

impl Daemon {
    /// Resolve every interface and gateway, load the data plane, fill its
    /// maps and attach the programs. Nothing is attached unless everything
    /// before succeeded.
    /// `local_ports` is the kernel's `ip_local_port_range`, which NAT keeps
    /// clear of.
    pub async fn start(config: Config, local_ports: (u16, u16)) -> Result<Self> {
        let nl = Netlink::connect()?;

        let mut uplinks = Vec::new();
        let mut infos = Vec::new();
        for (index, cfg) in config.uplinks.iter().enumerate() {
            let ctx = || format!("uplink {} ({})", cfg.name, cfg.interface);
            let link = nl.link(&cfg.interface).await.with_context(ctx)?;
            let addrs = nl
                .ipv4_addresses(Some(link.index))
                .await
                .with_context(ctx)?;
            let Some(&(addr, _)) = addrs.first() else {
                bail!("uplink {}: interface {} has no IPv4 address; lb uses it as the uplink's source address", cfg.name, cfg.interface);
            };
            let gw_mac = nl
                .resolve_gateway(&link, cfg.gateway, GATEWAY_ARP_WAIT)
                .await
                .with_context(ctx)?;
            let health = if link.up { Health::Up } else { Health::Down };
            let uplink = Uplink {
                cfg: cfg.clone(),
                index: index as u32,
                ifindex: link.index,
                addr,
                admin: Admin::Enabled,
                health,
                weight: cfg.weight,
            };
            infos.push(UplinkInfo {
                ifindex: link.index,
                state: uplink.dataplane_state(),
                addr: addr.octets(),
                src_mac: link.mac,
                gw_mac,
                mtu: link.mtu,
            });
            uplinks.push(uplink);
        }
        let mut lans = Vec::new();
        for lan in &config.lans {
            lans.push(
                nl.link(&lan.interface)
                    .await
                    .with_context(|| format!("LAN interface {}", lan.interface))?,
            );
        }
        // Traffic for the router itself and between its own subnets is the
        // kernel's: every local address, and every LAN subnet.
        let mut bypass = Vec::new();
        for (addr, _) in nl.ipv4_addresses(None).await? {
            bypass.push((addr, 32));
        }
        for lan in &lans {
            bypass.extend(nl.ipv4_addresses(Some(lan.index)).await?);
        }

        let mut dataplane = Dataplane::load(config.flows.max)?;
        dataplane.set_classifier(rand::random(), mode_number(config.balance.mode))?;
        dataplane.set_nat_ports((config.nat.port_min, config.nat.port_max), local_ports)?;
        for lan in &lans {
            dataplane.add_lan(lan.index)?;
        }
        for (uplink, info) in uplinks.iter().zip(&infos) {
            dataplane
                .set_uplink(uplink.index, info)
                .with_context(|| format!("uplink {}", uplink.cfg.name))?;
        }
        for (addr, len) in bypass {
            dataplane.add_bypass(addr, len)?;
        }
        let mut daemon = Self {
            config,
            uplinks,
            dataplane,
            table: table::empty(),
        };
        daemon.apply()?;

        for uplink in &daemon.uplinks {
            let mode = daemon
                .dataplane
                .attach(program::WAN_INGRESS, &uplink.cfg.interface)?;
            log_attach(program::WAN_INGRESS, &uplink.cfg.interface, mode);
        }
        for lan in &daemon.config.lans {
            let mode = daemon
                .dataplane
                .attach(program::LAN_INGRESS, &lan.interface)?;
            log_attach(program::LAN_INGRESS, &lan.interface, mode);
        }
        Ok(daemon)
    }

    /// Push every uplink's state to the data plane, then the bucket table
    /// that follows from it.
    pub fn apply(&mut self) -> Result<()> {
        for u in &self.uplinks {
            self.dataplane
                .set_uplink_state(u.index, u.dataplane_state())?;
        }
        let candidates: Vec<Candidate> = self
            .uplinks
            .iter()
            .map(|u| Candidate {
                weight: u.weight,
                tier: u.cfg.tier,
                takes_new_flows: u.dataplane_state() == uplink_state::ACTIVE,
            })
            .collect();
        let mut next = self.table;
        let moved = table::rebalance(&mut next, &balancer::weights(&candidates));
        if moved > 0 || self.table == table::empty() {
            self.dataplane.set_buckets(&next)?;
            log::info!(
                "bucket table updated: {moved} of {} buckets moved",
                lb_common::BUCKETS
            );
        }
        self.table = next;
        Ok(())
    }

    /// Remove flows idle for longer than their timeout, with their NAT
    /// mappings, and NAT mappings whose flow is gone. Returns how many flows
    /// were removed.
    pub fn collect_expired(&mut self, now_ns: u64) -> Result<usize> {
        let flows = self.dataplane.flows()?;
        let mut removed = 0;
        let mut live = std::collections::HashSet::new();
        for (key, value) in &flows {
            let idle = Duration::from_nanos(now_ns.saturating_sub(value.last_seen_ns));
            let rev = self.rev_key(key, value);
            if idle > self.timeout(key, value) {
                self.dataplane.remove_flow(key, rev.as_ref())?;
                removed += 1;
            } else if let Some(rev) = rev {
                live.insert(rev);
            }
        }
        // A mapping without its flow (the flow table evicted it when full)
        // would hold its port forever.
        for (rev, back) in self.dataplane.nat_entries()? {
            if !live.contains(&rev) {
                let key = FlowKey {
                    src_addr: back.client_addr,
                    dst_addr: rev.remote_addr,
                    src_port: back.client_port,
                    dst_port: rev.remote_port,
                    proto: rev.proto,
                    _pad: [0; 3],
                };
                if !flows.iter().any(|(k, _)| *k == key) {
                    self.dataplane.remove_nat(&rev)?;
                }
            }
        }
        Ok(removed)
    }

    fn rev_key(&self, key: &FlowKey, value: &FlowValue) -> Option<NatKey> {
        let uplink = self.uplinks.get(value.uplink as usize)?;
        Some(NatKey {
            nat_addr: uplink.addr.octets(),
            remote_addr: key.dst_addr,
            nat_port: value.nat_port,
            remote_port: key.dst_port,
            proto: key.proto,
            _pad: [0; 3],
        })
    }

    /// Idle timeout of a flow: RFC 5382 for TCP (long once established,
    /// short while opening or closing), RFC 4787 for UDP.
    fn timeout(&self, key: &FlowKey, value: &FlowValue) -> Duration {
        let t = &self.config.flows;
        match (key.proto, value.tcp_state) {
            (6, tcp_state::ESTABLISHED) => t.tcp_established_timeout,
            (6, _) => t.tcp_transitory_timeout,
            (17, _) => t.udp_timeout,
            _ => t.icmp_timeout,
        }
    }

    pub fn status(&self) -> Result<Status> {
        let counts = table::counts(&self.table);
        let mut flows = vec![0u64; self.uplinks.len()];
        for (_, v) in self.dataplane.flows()? {
            if let Some(n) = flows.get_mut(v.uplink as usize) {
                *n += 1;
            }
        }
        let mut uplinks = Vec::new();
        for u in &self.uplinks {
            let s = self.dataplane.uplink_stats(u.index)?;
            uplinks.push(UplinkStatus {
                name: u.cfg.name.clone(),
                interface: u.cfg.interface.clone(),
                address: u.addr.to_string(),
                gateway: u.cfg.gateway.to_string(),
                weight: u.weight,
                tier: u.cfg.tier,
                admin: format!("{:?}", u.admin).to_lowercase(),
                health: format!("{:?}", u.health).to_lowercase(),
                state: state_name(u.dataplane_state()).to_string(),
                buckets: counts[u.index as usize],
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                new_flows: s.new_flows,
                flows: flows[u.index as usize],
                replies: s.replies,
                nat_failures: s.nat_failures,
            });
        }
        let reasons = self.dataplane.reasons()?;
        Ok(Status {
            mode: self.config.balance.mode.to_string(),
            uplinks,
            reasons: reason::NAMES
                .iter()
                .zip(reasons)
                .map(|(n, c)| (n.to_string(), c))
                .collect(),
        })
    }
}

fn log_attach(prog: &str, ifname: &str, mode: AttachMode) {
    match mode {
        AttachMode::Native => log::info!("attached {prog} to {ifname} (native XDP)"),
        AttachMode::Generic => {
            log::warn!("attached {prog} to {ifname} in generic (skb) mode: the driver has no native XDP, expect lower throughput")
        }
    }
}
