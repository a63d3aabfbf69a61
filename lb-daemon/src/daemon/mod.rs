//! The daemon's state, and its one write path to the kernel: a reconciler.
//!
//! Owns the runtime view of every uplink (operator state, what the kernel
//! says about it, health, weight) and converges what lbd owns in the kernel
//! towards what that view calls for: the data plane's per-uplink entries,
//! states and bucket table; the XDP attachments; the health monitors; the
//! destinations left to the kernel; and lbd's routing tables and rules
//! (`kernel`). It converges on every kernel event, every health transition,
//! every operator command and once a second, and every step is idempotent:
//! nothing is read once at start, and nothing is assumed to stay as it was
//! left.
//!
//! The order of the writes is what keeps packets safe: an uplink's entry
//! and state first (an uplink that lost its address is down before anything
//! else changes), then the bucket table in one step, then the routing.

mod actions;
mod checks;
mod explain;
pub mod kept;
pub mod quota;
pub mod reload;
mod rings;
mod round;
pub mod run;
mod status;
pub mod uplink;

pub use actions::Reconfigured;
pub use checks::check_machine;
use checks::refuse;
pub use explain::On;
use quota::quota_admin;
pub use round::{round, Converged};
pub use status::{FlowQuery, StatusDraft};

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::{
    maps::{uplink_state, UplinkInfo},
    table::Table,
};
use rtnetlink::Handle;
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

use crate::{
    config::{Config, UplinkConfig},
    control::api::Reaction,
    control::hooks,
    daemon::uplink::{Admin, Lifecycle},
    dataplane::carry::{Carry, Copied},
    dataplane::flows::FlowTables,
    dataplane::pins::{Found, Pins},
    dataplane::{Dataplane, Family},
    health::passive,
    health::probe::{self, Binding, UplinkProbe},
    health::{self, HealthEvent, Monitor, Snapshot, State as Health},
    observe::facts::Facts,
    observe::kernel::Observed,
    observe::linkwatch::{Bridges, LinkEvent, LinkWatch, Watchers},
    observe::wireguard,
    reconcile::attachments,
    reconcile::buckets::{self},
    reconcile::bypass,
    reconcile::egress,
    reconcile::ipv6::{self, Facts6},
    reconcile::nftables,
    reconcile::policies,
    reconcile::roaming,
    reconcile::router_macs,
    reconcile::routing,
};

/// How often an unresolved gateway is asked for again (ARP).
const POKE_EVERY: Duration = Duration::from_secs(1);
/// Uplinks that become ready this soon after lbd starts (a gateway
/// resolved by the first ARP) begin in service, as those ready at once do;
/// later ones are late (a modem that booted, a lease that came) and first
/// pass `rise` good rounds.
const START_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Uplink {
    pub cfg: UplinkConfig,
    pub index: u32,
    pub admin: Admin,
    /// What the kernel says about it, as last observed.
    pub facts: Facts,
    /// What the kernel says about its IPv6.
    pub facts6: Facts6,
    last_poke6: Option<Instant>,
    /// Since when the kernel no longer shows its delegation (`ipv6::held`).
    delegation_lost: Option<Instant>,
    /// What its probes and link say; `None` while no monitor runs (its
    /// facts are incomplete).
    pub health: Option<Health>,
    /// Whether its health has been up since its monitor started: tells
    /// probing from down.
    proven: bool,
    pub weight: u32,
    /// Why the uplink is in its state: the last transition's reason.
    pub reason: String,
    /// The health monitor's latest view (RTT, loss, jitter).
    pub snapshot: Option<watch::Receiver<Snapshot>>,
    /// Health transitions so far.
    pub transitions: u64,
    /// How the last change of its state reached the data plane.
    pub last_change: Option<Reaction>,
    /// Bumped when its address changes (see `UplinkInfo::epoch`).
    epoch: u32,
    /// What the data plane has for it, if anything.
    written: Option<UplinkInfo>,
    /// The interface and address an adopted data plane had for it, until
    /// the first convergence has compared them with the kernel's.
    adopted: Option<(u32, [u8; 4])>,
    /// The adopted data plane had it down, on this interface (by index):
    /// its first monitor starts from down too, and it must pass `rise`
    /// good rounds before new flows go there (it may still be dead; the
    /// start's optimism is for uplinks nobody knows anything of). Another
    /// interface now (uplinks reordered in the file) knows nothing of it.
    adopted_down: Option<u32>,
    /// The interface `wan_ingress` is attached to.
    attached: Option<u32>,
    monitor: Option<Running>,
    last_poke: Option<Instant>,
    lifecycle: Lifecycle,
    /// What the traffic says (see `passive`), and the verdict of the burst
    /// it asked for, while one is out.
    watch: passive::Watch,
    verdict: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// SYNs sent again on it without an answer, as the data plane counts.
    syn_retries: u64,
    /// Its IPv6 health, when it has IPv6 probes.
    pub six: Health6,
    /// What lbd failed to set up for it in the last round, which keeps it
    /// out of service (see [`Lifecycle::Faulty`]).
    pub fault: Option<String>,
}

