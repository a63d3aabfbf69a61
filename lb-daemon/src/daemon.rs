//! The daemon's state and its one write path to the data plane.
//!
//! Owns the runtime view of every uplink (operator state, health, weight)
//! and turns it into data-plane state: per-uplink states, then a rebalanced
//! bucket table, always in that order so that no bucket ever points at an
//! uplink the data plane believes is down. Startup (`Daemon::start`) checks
//! everything it needs from the kernel before it attaches anything.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use lb_common::{
    hash,
    maps::{program, uplink_state, UplinkInfo},
    reason,
    table::{self, Table},
};

use tokio::sync::{mpsc, watch};

use crate::{
    api::{Reaction, Status, UplinkAction, UplinkStatus},
    balancer::{self, Candidate},
    config::{ClassifierMode, Config, UplinkConfig, MAX_WEIGHT},
    dataplane::{AttachMode, Dataplane},
    flows::FlowTables,
    health::{self, HealthEvent, Monitor, Snapshot, State as Health},
    hooks,
    linkwatch::{GatewayEvent, LinkWatch},
    netlink::Netlink,
    probe::{self, Binding, UplinkProbe},
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

#[derive(Debug)]
pub struct Uplink {
    pub cfg: UplinkConfig,
    pub index: u32,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub admin: Admin,
    /// What probes and link events say (Up, Degraded or Down).
    pub health: Health,
    pub weight: u32,
    /// Why the uplink is in its state: the last transition's reason.
    pub reason: String,
    /// The health monitor's latest view (RTT, loss, jitter).
    pub snapshot: watch::Receiver<Snapshot>,
    /// Health transitions so far.
    pub transitions: u64,
    /// The gateway's Ethernet address, as the data plane has it.
    pub gateway_mac: [u8; 6],
    /// The state the data plane has for it (see `dataplane_state`).
    written_state: u32,
    /// How the last change of its state reached the data plane.
    pub last_change: Option<Reaction>,
}

impl Uplink {
    /// The state the data plane should have for this uplink.
    pub fn dataplane_state(&self) -> u32 {
        // Degraded uplinks keep their flows; whether they get new ones is
        // the balancer's call.
        match (self.admin, self.health) {
            (Admin::Disabled, _) | (_, Health::Down) => uplink_state::DOWN,
            (Admin::Drain, _) => uplink_state::DRAIN,
            (Admin::Enabled, _) => uplink_state::ACTIVE,
        }
    }
}

/// What the daemon reacts to besides the operator: health transitions, and
/// gateways that moved to another Ethernet address.
pub struct Events {
    pub health: mpsc::Receiver<HealthEvent>,
    pub gateways: mpsc::Receiver<GatewayEvent>,
}

pub struct Daemon {
    pub config: Config,
    pub uplinks: Vec<Uplink>,
    dataplane: Dataplane,
    table: Table,
    /// The flow tables as the collector and `status` walk them, on handles
    /// of their own (see `flows`); the lock keeps the two walks apart (a
    /// walk beside deletions may see an entry twice).
    flow_tables: Arc<Mutex<FlowTables>>,
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
    /// Also starts the health monitors and the link watch; what they report
    /// arrives on the returned channels, for [`Daemon::on_health`] and
    /// [`Daemon::on_gateway`].
    pub async fn start(config: Config, local_ports: (u16, u16)) -> Result<(Self, Events)> {
        // Subscribe before reading link states: a change in between waits
        // in the socket instead of being lost.
        let mut links = LinkWatch::subscribe().context("subscribing to link events")?;
        let nl = Netlink::connect()?;
        let (health_tx, health_rx) = mpsc::channel(64);
        let (gateway_tx, gateway_rx) = mpsc::channel(16);

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
            // Optimistic while the carrier is up: probes take it down
            // within `fall` rounds if the path behind it is broken.
            let health = if link.up { Health::Up } else { Health::Down };
            let (link_tx, link_rx) = mpsc::channel(8);
            links.watch(link.index, &link.name, link.up, link_tx);
            links.watch_gateway(link.index, cfg.gateway, index, gateway_tx.clone());
            let ident = probe::icmp_identifier(index, local_ports).with_context(|| {
                format!(
                    "uplink {}: no ICMP identifier left in the local port range",
                    cfg.name
                )
            })?;
            let binding = Binding {
                ifname: cfg.interface.clone(),
                source: addr,
            };
            let probes = UplinkProbe::for_uplink(binding, ident, &cfg.probes)
                .with_context(|| format!("uplink {}: setting up its probes", cfg.name))?;
            let (snap_tx, snap_rx) = watch::channel(Snapshot::new(health));
            let monitor = Monitor {
                uplink: index,
                name: cfg.name.clone(),
                config: cfg.health,
                probes,
                initial: health,
            };
            tokio::spawn(health::run(monitor, link_rx, health_tx.clone(), snap_tx));
            let mut uplink = Uplink {
                cfg: cfg.clone(),
                index: index as u32,
                ifindex: link.index,
                addr,
                admin: Admin::Enabled,
                health,
                weight: cfg.weight,
                reason: if link.up {
                    "started".into()
                } else {
                    "carrier down at start".into()
                },
                snapshot: snap_rx,
                transitions: 0,
                gateway_mac: gw_mac,
                written_state: uplink_state::UNUSED,
                last_change: None,
            };
            uplink.written_state = uplink.dataplane_state();
            infos.push(UplinkInfo {
                ifindex: link.index,
                state: uplink.written_state,
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
        let addrs = uplinks.iter().map(|u| u.addr).collect();
        let flow_tables = Arc::new(Mutex::new(dataplane.flow_tables(addrs, config.flows)?));
        let mut daemon = Self {
            config,
            uplinks,
            dataplane,
            table: table::empty(),
            flow_tables,
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
        tokio::spawn(async move {
            if let Err(e) = links.run().await {
                log::error!("link watch stopped: {e}; carrier changes are now seen by probes only");
            }
        });
        let events = Events {
            health: health_rx,
            gateways: gateway_rx,
        };
        Ok((daemon, events))
    }

    /// Apply a health transition: data plane first, then log and hooks.
    pub fn on_health(&mut self, event: HealthEvent) -> Result<()> {
        let taken = std::time::Instant::now();
        let Some(u) = self.uplinks.get_mut(event.uplink) else {
            return Ok(());
        };
        let previous = u.health;
        u.health = event.transition.to;
        u.reason = event.transition.reason.clone();
        u.transitions += 1;
        self.apply_timed(event.uplink, event.at.into_std(), taken)?;
        let u = &self.uplinks[event.uplink];
        let timing = u
            .last_change
            .map(|r| {
                format!(
                    "; in the data plane {} µs after the event ({} µs to the daemon, state written in {} µs, table in {} µs)",
                    r.queued_us + r.write_us,
                    r.queued_us,
                    r.write_us,
                    r.table_us
                )
            })
            .unwrap_or_default();
        log::info!(
            "uplink {}: {} -> {} ({}){timing}",
            u.cfg.name,
            previous,
            u.health,
            u.reason
        );
        let hook = hooks::Event {
            uplink: u.cfg.name.clone(),
            interface: u.cfg.interface.clone(),
            state: u.health.to_string(),
            previous: previous.to_string(),
            reason: u.reason.clone(),
            rtt_ms: event.stats.rtt.map(|d| d.as_secs_f64() * 1000.0),
            loss_percent: event.stats.loss_percent(),
        };
        hooks::run_all(
            &self.config.daemon.hooks,
            self.config.daemon.hook_timeout,
            &hook,
        );
        Ok(())
    }

    /// The kernel's neighbour entry for an uplink's gateway changed: if it
    /// now has another Ethernet address, send the uplink's traffic there.
    pub fn on_gateway(&mut self, event: GatewayEvent) -> Result<()> {
        let Some(u) = self.uplinks.get_mut(event.uplink) else {
            return Ok(());
        };
        if u.gateway_mac == event.mac {
            return Ok(());
        }
        self.dataplane
            .set_gateway_mac(u.index, event.mac)
            .with_context(|| format!("uplink {}: updating its gateway address", u.cfg.name))?;
        log::info!(
            "uplink {}: gateway {} is now at {} (was {})",
            u.cfg.name,
            event.gateway,
            mac_text(&event.mac),
            mac_text(&u.gateway_mac)
        );
        u.gateway_mac = event.mac;
        Ok(())
    }

    /// An operator's change to uplink `name`. Refused, with nothing changed,
    /// for an unknown uplink or a bad value.
    pub fn operate(&mut self, name: &str, action: UplinkAction) -> Result<String> {
        let taken = std::time::Instant::now();
        let Some(index) = self.uplinks.iter().position(|u| u.cfg.name == name) else {
            let known: Vec<&str> = self.uplinks.iter().map(|u| u.cfg.name.as_str()).collect();
            bail!("no uplink named {name:?} (uplinks: {})", known.join(", "));
        };
        let u = &mut self.uplinks[index];
        let done = match action {
            UplinkAction::Enable => {
                u.admin = Admin::Enabled;
                format!("uplink {name} enabled")
            }
            UplinkAction::Disable => {
                u.admin = Admin::Disabled;
                format!("uplink {name} disabled: its flows move to other uplinks")
            }
            UplinkAction::Drain => {
                u.admin = Admin::Drain;
                format!("uplink {name} draining: no new flows, existing ones finish")
            }
            UplinkAction::Weight { weight } => {
                if weight == 0 || weight > MAX_WEIGHT {
                    bail!("weight must be between 1 and {MAX_WEIGHT}, got {weight} (use drain to stop new flows)");
                }
                u.weight = weight;
                format!("uplink {name} weight {weight}")
            }
        };
        u.reason = format!("operator: {done}");
        self.apply_timed(index, taken, taken)?;
        log::info!("{done} (operator)");
        Ok(done)
    }

    /// Push every uplink's state to the data plane, then the bucket table
    /// that follows from it. The state write alone already moves traffic
    /// (the data plane steers new and orphaned flows past buckets whose
    /// uplink cannot take them, `lb_common::table::steer`); the table then
    /// spreads the moved buckets by weight.
    pub fn apply(&mut self) -> Result<()> {
        self.apply_states()?;
        self.apply_table()
    }

    /// [`apply`](Self::apply), recording in uplink `index`'s `last_change`
    /// how long it took from `seen` (the cause) through `taken` (the daemon
    /// took it up) to the data plane.
    fn apply_timed(
        &mut self,
        index: usize,
        seen: std::time::Instant,
        taken: std::time::Instant,
    ) -> Result<()> {
        self.apply_states()?;
        let states = std::time::Instant::now();
        let applied_monotonic_ns = monotonic_ns();
        self.apply_table()?;
        let table = std::time::Instant::now();
        let micros = |d: Duration| d.as_micros() as u64;
        if let Some(u) = self.uplinks.get_mut(index) {
            u.last_change = Some(Reaction {
                queued_us: micros(taken.saturating_duration_since(seen)),
                write_us: micros(states - taken),
                table_us: micros(table - states),
                applied_monotonic_ns,
            });
        }
        Ok(())
    }

    /// Write the state of every uplink whose state changed, one map write
    /// each.
    fn apply_states(&mut self) -> Result<()> {
        for u in &mut self.uplinks {
            let state = u.dataplane_state();
            if state != u.written_state {
                self.dataplane
                    .set_uplink_state(u.index, state)
                    .with_context(|| format!("uplink {}: writing its state", u.cfg.name))?;
                u.written_state = state;
            }
        }
        Ok(())
    }

    /// Rebalance the bucket table for the current states and weights, and
    /// make it live if it changed (two map writes).
    fn apply_table(&mut self) -> Result<()> {
        let candidates: Vec<Candidate> = self
            .uplinks
            .iter()
            .map(|u| Candidate {
                weight: u.weight,
                tier: u.cfg.tier,
                takes_new_flows: u.dataplane_state() == uplink_state::ACTIVE,
                degraded: u.health == Health::Degraded,
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

    /// The flow tables, for the flow collector: it walks them without
    /// holding the daemon.
    pub fn flow_tables(&self) -> Arc<Mutex<FlowTables>> {
        self.flow_tables.clone()
    }

    /// Everything `lbctl status` shows but the flow counts, which need a
    /// walk of the flow table: [`StatusDraft::finish`] does that walk, so
    /// that the caller can do it after letting go of the daemon.
    pub fn status(&self) -> Result<StatusDraft> {
        let counts = table::counts(&self.table);
        let mut uplinks = Vec::new();
        for u in &self.uplinks {
            let s = self.dataplane.uplink_stats(u.index)?;
            let snap = *u.snapshot.borrow();
            uplinks.push(UplinkStatus {
                name: u.cfg.name.clone(),
                interface: u.cfg.interface.clone(),
                address: u.addr.to_string(),
                gateway: u.cfg.gateway.to_string(),
                gateway_mac: mac_text(&u.gateway_mac),
                weight: u.weight,
                tier: u.cfg.tier,
                admin: format!("{:?}", u.admin).to_lowercase(),
                health: u.health.to_string(),
                reason: u.reason.clone(),
                transitions: u.transitions,
                rtt_ms: snap.stats.rtt.map(|d| d.as_secs_f64() * 1000.0),
                jitter_ms: snap.stats.jitter.map(|d| d.as_secs_f64() * 1000.0),
                loss_percent: snap.stats.loss_percent(),
                state: state_name(u.dataplane_state()).to_string(),
                buckets: counts[u.index as usize],
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                new_flows: s.new_flows,
                flows: 0,
                replies: s.replies,
                nat_failures: s.nat_failures,
                last_change: u.last_change,
            });
        }
        let reasons = self.dataplane.reasons()?;
        let status = Status {
            // Filled in by `finish`.
            flows_expired: 0,
            flows_evicted: 0,
            mode: self.config.balance.mode.to_string(),
            uplinks,
            reasons: reason::NAMES
                .iter()
                .zip(reasons)
                .map(|(n, c)| (n.to_string(), c))
                .collect(),
        };
        Ok(StatusDraft {
            status,
            pinned: self.dataplane.pinned_flows(self.uplinks.len() as u32)?,
            tables: self.flow_tables.clone(),
        })
    }
}

/// A status waiting for its flow counts.
pub struct StatusDraft {
    status: Status,
    /// Flows pinned to an uplink since start.
    pinned: u64,
    tables: Arc<Mutex<FlowTables>>,
}

impl StatusDraft {
    /// Walk the flow table (tenths of a second when it is full) and fill in
    /// the flows per uplink, and the evictions, which are the flows pinned
    /// that are neither collected nor still in the table.
    /// Waits for a collection that is under way, so that a flow is counted
    /// once: in the table, expired, or evicted.
    pub fn finish(mut self) -> Result<Status> {
        let tables = self
            .tables
            .lock()
            .map_err(|_| anyhow::anyhow!("the flow collector panicked; restart lbd"))?;
        let counts = tables.count_by_uplink()?;
        for (uplink, n) in self.status.uplinks.iter_mut().zip(&counts) {
            uplink.flows = *n;
        }
        let expired = tables.expired();
        self.status.flows_expired = expired;
        self.status.flows_evicted = self
            .pinned
            .saturating_sub(expired)
            .saturating_sub(counts.iter().sum());
        Ok(self.status)
    }
}

/// The machine's monotonic clock (`CLOCK_MONOTONIC`, what Rust's `Instant`
/// reads on Linux), in ns: comparable across processes.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn log_attach(prog: &str, ifname: &str, mode: AttachMode) {
    match mode {
        AttachMode::Native => log::info!("attached {prog} to {ifname} (native XDP)"),
        AttachMode::Generic => {
            log::warn!("attached {prog} to {ifname} in generic (skb) mode: the driver has no native XDP, expect lower throughput")
        }
    }
}