/// An uplink's IPv6 health, kept apart from its IPv4's when the operator
/// gave it IPv6 probes: an ISP's IPv6 often fails while its IPv4 works.
/// Without IPv6 probes nothing here runs, and its IPv6 follows its IPv4's
/// health.
#[derive(Debug)]
pub struct Health6 {
    /// What its IPv6 probes and its link say; `None` while no monitor
    /// runs (no IPv6 probes, or its IPv6 facts are incomplete).
    pub health: Option<Health>,
    /// The last IPv6 transition's reason.
    pub reason: String,
    pub snapshot: Option<watch::Receiver<Snapshot>>,
    pub transitions: u64,
    monitor: Option<Running>,
    /// What its IPv6 traffic says, and the verdict of its burst.
    watch: passive::Watch,
    verdict: Option<tokio::sync::oneshot::Receiver<bool>>,
}

impl Health6 {
    fn new(passive: crate::config::PassiveConfig) -> Self {
        Self {
            health: None,
            reason: "no IPv6 probes: follows IPv4".into(),
            snapshot: None,
            transitions: 0,
            monitor: None,
            watch: passive::Watch::new(passive),
            verdict: None,
        }
    }
}

/// A health monitor that runs.
#[derive(Debug)]
struct Running {
    binding: Binding,
    generation: u64,
    task: JoinHandle<()>,
    /// Where suspicions go, for a burst of probes.
    bursts: mpsc::Sender<health::Burst>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Uplink {
    fn new(cfg: &UplinkConfig, index: usize, passive: crate::config::PassiveConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            index: index as u32,
            admin: Admin::Enabled,
            facts: Facts::default(),
            facts6: Facts6::default(),
            last_poke6: None,
            delegation_lost: None,
            health: None,
            proven: false,
            weight: cfg.weight,
            reason: "starting".into(),
            snapshot: None,
            transitions: 0,
            last_change: None,
            epoch: 0,
            written: None,
            adopted: None,
            adopted_down: None,
            attached: None,
            monitor: None,
            last_poke: None,
            lifecycle: Lifecycle::WaitingInterface,
            watch: passive::Watch::new(passive),
            verdict: None,
            syn_retries: 0,
            six: Health6::new(passive),
            fault: None,
        }
    }

    /// Where it stands; what the operator said first, then what lbd could
    /// not set up, then what the kernel and its probes say.
    pub fn lifecycle(&self) -> Lifecycle {
        match uplink::lifecycle(self.admin, &self.facts, self.health, self.proven) {
            Lifecycle::Disabled => Lifecycle::Disabled,
            _ if self.fault.is_some() => Lifecycle::Faulty,
            lifecycle => lifecycle,
        }
    }

    /// The state the data plane should have for this uplink.
    pub fn dataplane_state(&self) -> u32 {
        self.lifecycle().dataplane_state()
    }

    /// The flags of its data-plane entry, from its configuration.
    pub fn entry_flags(&self) -> u16 {
        if self.cfg.clamp_mss {
            lb_common::maps::uplink_flags::CLAMP_MSS
        } else {
            0
        }
    }

    /// Whether its IPv6 has health of its own (IPv6 probes).
    pub fn probes_ipv6(&self) -> bool {
        self.cfg.probes.iter().any(|p| p.kind.is_ipv6())
    }

    /// The state its IPv6 gets before its IPv6 facts are looked at: its
    /// own IPv4's without IPv6 probes; otherwise from the operator, the
    /// link and its IPv6 health.
    pub fn dataplane_state6(&self) -> u32 {
        if self.probes_ipv6() {
            uplink::state6(self.admin, self.facts.carrier, self.six.health)
        } else {
            self.dataplane_state()
        }
    }

    /// Its IPv6 health as balancing sees it (for `degraded`).
    pub fn health6(&self) -> Option<Health> {
        if self.probes_ipv6() {
            self.six.health
        } else {
            self.health
        }
    }
}

/// What the daemon reacts to besides the operator and the kernel's state.
pub struct Events {
    pub health: mpsc::Receiver<HealthEvent>,
}

/// The reconciler's line to the kernel: a netlink handle, the wake-up
/// the kernel's events ring, what `wg` said of the WireGuard uplinks, and
/// what it is told when their own packets move.
#[derive(Clone)]
pub struct KernelLink {
    pub handle: Handle,
    pub changed: Arc<Notify>,
    pub wireguard: Arc<wireguard::Ports>,
    pub sources: Arc<wireguard::Sources>,
}

pub struct Daemon {
    pub config: Config,
    pub uplinks: Vec<Uplink>,
    dataplane: Dataplane,
    /// Each policy's bucket table, as written to the data plane.
    buckets: buckets::Buckets,
    /// The same for new IPv6 flows.
    buckets6: buckets::Buckets,
    /// The operator's rules and prefix sets, as written to the data plane.
    policies: policies::Policies,
    /// The flow tables as the collector and `status` walk them, on handles
    /// of their own (see `flows`); the lock keeps the two walks apart (a
    /// walk beside deletions may see an entry twice).
    flow_tables: Arc<Mutex<FlowTables>>,
    /// Destinations the data plane leaves to the kernel now.
    bypass: bypass::Bypass,
    /// Prefixes added to it whose pinned flows are not let go yet.
    bypass_added: Vec<(Ipv4Addr, u8)>,
    /// IPv6 as written to the data plane, and what the kernel's IPv6 view
    /// last asked for (the LAN's prefix, the destinations it keeps).
    ipv6: ipv6::Ipv6,
    lan6: Option<ipv6::Prefix6>,
    bypass6: std::collections::BTreeSet<ipv6::Prefix6>,
    /// The uplinks' addresses as the flow collector has them.
    flow_addrs: Vec<Ipv4Addr>,
    /// Where lb's programs are attached. `lan_ingress` only once the
    /// slow path's guard is in place (`lans_open`).
    attachments: attachments::Attachments,
    /// The router's own MACs on each LAN port, as written.
    router_macs: router_macs::RouterMacs,
    /// An earlier data plane's flow tables, carried into this one at
    /// start and once more when lan_ingress has taken over its links (the
    /// flows its programs made in between), then let go.
    carry: Option<Carry>,
    /// Where each LAN bridge's clients were last round.
    roaming: roaming::Roaming,
    /// The LAN bridges whose forwarding entries wake a round (linkwatch's).
    lan_bridges: Bridges,
    /// Roaming clients' moves waiting for the walk that follows them.
    roamers: Arc<Mutex<roaming::Waiting>>,
    lans_open: bool,
    /// Each device's way out (XDP or its qdisc) and lb's shapers.
    egress: egress::Owned,
    /// lb's nftables table as last put in place.
    slowpath: Option<nftables::Wanted>,
    /// What lb's nftables tables since replaced counted.
    counted_before: nftables::Counted,
    /// The slow path's uplink as the kernel's rules have it.
    slow_path_applied: routing::SlowPath,
    /// The same for the kernel's IPv6.
    slow_path6_applied: Option<usize>,
    /// Rounds so far, and the routes and rules they changed (`Status`).
    rounds: u64,
    routing_changes: u64,
    watchers: Watchers,
    health_tx: mpsc::Sender<HealthEvent>,
    local_ports: (u16, u16),
    /// Monitors started so far (tells a late event of an old one apart).
    generations: u64,
    /// Monitors started since the last round made its routes: let go
    /// (`health::Monitor::start`) once it has.
    held_monitors: Vec<tokio::sync::oneshot::Sender<()>>,
    /// When lbd started: uplinks ready within [`START_GRACE`] of it start
    /// optimistic (in service, taken down by `fall` bad rounds); uplinks
    /// that become ready later must first pass `rise` good rounds.
    started: Instant,
    /// Flows an adopted data plane held at start; `None`: a new one.
    adopted_flows: Option<u64>,
    /// What happened, for `lbctl events`.
    history: crate::control::events::History,
    /// The quotas' usage by uplink name, and whether it changed since it
    /// was last written to the usage file, and when that was.
    quota: quota::Book,
    quota_unsaved: bool,
    quota_saved: Instant,
    /// What the operator said of the uplinks (`lbctl uplink`), as kept in
    /// the state directory.
    said: kept::Said,
}

impl Daemon {
    /// Load the data plane, attach it to the LANs, converge once with what
    /// the kernel holds now, and start watching the kernel. Any subset of
    /// the uplinks may be usable, none included: what is missing is waited
    /// for. Refused: a LAN interface that does not exist, routing tables or
    /// rule priorities that someone else uses, and what the kernel cannot
    /// do (load or attach XDP).
    /// `local_ports` is the kernel's `ip_local_port_range`, which NAT keeps
    /// clear of.
    pub async fn start(
        config: Config,
        local_ports: (u16, u16),
    ) -> Result<(Self, Events, KernelLink)> {
        // Subscribe before reading anything: a change in between waits in
        // the socket instead of being lost.
        let links = LinkWatch::subscribe().context("subscribing to kernel events")?;
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        let observed = Observed::take(&handle).await?;
        refuse(&config, &observed)?;

        let pins = Pins::new(&config.daemon.bpffs);
        let (found, carry) = pins.prepare(config.flows.max)?;
        // An earlier lbd's lan_ingress still attached: its guard is in
        // place too.
        let lan_links_pinned = pins
            .links()
            .iter()
            .any(|(prog, _)| prog == lb_common::maps::program::LAN_INGRESS);
        if let Found::Replaced(old) = &found {
            for (dir, flows) in old {
                let flows =
                    flows.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
                log::warn!(
                    "the data plane pinned at {dir} has another layout than this lbd's (v{}): removed, with {flows} flows; a new one takes its place",
                    lb_common::maps::LAYOUT
                );
            }
        }
        let mut dataplane = Dataplane::load_pinned(config.flows.max, Some(&pins))?;
        if let Some(carry) = &carry {
            say_carried(carry, &carry.copy_into(&dataplane), "carried", true);
        }
        match dataplane.attach_ring_watch() {
            Ok(()) => log::info!(
                "ring watch on tracepoint {}: a device whose ring XDP_REDIRECT overflows takes its queue for a while",
                lb_common::egress::RING_TRACEPOINT
            ),
            Err(why) => log::warn!(
                "no ring watch ({why}): each device keeps the path its qdiscs decide, and a full ring drops what XDP_REDIRECT sends it"
            ),
        }
        let adopted = if found == Found::Adoptable {
            Some(dataplane.adopt()?)
        } else {
            None
        };
        if adopted.is_some() {
            // What the earlier lbd attached to interfaces that are no
            // LAN port or uplink now goes, with the LAN port's entry:
            // nobody else would ever detach it.
            // By program and interface: a port that left the bridge for
            // an uplink keeps no `lan_ingress`, which would hold its
            // `wan_ingress` off.
            use lb_common::maps::program::{HANDOFF, LAN_INGRESS, WAN_INGRESS, WAN_INGRESS_L3};
            let lan_ports = attachments::wanted_lan_ports(&config.lans, &observed);
            let keep: std::collections::BTreeSet<(String, String)> = lan_ports
                .values()
                .flat_map(|port| [LAN_INGRESS, HANDOFF].map(|p| (p.to_owned(), port.clone())))
                .chain(config.uplinks.iter().flat_map(|u| {
                    // An Ethernet uplink's XDP program, or an L3 one's tc
                    // program (an interface not there now keeps either).
                    let l3 = observed.link(&u.interface).map(|l| l.l3);
                    let ingress = [
                        (l3 != Some(true), WAN_INGRESS),
                        (l3 != Some(false), WAN_INGRESS_L3),
                    ];
                    ingress
                        .into_iter()
                        .filter_map(|(keep, p)| keep.then_some(p))
                        .chain([HANDOFF])
                        .map(|p| (p.to_owned(), u.interface.clone()))
                        .collect::<Vec<_>>()
                }))
                .collect();
            let (released, failed) = dataplane.release_links_except(&keep);
            for (prog, ifname) in released {
                log::info!(
                    "{ifname}: {prog} detached, as it is no LAN port or uplink of that kind now"
                );
                if prog != LAN_INGRESS {
                    continue;
                }
                if let Some(link) = observed.link(&ifname) {
                    if let Err(e) = dataplane.remove_lan(link.index) {
                        log::warn!("{ifname}: {e:#}");
                    }
                }
            }
            for why in failed {
                log::warn!("a link of the earlier lbd stays: {why}");
            }
        }
        // A seed of 0 is no earlier lbd's choice: a start that failed
        // after the maps were made left them zeroed.
        let seed = match dataplane.seed() {
            seed if adopted.is_some() && seed != 0 => seed,
            _ => rand::random(),
        };
        dataplane.set_classifier(seed, config.balance.mode.number())?;
        dataplane.set_nat_ports((config.nat.port_min, config.nat.port_max), local_ports)?;
        dataplane.set_resteer_syn(config.passive.enabled && config.passive.resteer_syn)?;
        let addrs = vec![Ipv4Addr::UNSPECIFIED; config.uplinks.len()];
        let flow_tables = Arc::new(Mutex::new(dataplane.flow_tables(addrs, config.flows)?));
        // An adopted data plane's egress entries, to converge from.
        let mut egress_owned = egress::Owned::default();
        egress_owned.seed(dataplane.egress_entries()?);
        // An adopted data plane's destinations left to the kernel, to
        // converge from: one the earlier lbd wrote and this one does not
        // want (an old lease's address) goes.
        let (bypass, ipv6) = if adopted.is_some() {
            (
                bypass::Bypass::adopted(dataplane.bypass_prefixes()?),
                ipv6::Ipv6::adopted(dataplane.bypass6_prefixes()?),
            )
        } else {
            Default::default()
        };
        let (health_tx, health_rx) = mpsc::channel(64);
        let mut daemon = Self {
            uplinks: config
                .uplinks
                .iter()
                .enumerate()
                .map(|(i, u)| Uplink::new(u, i, config.passive))
                .collect(),
            config,
            dataplane,
            buckets: buckets::Buckets::new(Family::V4),
            buckets6: buckets::Buckets::new(Family::V6),
            policies: policies::Policies::default(),
            flow_tables,
            bypass,
            bypass_added: Vec::new(),
            ipv6,
            lan6: None,
            bypass6: Default::default(),
            flow_addrs: Vec::new(),
            attachments: attachments::Attachments::default(),
            router_macs: router_macs::RouterMacs::default(),
            // Carried flow tables, with the earlier lbd's lan_ingress
            // attached (and so its guard in place): lan_ingress takes over
            // its links in the first round, with wan_ingress, so that no
            // reply meets a table its flow is not in for longer than that.
            lans_open: carry.is_some() && lan_links_pinned,
            carry,
            roaming: roaming::Roaming::default(),
            lan_bridges: links.bridges(),
            roamers: Arc::default(),
            egress: egress_owned,
            slowpath: None,
            counted_before: nftables::Counted::default(),
            slow_path_applied: routing::SlowPath::default(),
            slow_path6_applied: None,
            rounds: 0,
            routing_changes: 0,
            watchers: links.watchers(),
            health_tx,
            local_ports,
            generations: 0,
            held_monitors: Vec::new(),
            started: Instant::now(),
            adopted_flows: None,
            history: crate::control::events::History::default(),
            quota: quota::Book::new(),
            quota_unsaved: false,
            quota_saved: Instant::now(),
            said: kept::Said::default(),
        };
        daemon.load_quota();
        daemon.load_said();
        daemon.history.say(
            "daemon",
            None,
            format!("lbd {} started", env!("CARGO_PKG_VERSION")),
        );
        if let Some(table) = adopted {
            daemon.adopt(table)?;
        }
        // Start is the view, then rounds: the first puts lb's nftables table
        // (the guard) in place before any LAN port gets `lan_ingress`
        // (`lans_open`), so nothing leaks from the first packet on.
        let changed = links.changed();
        let kernel = KernelLink {
            handle,
            wireguard: Arc::new(wireguard::Ports::new(Arc::clone(&changed))),
            sources: Arc::default(),
            changed,
        };
        let daemon = Mutex::new(daemon);
        let say = |errors: Vec<String>| {
            for error in errors {
                log::warn!("{error}; retrying on the next change");
            }
        };
        say(round(&daemon, &kernel).await?);
        // Gateways are asked for (ARP) by the first round; give their
        // answers a moment, so that lbd is ready with the uplinks that can
        // be. Modems that stay mute are waited for after start.
        let asked = Instant::now();
        while asked.elapsed() < START_GRACE / 2
            && lock(&daemon, "the daemon's state")?
                .uplinks
                .iter()
                .any(|u| u.lifecycle() == Lifecycle::GatewayUnresolved)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            say(round(&daemon, &kernel).await?);
        }
        lock(&daemon, "the daemon's state")?.lans_open = true;
        say(round(&daemon, &kernel).await?);
        let daemon = daemon
            .into_inner()
            .map_err(|_| anyhow::anyhow!("the daemon's state is unusable after its start"))?;
        tokio::spawn(async move {
            if let Err(e) = links.run().await {
                log::error!(
                    "kernel event watch stopped: {e}; lbd now follows the kernel once a second"
                );
            }
        });
        let events = Events { health: health_rx };
        Ok((daemon, events, kernel))
    }

    /// Take over the state of an adopted data plane: its live bucket
    /// `tables` (so that rebalancing moves nothing that need not move) and
    /// each uplink's entry (so that its flows keep their mappings).
    fn adopt(&mut self, tables: [Vec<Table>; 2]) -> Result<()> {
        let [four, six] = tables;
        self.buckets = buckets::Buckets::adopted(Family::V4, four);
        self.buckets6 = buckets::Buckets::adopted(Family::V6, six);
        for u in &mut self.uplinks {
            if let Some(info) = self.dataplane.pinned_uplink(u.index)? {
                u.written = Some(info);
                u.epoch = info.epoch;
                u.adopted = Some((info.ifindex, info.addr));
                u.adopted_down = (info.state == uplink_state::DOWN).then_some(info.ifindex);
            }
        }
        // Uplinks the configuration no longer has: down, so that their
        // flows move on their next packet (the rebalance takes their
        // buckets).
        for index in self.uplinks.len() as u32..lb_common::MAX_UPLINKS {
            if self.dataplane.pinned_uplink(index)?.is_some() {
                self.dataplane.set_uplink_state(index, uplink_state::DOWN)?;
                log::info!("uplink #{index} of the adopted data plane is no longer configured: its flows move");
            }
        }
        let flows = lock(&self.flow_tables, FLOW_TABLES)?
            .flows()
            .map(|f| f.len())
            .unwrap_or(0);
        self.adopted_flows = Some(flows as u64);
        self.history.say(
            "daemon",
            None,
            format!("adopted the pinned data plane with {flows} flows; health checks were paused while no lbd ran"),
        );
        log::info!(
            "adopted the data plane pinned at {}: {flows} flows kept, with their mappings; health checks were paused while no lbd ran",
            self.config.daemon.bpffs.display()
        );
        Ok(())
    }

    /// Remove everything lbd owns in the kernel (`lbd --teardown`): the
    /// pinned data plane (its programs detach), lb's shapers and queues,
    /// the routing tables and rules, and the nftables table.
    ///
    /// Refused while an lbd answers on the control socket (it would build
    /// it all again); otherwise it goes on past what it cannot remove and
    /// names all of that at the end.
    pub async fn teardown(config: &Config) -> Result<()> {
        let socket = &config.daemon.socket;
        if crate::control::socket::answers(socket) {
            bail!(
                "lbd is running (its control socket {} answers) and would set everything up \
                 again: stop it first (`systemctl stop lbd`), then tear down",
                socket.display()
            );
        }
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        let mut left = Vec::new();
        if let Err(e) = Pins::new(&config.daemon.bpffs).remove() {
            left.push(format!("{e:#}"));
        }
        let observed = Observed::take(&handle).await?;
        let devices = config
            .uplinks
            .iter()
            .map(|u| u.interface.as_str())
            .chain(config.lans.iter().map(|l| l.interface.as_str()));
        for device in devices {
            if let Some(link) = observed.link(device) {
                let shaper = egress::remove(device, &observed.qdiscs, link.index);
                let queue = egress::remove_queue(device, &observed.qdiscs, link.index);
                left.extend(
                    [shaper, queue]
                        .into_iter()
                        .filter_map(|r| r.err())
                        .map(|e| format!("{e:#}")),
                );
            }
            // A bridge's ports (a LAN without one is its own port).
            for (ifindex, port) in observed.lan_ports(device) {
                if port != device {
                    if let Err(e) = egress::remove_queue(&port, &observed.qdiscs, ifindex) {
                        left.push(format!("{e:#}"));
                    }
                }
            }
        }
        let changed = Arc::new(Notify::new());
        let link = KernelLink {
            handle,
            wireguard: Arc::new(wireguard::Ports::new(Arc::clone(&changed))),
            sources: Arc::default(),
            changed,
        };
        if let Err(e) = Self::remove_routing(&link).await {
            left.push(format!("{e:#}"));
        }
        if !left.is_empty() {
            bail!(
                "the teardown removed what it could, but not: {}; run it again once that is \
                 fixed",
                left.join("; ")
            );
        }
        Ok(())
    }

    /// Remove lbd's routing tables and rules, and its nftables table (on
    /// the way out).
    pub async fn remove_routing(link: &KernelLink) -> Result<()> {
        let observed = Observed::take(&link.handle).await?;
        let mut errors = routing::converge(
            &link.handle,
            routing::changes(&observed, &routing::Wanted::default()),
        )
        .await;
        if let Err(e) = tokio::task::block_in_place(nftables::remove) {
            errors.push(format!("{e:#}"));
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(())
    }

    /// Start, restart or stop uplink `i`'s health monitor as its facts
    /// call for: one runs while the facts are complete, bound to the
    /// uplink's interface and address, with its IPv4 probes.
    fn converge_monitor(&mut self, i: usize) -> Result<()> {
        let late = self.started.elapsed() >= START_GRACE;
        let u = &mut self.uplinks[i];
        let wanted = match (u.facts.complete(), u.facts.addr) {
            (true, Some(source)) => Some(Binding {
                ifname: u.cfg.interface.clone(),
                source: source.into(),
            }),
            _ => None,
        };
        if u.monitor.as_ref().map(|m| &m.binding) == wanted.as_ref() {
            return Ok(());
        }
        let Some(binding) = wanted else {
            // Nothing to probe through any more.
            u.monitor = None;
            u.health = None;
            u.snapshot = None;
            u.proven = false;
            self.watchers.unwatch(&u.cfg.interface);
            return Ok(());
        };
        let probes = u.cfg.probes_of(false);
        // Uplinks ready at start, and uplinks without probes (they follow
        // their carrier), are in service at once; any other has to pass
        // `rise` good rounds. An address change keeps the health it had.
        let was_down = u
            .adopted_down
            .take()
            .is_some_and(|i| u.facts.ifindex == Some(i));
        let doubtful = (late || was_down) && !probes.is_empty();
        let initial = match (u.health, doubtful) {
            (Some(health), _) => health,
            (None, false) => Health::Up,
            (None, true) => Health::Down,
        };
        if u.health.is_none() {
            u.proven = initial == Health::Up;
            u.reason = if initial == Health::Up {
                "ready".into()
            } else {
                format!("probing: {} good rounds needed", u.cfg.health.rise)
            };
        }
        let subscriber = u.cfg.interface.clone();
        let (running, snapshot) = self.spawn_monitor(i, binding, &probes, initial, &subscriber)?;
        let u = &mut self.uplinks[i];
        u.monitor = Some(running);
        u.verdict = None;
        u.health = Some(initial);
        u.snapshot = Some(snapshot);
        Ok(())
    }

    /// Start, restart or stop uplink `i`'s IPv6 health monitor: one runs
    /// while it has IPv6 probes and IPv6 facts to probe from (an address,
    /// and a next hop that answers), bound to its interface and IPv6
    /// address.
    fn converge_monitor6(&mut self, i: usize) -> Result<()> {
        let late = self.started.elapsed() >= START_GRACE;
        let u = &mut self.uplinks[i];
        let probes = u.cfg.probes_of(true);
        let f = &u.facts6;
        let wanted = match (probes.is_empty(), u.facts.ifindex, f.addr, f.gateway_mac) {
            (false, Some(_), Some(source), Some(_)) => Some(Binding {
                ifname: u.cfg.interface.clone(),
                source: source.into(),
            }),
            _ => None,
        };
        let subscriber = format!("{} (IPv6)", u.cfg.interface);
        let Some(binding) = wanted else {
            u.six.monitor = None;
            u.six.health = None;
            u.six.snapshot = None;
            u.six.reason = if probes.is_empty() {
                "no IPv6 probes: follows IPv4".into()
            } else {
                "waiting for its IPv6 address and next hop".into()
            };
            self.watchers.unwatch(&subscriber);
            return Ok(());
        };
        if u.six.monitor.as_ref().map(|m| &m.binding) == Some(&binding) {
            return Ok(());
        }
        // As for IPv4: ready at start, in service at once; later, it
        // proves itself first; a new address keeps the health it had.
        let initial = match u.six.health {
            Some(health) => health,
            None if late => Health::Down,
            None => Health::Up,
        };
        if u.six.health.is_none() {
            u.six.reason = if initial == Health::Up {
                "ready".into()
            } else {
                format!("probing: {} good rounds needed", u.cfg.health.rise)
            };
        }
        let (running, snapshot) = self.spawn_monitor(i, binding, &probes, initial, &subscriber)?;
        let u = &mut self.uplinks[i];
        u.six.monitor = Some(running);
        u.six.verdict = None;
        u.six.health = Some(initial);
        u.six.snapshot = Some(snapshot);
        Ok(())
    }

    /// A health monitor for uplink `i` running `probes` through `binding`
    /// from `initial`, told of its interface's carrier as `subscriber`.
    fn spawn_monitor(
        &mut self,
        i: usize,
        binding: Binding,
        probes: &[crate::config::ProbeConfig],
        initial: Health,
        subscriber: &str,
    ) -> Result<(Running, watch::Receiver<Snapshot>)> {
        let (lo, hi) = self.local_ports;
        let ident = probe::icmp_identifier(i, self.local_ports).with_context(|| {
            format!(
                "no ICMP identifier for its probes in the router's local port range {lo}-{hi} \
                 (one per uplink, from its top): widen net.ipv4.ip_local_port_range"
            )
        })?;
        let u = &self.uplinks[i];
        let probes = UplinkProbe::for_uplink(binding.clone(), ident, probes)
            .context("setting up its probes")?;
        self.generations += 1;
        let generation = self.generations;
        let (link_tx, link_rx) = mpsc::channel(8);
        self.watchers.watch(
            subscriber,
            &u.cfg.interface,
            u.facts.carrier,
            link_tx.clone(),
        );
        let (snap_tx, snap_rx) = watch::channel(Snapshot::new(initial));
        let (bursts_tx, bursts_rx) = mpsc::channel(1);
        // Held until the round's routes are made: an Ethernet uplink's
        // probe finds no way out before them. (An L3 uplink's leaves by its
        // device without them, the kernel taking a bound socket's
        // destination as on link; a tunnel's first packet then starts its
        // handshake, which leaves by an uplink that is no tunnel, or by
        // the main table: `slow_path`.)
        let (go, start) = tokio::sync::oneshot::channel();
        self.held_monitors.push(go);
        let monitor = Monitor {
            uplink: i,
            generation,
            name: u.cfg.name.clone(),
            config: u.cfg.health,
            probes,
            initial,
            bursts: Some(bursts_rx),
            passive: self.config.passive,
            start: Some(start),
        };
        if !u.facts.carrier {
            let _ = link_tx.try_send(LinkEvent {
                ifindex: u.facts.ifindex.unwrap_or(0),
                ifname: u.cfg.interface.clone(),
                up: false,
                at: tokio::time::Instant::now(),
            });
        }
        log::info!(
            "uplink {}: probing through {} from {} ({initial} to begin with)",
            u.cfg.name,
            binding.ifname,
            binding.source
        );
        let task = tokio::spawn(health::run(
            monitor,
            link_rx,
            self.health_tx.clone(),
            snap_tx,
        ));
        let running = Running {
            binding,
            generation,
            task,
            bursts: bursts_tx,
        };
        Ok((running, snap_rx))
    }

    /// Let the monitors started since the last round probe: its routes
    /// are made (or failed, which their probes will show).
    pub fn release_monitors(&mut self) {
        for go in self.held_monitors.drain(..) {
            // A monitor already gone needs no word.
            let _ = go.send(());
        }
    }

    /// The recent events, and a line to the new ones.
    pub fn events(
        &self,
    ) -> (
        Vec<crate::control::events::Event>,
        tokio::sync::broadcast::Receiver<crate::control::events::Event>,
    ) {
        (self.history.recent(), self.history.follow())
    }

    /// The flow tables, for the flow collector: it walks them without
    /// holding the daemon.
    pub fn flow_tables(&self) -> Arc<Mutex<FlowTables>> {
        self.flow_tables.clone()
    }
}

impl Daemon {}

/// What [`lock`] calls the flow tables' lock.
const FLOW_TABLES: &str = "the flow tables (as the collector walks them)";

/// Lock `mutex`, which holds `what`. A lock is poisoned when a thread
/// panicked while holding it (a bug): every later use fails, saying so and
/// what to do, rather than acting on a state left half changed.
pub fn lock<'a, T>(mutex: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| {
        anyhow::anyhow!(
            "{what} is unusable: a thread panicked while holding it; restart lbd (the data \
             plane and its flows stay)"
        )
    })
}

/// The machine's monotonic clock (`CLOCK_MONOTONIC`, what Rust's `Instant`
/// reads on Linux), in ns: comparable across processes.
fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Clock `clock` in ns (`CLOCK_MONOTONIC_COARSE` is the data plane's
/// `bpf_ktime_get_coarse_ns`).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec for the kernel to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// An address, or `-`.
fn text_or_none(addr: Option<impl std::fmt::Display>) -> String {
    addr.map_or_else(|| "-".into(), |a| a.to_string())
}

/// `2001:db8::/56`, or `-`.
fn prefix6_text(prefix: Option<ipv6::Prefix6>) -> String {
    prefix.map_or_else(|| "-".into(), |(p, len)| format!("{p}/{len}"))
}

/// Say what a copy of the earlier data plane's flow tables did.
/// (The first copy is always said; a later one when it added any.)
fn say_carried(carry: &Carry, copied: &Copied, how: &str, first: bool) {
    let text = |pick: fn(&(&str, u64, u64)) -> u64| {
        copied
            .iter()
            .map(|c| format!("{} {}", c.0, pick(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if first || copied.iter().any(|c| c.1 > 0) {
        log::info!("flow tables {how} ({}): {}", carry.why, text(|c| c.1));
    }
    if copied.iter().any(|c| c.2 > 0) {
        log::warn!(
            "flow tables ({}): no room for {} (a smaller [flows] max): those connections start anew",
            carry.why,
            text(|c| c.2)
        );
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
