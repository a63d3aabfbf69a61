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

pub mod quota;
pub mod uplink;

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::{
    hash,
    maps::{uplink_state, UplinkInfo},
    reason,
    table::{self, Table},
};
use rtnetlink::Handle;
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

use crate::{
    config::{ClassifierMode, Config, UplinkConfig, MAX_WEIGHT},
    control::api::{EgressStatus, QuotaStatus, Reaction, Status, UplinkAction, UplinkStatus},
    control::hooks,
    daemon::quota::{Outcome, QuotaConfig},
    daemon::uplink::{Admin, Facts, Lifecycle},
    dataplane::flows::FlowTables,
    dataplane::pins::{Found, Pins},
    dataplane::Dataplane,
    health::passive,
    health::probe::{self, Binding, UplinkProbe},
    health::{self, HealthEvent, Monitor, Snapshot, State as Health},
    observe::kernel::Observed,
    observe::linkwatch::{LinkEvent, LinkWatch, Watchers},
    observe::netlink,
    reconcile::attachments,
    reconcile::buckets::{self, Candidate},
    reconcile::bypass,
    reconcile::egress,
    reconcile::nftables,
    reconcile::routing,
    reconcile::uplinks,
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
    fn new(cfg: &UplinkConfig, index: usize, passive: passive::PassiveConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            index: index as u32,
            admin: Admin::Enabled,
            facts: Facts::default(),
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
            attached: None,
            monitor: None,
            last_poke: None,
            lifecycle: Lifecycle::WaitingInterface,
            watch: passive::Watch::new(passive),
            verdict: None,
            syn_retries: 0,
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        uplink::lifecycle(self.admin, &self.facts, self.health, self.proven)
    }

    /// The state the data plane should have for this uplink.
    pub fn dataplane_state(&self) -> u32 {
        self.lifecycle().dataplane_state()
    }
}

/// What the daemon reacts to besides the operator and the kernel's state.
pub struct Events {
    pub health: mpsc::Receiver<HealthEvent>,
}

/// The reconciler's line to the kernel: a netlink handle, and the wake-up
/// the kernel's events ring.
#[derive(Clone)]
pub struct KernelLink {
    pub handle: Handle,
    pub changed: Arc<Notify>,
}

pub struct Daemon {
    pub config: Config,
    pub uplinks: Vec<Uplink>,
    dataplane: Dataplane,
    /// The bucket table, as written to the data plane.
    buckets: buckets::Buckets,
    /// The flow tables as the collector and `status` walk them, on handles
    /// of their own (see `flows`); the lock keeps the two walks apart (a
    /// walk beside deletions may see an entry twice).
    flow_tables: Arc<Mutex<FlowTables>>,
    /// Destinations the data plane leaves to the kernel now.
    bypass: bypass::Bypass,
    /// The uplinks' addresses as the flow collector has them.
    flow_addrs: Vec<Ipv4Addr>,
    /// Where lb's programs are attached. `lan_ingress` only once the
    /// slow path's guard is in place (`lans_open`).
    attachments: attachments::Attachments,
    lans_open: bool,
    /// Each device's way out (XDP or its qdisc) and lb's shapers.
    egress: egress::Owned,
    /// lb's nftables table as last put in place.
    slowpath: Option<nftables::Wanted>,
    /// What lb's nftables tables since replaced counted.
    counted_before: nftables::Counted,
    /// The slow path's uplink as the kernel's rules have it.
    slow_path_applied: Option<usize>,
    watchers: Watchers,
    health_tx: mpsc::Sender<HealthEvent>,
    local_ports: (u16, u16),
    /// Monitors started so far (tells a late event of an old one apart).
    generations: u64,
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
}

/// How often the quotas' usage is written while it changes. What a crash
/// loses of it is not lost: the next lbd reads the rest from the pinned
/// data plane's counters.
const QUOTA_SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// The usage file in the state directory.
const QUOTA_FILE: &str = "quota.json";

/// What reaching quota `q` makes of the uplink.
fn quota_admin(q: &QuotaConfig) -> Admin {
    match q.action {
        quota::Action::Drain => Admin::Drain,
        quota::Action::Disable => Admin::Disabled,
    }
}

fn admin_name(admin: Admin) -> &'static str {
    match admin {
        Admin::Enabled => "enabled",
        Admin::Disabled => "disabled",
        Admin::Drain => "drain",
    }
}

/// Now, in Unix seconds (0 on a clock before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        let clashes = routing::clashes(&observed, &config.routing, config.uplinks.len());
        if !clashes.is_empty() {
            bail!("{}", clashes.join("; "));
        }
        for lan in &config.lans {
            observed.link(&lan.interface).with_context(|| {
                format!(
                    "LAN interface {} not found (see `ip link`; is lbd running in the right network namespace?)",
                    lan.interface
                )
            })?;
        }
        check_lans(&config, &observed)?;
        check_xdp_targets(&config, &observed)?;
        check_ingress_shapers(&config, &observed)?;
        for u in &config.uplinks {
            if observed.link(&u.interface).and_then(|l| l.kind.as_deref()) == Some("bridge") {
                bail!(
                    "uplink {}: {} is a bridge, and XDP cannot send into a bridge; give lbd the \
                     bridge's port towards the ISP instead",
                    u.name,
                    u.interface
                );
            }
        }

        let pins = Pins::new(&config.daemon.bpffs);
        let found = pins.prepare()?;
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
        let adopted = if found == Found::Adoptable {
            Some(dataplane.adopt()?)
        } else {
            None
        };
        let seed = if adopted.is_some() {
            dataplane.seed()
        } else {
            rand::random()
        };
        dataplane.set_classifier(seed, mode_number(config.balance.mode))?;
        dataplane.set_nat_ports((config.nat.port_min, config.nat.port_max), local_ports)?;
        dataplane.set_resteer_syn(config.passive.enabled && config.passive.resteer_syn)?;
        let addrs = vec![Ipv4Addr::UNSPECIFIED; config.uplinks.len()];
        let flow_tables = Arc::new(Mutex::new(dataplane.flow_tables(addrs, config.flows)?));
        // An adopted data plane's egress entries, to converge from.
        let mut egress_owned = egress::Owned::default();
        egress_owned.seed(dataplane.egress_entries()?);
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
            buckets: buckets::Buckets::default(),
            flow_tables,
            bypass: bypass::Bypass::default(),
            flow_addrs: Vec::new(),
            attachments: attachments::Attachments::default(),
            lans_open: false,
            egress: egress_owned,
            slowpath: None,
            counted_before: nftables::Counted::default(),
            slow_path_applied: None,
            watchers: links.watchers(),
            health_tx,
            local_ports,
            generations: 0,
            started: Instant::now(),
            adopted_flows: None,
            history: crate::control::events::History::default(),
            quota: quota::Book::new(),
            quota_unsaved: false,
            quota_saved: Instant::now(),
        };
        daemon.load_quota();
        daemon.history.say(
            "daemon",
            None,
            format!("lbd {} started", env!("CARGO_PKG_VERSION")),
        );
        if let Some(table) = adopted {
            daemon.adopt(table)?;
        }
        // Off the async workers: a convergence may run `tc` (lb's shapers).
        let mut changes = tokio::task::block_in_place(|| daemon.converge(&observed))?;
        // Gateways are asked for (ARP) by the first convergence; give their
        // answers a moment, so that lbd is ready with the uplinks that can
        // be. Modems that stay mute are waited for after start.
        let asked = Instant::now();
        while asked.elapsed() < START_GRACE / 2
            && daemon
                .uplinks
                .iter()
                .any(|u| u.lifecycle() == Lifecycle::GatewayUnresolved)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let observed = Observed::take(&handle).await?;
            changes = tokio::task::block_in_place(|| daemon.converge(&observed))?;
        }
        let errors = routing::converge(&handle, changes.routing).await;
        for error in &errors {
            log::warn!("routing: {error}; retrying on the next change");
        }
        if errors.is_empty() {
            daemon.slow_path_applied = changes.slow_path_uplink;
        }
        if let Some(wanted) = changes.slowpath {
            // Before any program is attached: nothing may leak from the
            // first packet on.
            nftables::apply(&wanted)?;
            daemon.slowpath = Some(wanted);
        }
        daemon.lans_open = true;
        daemon.follow_lans(&Observed::take(&handle).await?)?;
        let changed = links.changed();
        tokio::spawn(async move {
            if let Err(e) = links.run().await {
                log::error!(
                    "kernel event watch stopped: {e}; lbd now follows the kernel once a second"
                );
            }
        });
        let events = Events { health: health_rx };
        Ok((daemon, events, KernelLink { handle, changed }))
    }

    /// Take over the state of an adopted data plane: its live bucket
    /// `table` (so that rebalancing moves nothing that need not move) and
    /// each uplink's entry (so that its flows keep their mappings).
    fn adopt(&mut self, table: Table) -> Result<()> {
        self.buckets = buckets::Buckets::adopted(table);
        for u in &mut self.uplinks {
            if let Some(info) = self.dataplane.pinned_uplink(u.index)? {
                u.written = Some(info);
                u.epoch = info.epoch;
                u.adopted = Some((info.ifindex, info.addr));
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
        let flows = self
            .flow_tables
            .lock()
            .map_err(|_| anyhow::anyhow!("flow tables poisoned"))?
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

    /// Converge everything lbd owns towards what `observed` and the
    /// daemon's view call for. Returns the routing changes and the
    /// nftables table, if it must change, for the caller to make without
    /// holding the daemon.
    pub fn converge(&mut self, observed: &Observed) -> Result<Converged> {
        for i in 0..self.uplinks.len() {
            let u = &self.uplinks[i];
            let facts = Facts::observe(observed, &u.cfg.interface, u.cfg.gateway, &u.facts);
            self.follow(i, facts)
                .with_context(|| format!("uplink {}", self.uplinks[i].cfg.name))?;
        }
        self.apply()?;

        self.follow_lans(observed)?;
        self.follow_egress(observed)?;

        let uplink_ifindexes: Vec<u32> = self
            .uplinks
            .iter()
            .filter_map(|u| u.facts.ifindex)
            .collect();
        let bypass = bypass::wanted(
            observed,
            &uplink_ifindexes,
            &self.config.routing.lookup_tables,
        );
        self.bypass.converge(bypass, &mut self.dataplane)?;

        let addrs: Vec<Ipv4Addr> = self
            .uplinks
            .iter()
            .map(|u| u.facts.addr.unwrap_or(Ipv4Addr::UNSPECIFIED))
            .collect();
        if addrs != self.flow_addrs {
            // Rare (an address changed): worth waiting for a collection
            // under way.
            if let Ok(mut tables) = self.flow_tables.lock() {
                tables.set_uplink_addrs(addrs.clone());
            }
            self.flow_addrs = addrs;
        }
        let slowpath = nftables::wanted(
            self.uplinks.iter().map(|u| (&u.cfg, u.facts.ifindex)),
            observed,
            self.local_ports,
        );
        Ok(Converged {
            routing: routing::changes(observed, &self.wanted_routing()),
            slow_path_uplink: self.slow_path_uplink(),
            slowpath: (self.slowpath.as_ref() != Some(&slowpath)).then_some(slowpath),
        })
    }

    /// lb's nftables table was replaced by `wanted`; the one before had
    /// counted `counted`.
    fn slowpath_applied(&mut self, wanted: nftables::Wanted, counted: &nftables::Counted) {
        self.counted_before.add(counted);
        self.slowpath = Some(wanted);
    }

    /// Attach `lan_ingress` where the LANs' frames arrive (see
    /// `reconcile::attachments`), once the guard is in place.
    fn follow_lans(&mut self, observed: &Observed) -> Result<()> {
        if !self.lans_open {
            return Ok(());
        }
        let wanted = attachments::wanted_lan_ports(&self.config.lans, observed);
        self.attachments.converge_lans(wanted, &mut self.dataplane)
    }

    fn egress_status(&self, device: &str) -> Option<EgressStatus> {
        self.egress.choices.get(device).map(|c| EgressStatus {
            device: device.to_owned(),
            path: c.path().to_owned(),
            why: c.why.clone(),
        })
    }

    /// Converge lb's shapers, and tell the data plane which devices'
    /// qdiscs its packets must pass (see `egress`).
    fn follow_egress(&mut self, observed: &Observed) -> Result<()> {
        let uplinks: Vec<(u32, &str, egress::Shape)> = self
            .uplinks
            .iter()
            .map(|u| (u.index, u.cfg.interface.as_str(), u.cfg.shape))
            .collect();
        let lans: Vec<&str> = self
            .config
            .lans
            .iter()
            .map(|l| l.interface.as_str())
            .collect();
        let shapers = egress::wanted(&uplinks, &lans);
        // Refused at start; one that appears later can only be reported.
        for u in &self.uplinks {
            let key = format!("ingress {}", u.cfg.interface);
            let found = observed.link(&u.cfg.interface).and_then(|l| {
                egress::ingress_shaper(&observed.qdiscs, l.index, &u.cfg.name, &u.cfg.interface)
            });
            match found {
                Some(said) if self.egress.say_once(&key) => log::error!("{said}"),
                Some(_) => {}
                None => self.egress.unsay(&key),
            }
        }
        let mut devices: Vec<egress::Device> = self
            .uplinks
            .iter()
            .filter(|u| u.attached.is_some())
            .filter_map(|u| {
                Some(egress::Device {
                    ifindex: u.facts.ifindex?,
                    name: u.cfg.interface.clone(),
                    bridge: None,
                })
            })
            .collect();
        for lan in &self.config.lans {
            let bridge = observed
                .link(&lan.interface)
                .filter(|l| l.kind.as_deref() == Some("bridge"))
                .map(|l| l.index);
            for (ifindex, name) in observed.lan_ports(&lan.interface) {
                if self.attachments.has_lan_port(ifindex) {
                    devices.push(egress::Device {
                        ifindex,
                        name,
                        bridge,
                    });
                }
            }
        }
        let managed: Vec<&str> = uplinks
            .iter()
            .map(|u| u.1)
            .chain(lans.iter().copied())
            .collect();
        let writes = self.egress.converge(
            &observed.qdiscs,
            &devices,
            &shapers,
            &managed,
            self.attachments.handoff_failed(),
            |name| observed.link(name).map(|l| l.index),
        );
        for (ifindex, out) in writes {
            if let Err(e) = self.dataplane.set_egress(ifindex, out) {
                // Mend from what the map really holds, next time round.
                self.egress
                    .seed(self.dataplane.egress_entries().unwrap_or_default());
                return Err(e);
            }
        }
        Ok(())
    }

    /// lbd's routing tables and rules as the view calls for (see
    /// `reconcile::routing::wanted`).
    fn wanted_routing(&self) -> routing::Wanted {
        let ready: Vec<Option<routing::Ready>> = self
            .uplinks
            .iter()
            .map(|u| {
                let f = &u.facts;
                match (f.ifindex, f.addr, f.gateway, f.carrier) {
                    (Some(ifindex), Some(addr), Some(gateway), true) => Some(routing::Ready {
                        ifindex,
                        addr,
                        gateway,
                    }),
                    _ => None,
                }
            })
            .collect();
        let lans: Vec<&str> = self
            .config
            .lans
            .iter()
            .map(|l| l.interface.as_str())
            .collect();
        routing::wanted(&self.config.routing, &ready, self.slow_path_uplink(), &lans)
    }

    /// The uplink that carries the slow path: in service with its table in
    /// place, the lowest tier, then the heaviest weight, then the first.
    /// `None` when none is: the main table decides then.
    pub fn slow_path_uplink(&self) -> Option<usize> {
        self.uplinks
            .iter()
            .enumerate()
            .filter(|(_, u)| {
                let f = &u.facts;
                u.dataplane_state() == uplink_state::ACTIVE
                    && f.carrier
                    && f.addr.is_some()
                    && f.gateway.is_some()
            })
            .min_by_key(|(i, u)| (u.cfg.tier, std::cmp::Reverse(u.weight), *i))
            .map(|(i, _)| i)
    }

    /// Remove everything lbd owns in the kernel (`lbd --teardown`): the
    /// pinned data plane (its programs detach), the routing tables and
    /// rules, and the nftables table.
    pub async fn teardown(config: &Config) -> Result<()> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket failed")?;
        tokio::spawn(conn);
        Pins::new(&config.daemon.bpffs).remove()?;
        let observed = Observed::take(&handle).await?;
        let devices = config
            .uplinks
            .iter()
            .map(|u| u.interface.as_str())
            .chain(config.lans.iter().map(|l| l.interface.as_str()));
        for device in devices {
            if let Some(link) = observed.link(device) {
                egress::remove(device, &observed.qdiscs, link.index)?;
            }
        }
        Self::remove_routing(&KernelLink {
            handle,
            changed: Arc::new(Notify::new()),
        })
        .await
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

    /// Take in uplink `i`'s new facts: its data-plane entry, its XDP
    /// attachment, its health monitor, and asking for its gateway.
    fn follow(&mut self, i: usize, facts: Facts) -> Result<()> {
        let old = self.uplinks[i].facts;
        if old.ifindex.is_some() && old.ifindex != facts.ifindex {
            if let Some(gone) = old.ifindex {
                self.dataplane.forget_uplink_ifindex(gone)?;
            }
        }
        {
            let u = &mut self.uplinks[i];
            if let Some((ifindex, addr)) = u.adopted.take() {
                if facts.ifindex != Some(ifindex) || facts.addr.map(|a| a.octets()) != Some(addr) {
                    // The pinned flows of this uplink were made for another
                    // interface or address: they move.
                    u.epoch = u.epoch.wrapping_add(1);
                }
            }
            if old.addr.is_some() && old.addr != facts.addr {
                u.epoch = u.epoch.wrapping_add(1);
                let said = format!(
                    "address {} -> {}; its flows move on their next packet",
                    text_or_none(old.addr),
                    text_or_none(facts.addr)
                );
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("address", Some(&u.cfg.name), said);
            }
            if facts.gateway != old.gateway {
                let said = format!(
                    "gateway {} -> {}",
                    text_or_none(old.gateway),
                    text_or_none(facts.gateway)
                );
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("gateway", Some(&u.cfg.name), said);
            }
            if let (Some(before), Some(now)) = (old.gateway_mac, facts.gateway_mac) {
                if before != now {
                    let said = format!(
                        "gateway {} is now at {} (was {})",
                        text_or_none(facts.gateway),
                        mac_text(&now),
                        mac_text(&before)
                    );
                    log::info!("uplink {}: {said}", u.cfg.name);
                    self.history.say("gateway", Some(&u.cfg.name), said);
                }
            }
            if !facts.carrier {
                // Back from a carrier loss, it has to prove itself again.
                u.proven = false;
            }
            u.facts = facts;
        }
        self.monitor(i)?;
        let u = &mut self.uplinks[i];

        // The entry, with the state these facts call for, in one write.
        let entry = uplinks::wanted(&facts, u.dataplane_state(), u.epoch, u.written);
        uplinks::converge(u.index, &mut u.written, entry, &mut self.dataplane)?;
        self.attachments.converge_uplink(
            &u.cfg.interface,
            facts.ifindex.filter(|_| facts.mac.is_some()),
            &mut u.attached,
            &mut self.dataplane,
        )?;

        // A gateway the kernel holds no address for: make it ask (ARP),
        // as a first packet to it would.
        let u = &mut self.uplinks[i];
        if let (Some(gateway), None, true) = (facts.gateway, facts.gateway_mac, facts.carrier) {
            if u.last_poke.is_none_or(|t| t.elapsed() >= POKE_EVERY) {
                u.last_poke = Some(Instant::now());
                if let Err(e) = netlink::poke(&u.cfg.interface, gateway) {
                    log::debug!("uplink {}: asking for gateway {gateway}: {e:#}", u.cfg.name);
                }
            }
        }
        Ok(())
    }

    /// Start, restart or stop uplink `i`'s health monitor as its facts
    /// call for: one runs while the facts are complete, bound to the
    /// uplink's interface and address.
    fn monitor(&mut self, i: usize) -> Result<()> {
        let late = self.started.elapsed() >= START_GRACE;
        let u = &mut self.uplinks[i];
        let wanted = match (u.facts.complete(), u.facts.addr) {
            (true, Some(source)) => Some(Binding {
                ifname: u.cfg.interface.clone(),
                source,
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
        // Uplinks ready at start, and uplinks without probes (they follow
        // their carrier), are in service at once; any other has to pass
        // `rise` good rounds. An address change keeps the health it had.
        let initial = match (u.health, late && !u.cfg.probes.is_empty()) {
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
        let ident = probe::icmp_identifier(i, self.local_ports).with_context(|| {
            "no ICMP identifier left in the local port range for its probes".to_string()
        })?;
        let probes = UplinkProbe::for_uplink(binding.clone(), ident, &u.cfg.probes)
            .context("setting up its probes")?;
        self.generations += 1;
        let generation = self.generations;
        let (link_tx, link_rx) = mpsc::channel(8);
        self.watchers
            .watch(&u.cfg.interface, u.facts.carrier, link_tx.clone());
        let (snap_tx, snap_rx) = watch::channel(Snapshot::new(initial));
        let (bursts_tx, bursts_rx) = mpsc::channel(1);
        let monitor = Monitor {
            uplink: i,
            generation,
            name: u.cfg.name.clone(),
            config: u.cfg.health,
            probes,
            initial,
            bursts: Some(bursts_rx),
            passive: self.config.passive,
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
        u.monitor = Some(Running {
            binding,
            generation,
            task,
            bursts: bursts_tx,
        });
        u.verdict = None;
        u.health = Some(initial);
        u.snapshot = Some(snap_rx);
        Ok(())
    }

    /// Apply a health transition: data plane first, then log and hooks.
    pub fn on_health(&mut self, event: HealthEvent) -> Result<()> {
        let taken = Instant::now();
        let Some(u) = self.uplinks.get_mut(event.uplink) else {
            return Ok(());
        };
        if u.monitor.as_ref().map(|m| m.generation) != Some(event.generation) {
            // From a monitor that has since been replaced or stopped.
            return Ok(());
        }
        let previous = u.health;
        u.health = Some(event.transition.to);
        if event.transition.to == Health::Up {
            u.proven = true;
        }
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
        let previous = previous.map_or("-", Health::as_str);
        let now = u.health.map_or("-", Health::as_str);
        // The transition's own reason: applying it may have put a waiting
        // state's in `u.reason` meanwhile.
        let reason = &event.transition.reason;
        log::info!(
            "uplink {}: {previous} -> {now} ({reason}){timing}",
            u.cfg.name,
        );
        let (name, said) = (u.cfg.name.clone(), format!("{previous} -> {now}: {reason}"));
        self.history.say("health", Some(&name), said);
        let u = &self.uplinks[event.uplink];
        let hook = hooks::Event {
            kind: "health",
            uplink: u.cfg.name.clone(),
            interface: u.cfg.interface.clone(),
            state: now.to_string(),
            previous: previous.to_string(),
            reason: reason.clone(),
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

    /// An operator's change to uplink `name`. Refused, with nothing changed,
    /// for an unknown uplink or a bad value.
    pub fn operate(&mut self, name: &str, action: UplinkAction) -> Result<String> {
        let taken = Instant::now();
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
        self.history.say("operator", Some(name), done.clone());
        Ok(done)
    }

    /// Listen to the traffic (every [`PASSIVE_INTERVAL`]): an uplink in
    /// service that has sent for a suspicious while without a reply gets a
    /// burst of probes from its monitor, which takes it down if nobody
    /// answers. Never for the last uplink in service: passive evidence
    /// does not take the office offline.
    pub fn passive_tick(&mut self) -> Result<()> {
        if !self.config.passive.enabled {
            return Ok(());
        }
        let now_ns = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let in_service: Vec<bool> = self
            .uplinks
            .iter()
            .map(|u| u.dataplane_state() == uplink_state::ACTIVE && u.health == Some(Health::Up))
            .collect();
        // One burst at a time: two uplinks suspect at once (a probe target
        // gone) must not both be taken down on the same evidence.
        let mut busy = self.uplinks.iter().any(|u| u.verdict.is_some());
        for i in 0..self.uplinks.len() {
            let sample = self.dataplane.signals(self.uplinks[i].index, now_ns)?;
            let others = in_service.iter().enumerate().any(|(j, &up)| j != i && up);
            let u = &mut self.uplinks[i];
            u.syn_retries = sample.syn_retries;
            if let Some(rx) = &mut u.verdict {
                match rx.try_recv() {
                    Ok(answered) => {
                        u.watch.verdict(answered, now_ns);
                        u.verdict = None;
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => u.verdict = None,
                }
            }
            // Without probes nothing could confirm a suspicion: passive
            // evidence alone never takes an uplink down.
            let confirmable = !u.cfg.probes.is_empty();
            let (Some(monitor), true, true, false, true) =
                (&u.monitor, in_service[i], others, busy, confirmable)
            else {
                // Still watched, so that the silence is dated right.
                u.watch.observe(&sample);
                continue;
            };
            let rtt = u.snapshot.as_ref().and_then(|s| s.borrow().stats.rtt);
            let Some(suspicion) = u.watch.sample(&sample, rtt) else {
                continue;
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let burst = health::Burst {
                suspicion,
                verdict: tx,
            };
            if monitor.bursts.try_send(burst).is_ok() {
                log::info!(
                    "uplink {}: suspect ({}): probing it now",
                    u.cfg.name,
                    suspicion.describe()
                );
                u.verdict = Some(rx);
                busy = true;
            }
        }
        Ok(())
    }

    /// Read the usage file, and put back in force the quotas reached in
    /// the current period. A file lbd cannot read is moved aside (and
    /// said): counting starts afresh rather than lbd not starting.
    fn load_quota(&mut self) {
        if self.uplinks.iter().all(|u| u.cfg.quota.is_none()) {
            return;
        }
        let path = self.config.daemon.state_dir.join(QUOTA_FILE);
        self.quota = match quota::load(&path) {
            Ok(book) => book,
            Err(e) => {
                let aside = path.with_extension("bad");
                let _ = std::fs::rename(&path, &aside);
                log::error!(
                    "quota: {e:#}; moved to {}, counting afresh",
                    aside.display()
                );
                quota::Book::new()
            }
        };
        let now = unix_now();
        for u in &mut self.uplinks {
            let (Some(q), Some(usage)) = (u.cfg.quota, self.quota.get(&u.cfg.name)) else {
                continue;
            };
            if usage.reached && usage.period_start == quota::period_start(&q, now) {
                u.admin = quota_admin(&q);
                u.reason = format!(
                    "quota reached this {} (kept from before lbd started)",
                    q.period.as_str()
                );
            }
        }
    }

    /// Take up the data plane's byte counters into the quotas' usage: an
    /// uplink that reaches its quota is drained or disabled (with the
    /// hooks run), and put back in service when a new period begins or a
    /// reload raises the quota above what it used (unless the operator
    /// changed it meanwhile). Called every second.
    pub fn account_quota(&mut self) -> Result<()> {
        let now = unix_now();
        let mut acted = false;
        for i in 0..self.uplinks.len() {
            let Some(q) = self.uplinks[i].cfg.quota else {
                continue;
            };
            let s = self.dataplane.uplink_stats(self.uplinks[i].index)?;
            let counter = s.tx_bytes.saturating_add(s.rx_bytes);
            let slot = self.uplinks[i].index;
            let usage = self
                .quota
                .entry(self.uplinks[i].cfg.name.clone())
                .or_insert_with(|| quota::Usage::new(&q, slot, counter, now));
            let before = *usage;
            let outcome = usage.account(&q, slot, counter, now);
            self.quota_unsaved |= *usage != before;
            if outcome != Outcome::Nothing {
                self.quota_act(i, &q, outcome)?;
                acted = true;
            }
        }
        if self.quota_unsaved && (acted || self.quota_saved.elapsed() >= QUOTA_SAVE_INTERVAL) {
            self.save_quota();
        }
        Ok(())
    }

    fn quota_act(&mut self, i: usize, q: &QuotaConfig, outcome: Outcome) -> Result<()> {
        let taken = Instant::now();
        let u = &self.uplinks[i];
        let used = self.quota.get(&u.cfg.name).map_or(0, |usage| usage.used);
        let (admin, said) = match outcome {
            Outcome::Nothing => return Ok(()),
            Outcome::Reached => (
                Some(quota_admin(q)),
                format!(
                    "quota reached: {} of {} used this {}; uplink {}",
                    quota::human(used),
                    quota::human(q.bytes),
                    q.period.as_str(),
                    match q.action {
                        quota::Action::Drain => "draining (no new flows)",
                        quota::Action::Disable => "disabled (its flows move)",
                    }
                ),
            ),
            // Only what the quota did is undone.
            Outcome::Renewed => (
                (u.admin == quota_admin(q)).then_some(Admin::Enabled),
                format!(
                    "quota renewed ({} of {} used this {}); uplink back in service",
                    quota::human(used),
                    quota::human(q.bytes),
                    q.period.as_str()
                ),
            ),
        };
        let Some(admin) = admin else {
            self.history.say("quota", Some(&u.cfg.name), said);
            return Ok(());
        };
        let previous = admin_name(u.admin);
        let u = &mut self.uplinks[i];
        u.admin = admin;
        u.reason = said.clone();
        self.apply_timed(i, taken, taken)?;
        let u = &self.uplinks[i];
        match outcome {
            Outcome::Reached => log::warn!("uplink {}: {said}", u.cfg.name),
            _ => log::info!("uplink {}: {said}", u.cfg.name),
        }
        let name = u.cfg.name.clone();
        let hook = hooks::Event {
            kind: "quota",
            uplink: name.clone(),
            interface: u.cfg.interface.clone(),
            state: admin_name(admin).to_string(),
            previous: previous.to_string(),
            reason: said.clone(),
            rtt_ms: None,
            loss_percent: 0.0,
        };
        self.history.say("quota", Some(&name), said);
        hooks::run_all(
            &self.config.daemon.hooks,
            self.config.daemon.hook_timeout,
            &hook,
        );
        self.save_quota();
        Ok(())
    }

    /// Write the usage file now (also on the way out).
    pub fn save_quota(&mut self) {
        if self.quota.is_empty() {
            return;
        }
        let path = self.config.daemon.state_dir.join(QUOTA_FILE);
        match quota::save(&path, &self.quota) {
            Ok(()) => self.quota_unsaved = false,
            Err(e) => log::warn!("quota: {e:#} (usage kept in memory; trying again)"),
        }
        self.quota_saved = Instant::now();
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
    fn apply_timed(&mut self, index: usize, seen: Instant, taken: Instant) -> Result<()> {
        self.apply_states()?;
        let states = Instant::now();
        let applied_monotonic_ns = monotonic_ns();
        self.apply_table()?;
        let table = Instant::now();
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
    /// each, and log where each uplink now stands.
    fn apply_states(&mut self) -> Result<()> {
        for u in &mut self.uplinks {
            let lifecycle = u.lifecycle();
            if let Some(why) = waiting_reason(lifecycle, &u.cfg, &u.facts) {
                u.reason = why;
            }
            if lifecycle != u.lifecycle {
                let said = format!("{} -> {lifecycle} ({})", u.lifecycle, u.reason);
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("lifecycle", Some(&u.cfg.name), said);
                u.lifecycle = lifecycle;
            }
            let entry = uplinks::wanted(&u.facts, lifecycle.dataplane_state(), u.epoch, u.written);
            uplinks::converge(u.index, &mut u.written, entry, &mut self.dataplane)
                .with_context(|| format!("uplink {}", u.cfg.name))?;
        }
        Ok(())
    }

    /// Rebalance the bucket table for the current states and weights (see
    /// `reconcile::buckets`).
    fn apply_table(&mut self) -> Result<()> {
        let candidates: Vec<Candidate> = self
            .uplinks
            .iter()
            .map(|u| Candidate {
                weight: u.weight,
                tier: u.cfg.tier,
                takes_new_flows: u.dataplane_state() == uplink_state::ACTIVE,
                degraded: u.health == Some(Health::Degraded),
            })
            .collect();
        self.buckets.converge(&candidates, &mut self.dataplane)?;
        Ok(())
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

    /// Everything `lbctl status` shows but the flow counts, which need a
    /// walk of the flow table: [`StatusDraft::finish`] does that walk, so
    /// that the caller can do it after letting go of the daemon.
    pub fn status(&self) -> Result<StatusDraft> {
        let counts = table::counts(self.buckets.table());
        let mut uplinks = Vec::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            let s = self.dataplane.uplink_stats(u.index)?;
            let snap = u.snapshot.as_ref().map(|s| *s.borrow());
            let stats = snap.map(|s| s.stats).unwrap_or_default();
            uplinks.push(UplinkStatus {
                name: u.cfg.name.clone(),
                interface: u.cfg.interface.clone(),
                address: text_or_none(u.facts.addr),
                gateway: text_or_none(u.facts.gateway),
                gateway_config: u.cfg.gateway.to_string(),
                gateway_mac: u
                    .facts
                    .gateway_mac
                    .map_or_else(|| "-".into(), |m| mac_text(&m)),
                lifecycle: u.lifecycle().to_string(),
                table: self.config.routing.table(i),
                rule_priority: self.config.routing.priority(i),
                weight: u.weight,
                tier: u.cfg.tier,
                admin: format!("{:?}", u.admin).to_lowercase(),
                health: u.health.map_or("-", Health::as_str).to_string(),
                reason: u.reason.clone(),
                transitions: u.transitions,
                rtt_ms: stats.rtt.map(|d| d.as_secs_f64() * 1000.0),
                jitter_ms: stats.jitter.map(|d| d.as_secs_f64() * 1000.0),
                loss_percent: stats.loss_percent(),
                state: state_name(u.dataplane_state()).to_string(),
                buckets: counts[u.index as usize],
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                new_flows: s.new_flows,
                flows: 0,
                inbound: 0,
                replies: s.replies,
                nat_failures: s.nat_failures,
                last_change: u.last_change,
                quota: u.cfg.quota.map(|q| {
                    let usage = self.quota.get(&u.cfg.name).copied().unwrap_or_default();
                    QuotaStatus {
                        limit_bytes: q.bytes,
                        used_bytes: usage.used,
                        period: q.period.as_str().into(),
                        period_start: usage.period_start,
                        next_period: quota::next_start(&q, usage.period_start),
                        action: q.action.as_str().into(),
                        reached: usage.reached,
                    }
                }),
                egress: self.egress_status(&u.cfg.interface),
                suspicions: u.watch.bursts,
                false_alarms: u.watch.false_alarms,
                syn_retries: u.syn_retries,
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
            guard_dropped: 0,
            slow_path: self
                .slow_path_applied
                .map(|i| self.uplinks[i].cfg.name.clone()),
            lan_ports: self
                .attachments
                .lan_ports()
                .map(|(_, n)| n.to_owned())
                .collect(),
            pinned_at: self.config.daemon.bpffs.display().to_string(),
            adopted_flows: self.adopted_flows,
            kernel_destinations: self
                .bypass
                .prefixes()
                .iter()
                .map(|(a, l)| format!("{a}/{l}"))
                .collect(),
            lan_egress: self
                .attachments
                .lan_ports()
                .filter_map(|(_, name)| self.egress_status(name))
                .collect(),
        };
        Ok(StatusDraft {
            status,
            pinned: self.dataplane.pinned_flows(self.uplinks.len() as u32)?,
            tables: self.flow_tables.clone(),
            counted_before: self.counted_before.clone(),
        })
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconfigured {
    /// Applied in place: what changed.
    Applied(Vec<String>),
    /// Changes lbd takes up only by starting again (it then adopts its own
    /// data plane: no flow is dropped): what they are.
    NeedsRestart(Vec<String>),
}

impl Daemon {
    /// Take up configuration `new` (already validated whole). What can
    /// change in place does, with the data plane converged after it, and
    /// existing flows untouched: weights, tiers, health settings and
    /// probes, gateways, the classifier mode, NAT ports, flow timeouts,
    /// hooks. Anything else (uplinks added, removed or renamed, the LANs,
    /// routing, metrics, socket, pin directory, flow table size) is left
    /// for a restart, which is said.
    pub fn reconfigure(&mut self, new: Config) -> Result<Reconfigured> {
        let old = &self.config;
        let mut restart = Vec::new();
        let uplinks = |c: &Config| -> Vec<(String, String)> {
            c.uplinks
                .iter()
                .map(|u| (u.name.clone(), u.interface.clone()))
                .collect()
        };
        if uplinks(old) != uplinks(&new) {
            restart.push("the uplinks (added, removed, renamed or moved)".to_string());
        }
        if old.lans != new.lans {
            restart.push("the LANs".into());
        }
        if old.routing != new.routing {
            restart.push("[routing]".into());
        }
        if old.metrics != new.metrics {
            restart.push("[metrics]".into());
        }
        if old.daemon.socket != new.daemon.socket || old.daemon.bpffs != new.daemon.bpffs {
            restart.push("[daemon] socket or bpffs".into());
        }
        if old.flows.max != new.flows.max {
            restart.push("[flows] max (the size of the pinned flow table)".into());
        }
        if !restart.is_empty() {
            return Ok(Reconfigured::NeedsRestart(restart));
        }

        let mut done = Vec::new();
        let reached: Vec<String> = self
            .quota
            .iter()
            .filter(|(_, usage)| usage.reached)
            .map(|(name, _)| name.clone())
            .collect();
        // Quotas removed: not reached any more, should they come back in
        // this period.
        let mut unreached = Vec::new();
        for (u, cfg) in self.uplinks.iter_mut().zip(&new.uplinks) {
            if u.cfg.weight != cfg.weight {
                done.push(format!(
                    "{}: weight {} -> {}",
                    cfg.name, u.cfg.weight, cfg.weight
                ));
                u.weight = cfg.weight;
            }
            if u.cfg.tier != cfg.tier {
                done.push(format!("{}: tier {} -> {}", cfg.name, u.cfg.tier, cfg.tier));
            }
            if u.cfg.gateway != cfg.gateway {
                done.push(format!(
                    "{}: gateway {} -> {}",
                    cfg.name, u.cfg.gateway, cfg.gateway
                ));
            }
            if u.cfg.shape != cfg.shape {
                done.push(format!("{}: shape", cfg.name));
            }
            if u.cfg.quota != cfg.quota {
                done.push(format!("{}: quota", cfg.name));
                // A reached quota that is gone no longer holds the uplink
                // back (a raised one is taken up by the next accounting).
                if let (Some(old_q), None) = (u.cfg.quota, cfg.quota) {
                    unreached.push(cfg.name.clone());
                    if reached.contains(&cfg.name) && u.admin == quota_admin(&old_q) {
                        u.admin = Admin::Enabled;
                        u.reason = "quota removed by a reload: back in service".into();
                        done.push(format!("{}: back in service (its quota is gone)", cfg.name));
                    }
                }
            }
            let prefixes = |c: &UplinkConfig| -> Vec<(Ipv4Addr, u8)> {
                c.routed.iter().map(|r| (r.addr, r.len)).collect()
            };
            if prefixes(&u.cfg) != prefixes(cfg) {
                // The next convergence puts them in lb's nftables table.
                done.push(format!("{}: routed prefixes", cfg.name));
            }
            if u.cfg.health != cfg.health || u.cfg.probes != cfg.probes {
                done.push(format!("{}: health checks", cfg.name));
                // A new monitor, starting from the health it had.
                u.monitor = None;
            }
            u.cfg = cfg.clone();
        }
        for name in unreached {
            if let Some(usage) = self.quota.get_mut(&name) {
                usage.reached = false;
                self.quota_unsaved = true;
            }
        }
        if old.balance != new.balance {
            self.dataplane
                .set_classifier(self.dataplane.seed(), mode_number(new.balance.mode))?;
            done.push(format!(
                "classifier {} -> {} (new flows)",
                old.balance.mode, new.balance.mode
            ));
        }
        if old.passive != new.passive {
            self.dataplane
                .set_resteer_syn(new.passive.enabled && new.passive.resteer_syn)?;
            for u in &mut self.uplinks {
                u.watch = passive::Watch::new(new.passive);
                u.verdict = None;
                // New monitors, with the new bursts, from the health they had.
                u.monitor = None;
            }
            done.push("[passive]".into());
        }
        if old.nat != new.nat {
            self.dataplane
                .set_nat_ports((new.nat.port_min, new.nat.port_max), self.local_ports)?;
            done.push("NAT ports (new flows)".into());
        }
        if old.flows != new.flows {
            if let Ok(mut tables) = self.flow_tables.lock() {
                tables.set_timeouts(new.flows);
            }
            done.push("flow timeouts".into());
        }
        if old.daemon.hooks != new.daemon.hooks
            || old.daemon.hook_timeout != new.daemon.hook_timeout
        {
            done.push("hooks".into());
        }
        self.config = new;
        for i in 0..self.uplinks.len() {
            self.monitor(i)?;
        }
        self.apply()?;
        let said = if done.is_empty() {
            "reloaded: nothing changed".to_string()
        } else {
            format!("reloaded: {}", done.join("; "))
        };
        self.history.say("daemon", None, said);
        Ok(Reconfigured::Applied(done))
    }

    /// What conntrack says of `key`'s connection, as an explanation of a
    /// packet the data plane leaves to the kernel (`remembered`: its flow
    /// table says so already); verdict "new" when conntrack has none.
    fn kernel_connection(
        &self,
        key: &lb_common::maps::FlowKey,
        remembered: bool,
    ) -> crate::control::api::Explanation {
        use crate::observe::conntrack;
        let port = |p: [u8; 2]| u16::from_be_bytes(p);
        let tuple = conntrack::Tuple {
            src: key.src_addr.into(),
            dst: key.dst_addr.into(),
            src_port: port(key.src_port),
            dst_port: port(key.dst_port),
            proto: key.proto,
        };
        let found = conntrack::lookup(&tuple);
        let mut why = Vec::new();
        if remembered {
            why.push(
                "a connection of the kernel's: conntrack had it when the fast path first saw it, \
                 and the flow table remembers that"
                    .to_string(),
            );
        }
        match &found {
            Ok(Some(c)) => {
                let index = (c.mark & nftables::MARK_MASK) >> nftables::MARK_MASK.trailing_zeros();
                let uplink = index
                    .checked_sub(1)
                    .and_then(|i| self.uplinks.get(i as usize))
                    .map(|u| u.cfg.name.clone());
                let came = uplink
                    .as_ref()
                    .map_or_else(String::new, |u| format!(", arrived on {u}"));
                let o = &c.original;
                why.push(match c.forwarded_to() {
                    Some((addr, p)) => format!(
                        "port forward to {addr}:{p} of {}:{} from {}:{}{came}: the kernel \
                         translates it back and sends it out {}",
                        o.dst,
                        o.dst_port,
                        o.src,
                        o.src_port,
                        uplink.as_deref().unwrap_or("by its routes")
                    ),
                    None => format!(
                        "a connection the kernel tracks, from {}:{} to {}:{}{came}: the kernel \
                         routes it",
                        o.src, o.src_port, o.dst, o.dst_port
                    ),
                });
            }
            Ok(None) if remembered => why.push(
                "conntrack no longer has it: its next packets stay the kernel's until the flow \
                 idles out"
                    .into(),
            ),
            Ok(None) => {}
            Err(e) => why.push(format!("conntrack could not be asked: {e:#}")),
        }
        let kernel = remembered || matches!(found, Ok(Some(_)));
        crate::control::api::Explanation {
            verdict: if kernel { "kernel" } else { "new" }.into(),
            uplink: None,
            bucket: None,
            why,
        }
    }

    /// Where a connection goes and why, decided by the data plane's own
    /// code (`lb_common::hash` and `lb_common::table::steer`) on the data
    /// plane's own state: its flow table, the destinations it leaves to
    /// the kernel, its seed, bucket table and uplink states. The order is
    /// the data plane's: a pinned flow first, then the kernel's
    /// destinations, then the kernel's connections (conntrack, asked as
    /// the data plane asks it), then the bucket table.
    pub fn explain(
        &self,
        key: &lb_common::maps::FlowKey,
    ) -> Result<crate::control::api::Explanation> {
        use crate::control::api::Explanation;
        let name = |i: u32| {
            self.uplinks
                .get(i as usize)
                .map_or_else(|| format!("#{i}"), |u| u.cfg.name.clone())
        };
        let existing = self
            .flow_tables
            .lock()
            .map_err(|_| anyhow::anyhow!("the flow collector panicked; restart lbd"))?
            .get(key)?;
        if existing.is_some_and(|f| f.uplink == lb_common::KERNEL_OWNED) {
            return Ok(self.kernel_connection(key, true));
        }
        if let Some(flow) = existing {
            let uplink = self.uplinks.get(flow.uplink as usize);
            let keeps = uplink.is_some_and(|u| {
                uplink_state::keeps_flows(u.dataplane_state()) && flow.epoch == u.epoch as u8
            });
            if keeps {
                return Ok(Explanation {
                    verdict: "existing".into(),
                    uplink: Some(name(flow.uplink)),
                    bucket: None,
                    why: vec![format!(
                        "a flow pinned to {} with NAT port {} ({})",
                        name(flow.uplink),
                        u16::from_be_bytes(flow.nat_port),
                        if key.proto == 6 {
                            "TCP"
                        } else {
                            "kept for its whole life"
                        }
                    )],
                });
            }
        }
        let dst = Ipv4Addr::from(key.dst_addr);
        if let Some((prefix, len)) = self
            .bypass
            .prefixes()
            .iter()
            .filter(|(p, l)| contains(*p, *l, dst))
            .max_by_key(|(_, l)| *l)
        {
            return Ok(Explanation {
                verdict: "kernel".into(),
                uplink: None,
                bucket: None,
                why: vec![format!(
                    "{dst} is in {prefix}/{len}, which the kernel routes other than by a default route (or is the router's own): left to the kernel untouched"
                )],
            });
        }
        if existing.is_none() && matches!(key.proto, 6 | 17) {
            let explained = self.kernel_connection(key, false);
            if explained.verdict == "kernel" {
                return Ok(explained);
            }
        }
        let tuple = lb_common::hash::Tuple {
            src_addr: u32::from_be_bytes(key.src_addr),
            dst_addr: u32::from_be_bytes(key.dst_addr),
            src_port: u16::from_be_bytes(key.src_port),
            dst_port: u16::from_be_bytes(key.dst_port),
            proto: key.proto,
        };
        let hash = lb_common::hash::classify(
            self.dataplane.seed(),
            mode_number(self.config.balance.mode),
            &tuple,
        );
        let own = lb_common::hash::bucket(hash);
        let takes = |i: u32| {
            self.uplinks
                .get(i as usize)
                .is_some_and(|u| u.dataplane_state() == uplink_state::ACTIVE)
        };
        let owner = |b: u32| self.buckets.table().get(b as usize).copied();
        let mut why = Vec::new();
        if existing.is_some() {
            why.push("its flow's uplink is down or has another address now: it moves".into());
        }
        let owner_of_own = owner(own).unwrap_or(lb_common::NO_UPLINK);
        why.push(format!(
            "a new flow: its {} hash falls into bucket {own} of {}, which belongs to {}",
            self.config.balance.mode,
            lb_common::BUCKETS,
            if owner_of_own == lb_common::NO_UPLINK {
                "no uplink".to_string()
            } else {
                name(owner_of_own)
            }
        ));
        let chosen = table::steer(hash, owner, takes);
        let verdict = match chosen {
            Some(u) if u == owner_of_own => {
                why.push(format!(
                    "{} takes new flows (weight {}, tier {}): it goes there",
                    name(u),
                    self.uplinks[u as usize].weight,
                    self.uplinks[u as usize].cfg.tier
                ));
                "new"
            }
            Some(u) => {
                why.push(format!(
                    "that uplink takes no new flows now: the next of its buckets that does belongs to {}",
                    name(u)
                ));
                "new"
            }
            None => {
                why.push("no uplink takes new flows: it would be dropped and counted".into());
                "dropped"
            }
        };
        Ok(Explanation {
            verdict: verdict.into(),
            uplink: chosen.map(name),
            bucket: Some(own),
            why,
        })
    }

    /// What `lbctl flows` needs besides the walk: the tables, and each
    /// uplink's name and address by index. The walk itself
    /// ([`FlowQuery::run`]) happens without the daemon.
    pub fn flow_query(&self) -> FlowQuery {
        FlowQuery {
            tables: self.flow_tables.clone(),
            uplinks: self
                .uplinks
                .iter()
                .map(|u| (u.cfg.name.clone(), u.facts.addr))
                .collect(),
        }
    }
}

/// A walk of the flow table for `lbctl flows`.
pub struct FlowQuery {
    tables: Arc<Mutex<FlowTables>>,
    uplinks: Vec<(String, Option<Ipv4Addr>)>,
}

impl FlowQuery {
    /// The flows of `uplink` (by name) and of `client`, at most `limit`.
    /// The walk stops at the limit: bounded on a full table.
    pub fn run(
        &self,
        uplink: Option<&str>,
        client: Option<Ipv4Addr>,
        limit: usize,
    ) -> Result<crate::control::api::FlowList> {
        let wanted_uplink = match uplink {
            Some(name) => Some(
                self.uplinks
                    .iter()
                    .position(|(n, _)| n == name)
                    .with_context(|| format!("no uplink named {name:?}"))? as u32,
            ),
            None => None,
        };
        let now = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
        let tables = self
            .tables
            .lock()
            .map_err(|_| anyhow::anyhow!("the flow collector panicked; restart lbd"))?;
        let mut out = Vec::new();
        let mut walked = 0u64;
        let mut truncated = false;
        for (key, value) in tables.walk()? {
            walked += 1;
            if wanted_uplink.is_some_and(|u| u != value.uplink)
                || client.is_some_and(|c| c.octets() != key.src_addr)
            {
                continue;
            }
            if out.len() == limit {
                truncated = true;
                break;
            }
            let (name, addr) = if value.uplink == lb_common::KERNEL_OWNED {
                ("kernel".to_string(), None)
            } else {
                self.uplinks
                    .get(value.uplink as usize)
                    .cloned()
                    .unwrap_or_else(|| (format!("#{}", value.uplink), None))
            };
            out.push(crate::dataplane::flows::describe(
                &key, &value, &name, addr, now,
            ));
        }
        Ok(crate::control::api::FlowList {
            flows: out,
            walked,
            truncated,
        })
    }
}

/// One round of the reconciler: read what the kernel holds, converge, and
/// make the routing changes. Errors are the caller's to log: the next
/// round (the next event, or a second later) tries again.
pub async fn reconcile(daemon: &Mutex<Daemon>, link: &KernelLink) -> Result<()> {
    let observed = Observed::take(&link.handle).await?;
    let lock = || {
        daemon
            .lock()
            .map_err(|_| anyhow::anyhow!("daemon state is poisoned"))
    };
    // Off the async workers: a convergence may run `tc` (lb's shapers).
    let Converged {
        routing,
        slow_path_uplink,
        slowpath,
    } = tokio::task::block_in_place(|| lock()?.converge(&observed))?;
    if let Some(wanted) = slowpath {
        let counted = tokio::task::block_in_place(|| {
            // The table may not be there (yet): nothing counted then.
            let counted = nftables::counted().unwrap_or_default();
            nftables::apply(&wanted).map(|()| counted)
        })?;
        lock()?.slowpath_applied(wanted, &counted);
    }
    if !routing.is_empty() {
        let errors = routing::converge(&link.handle, routing).await;
        if !errors.is_empty() {
            bail!("routing: {}", errors.join("; "));
        }
    }
    lock()?.slow_path_applied = slow_path_uplink;
    Ok(())
}

/// What a convergence leaves to be done outside the daemon's lock.
pub struct Converged {
    pub routing: routing::Changes,
    /// The slow path's uplink that `routing` puts in place.
    pub slow_path_uplink: Option<usize>,
    /// lb's nftables table, when it must change.
    pub slowpath: Option<nftables::Wanted>,
}

/// A status waiting for its flow counts.
pub struct StatusDraft {
    status: Status,
    /// Flows pinned to an uplink since start.
    pinned: u64,
    tables: Arc<Mutex<FlowTables>>,
    counted_before: nftables::Counted,
}

impl StatusDraft {
    /// Walk the flow table (tenths of a second when it is full) and fill in
    /// the flows per uplink, and the evictions, which are the flows pinned
    /// that are neither collected nor still in the table.
    /// Waits for a collection that is under way, so that a flow is counted
    /// once: in the table, expired, or evicted.
    pub fn finish(mut self) -> Result<Status> {
        // Counted by nftables, read with `nft`: not under the daemon's lock.
        let mut counted = self.counted_before.clone();
        counted.add(&nftables::counted().unwrap_or_default());
        self.status.guard_dropped = counted.leaked;
        for (i, uplink) in self.status.uplinks.iter_mut().enumerate() {
            uplink.inbound = counted.inbound(i);
        }
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

/// What `lbd --check` can say of the machine besides the file: whether
/// the uplinks and LAN ports that exist now can take redirected frames (as
/// the start checks). Reads the kernel, changes nothing.
pub async fn check_machine(config: &Config) -> Result<()> {
    let (conn, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket failed")?;
    tokio::spawn(conn);
    let observed = Observed::take(&handle).await?;
    check_lans(config, &observed)?;
    check_xdp_targets(config, &observed)?;
    check_ingress_shapers(config, &observed)
}

/// Refuse a LAN given as a port of a bridge (the kernel routes its
/// traffic as the bridge's, so rules and addresses are the bridge's: give
/// the bridge, and lbd works on its ports), and an uplink's `routed`
/// prefix that overlaps a LAN's (it would be the LAN's and the ISP's at
/// once). LANs that do not exist yet are not checked here.
fn check_lans(config: &Config, observed: &Observed) -> Result<()> {
    let mut refused = Vec::new();
    let mut lan_indexes = Vec::new();
    for lan in &config.lans {
        let Some(link) = observed.link(&lan.interface) else {
            continue;
        };
        lan_indexes.push(link.index);
        let bridge = link
            .master
            .and_then(|m| observed.links.iter().find(|l| l.index == m))
            .filter(|m| m.kind.as_deref() == Some("bridge"));
        if let Some(bridge) = bridge {
            refused.push(format!(
                "LAN interface {} is a port of bridge {b}: give the bridge ([[lan]] interface = \"{b}\"); \
                 the LAN's addresses and routes are the bridge's, and lbd works on all its ports",
                lan.interface,
                b = bridge.name
            ));
        }
    }
    let lan_prefixes = observed.connected(&lan_indexes);
    for u in &config.uplinks {
        for r in &u.routed {
            if let Some((addr, len)) = lan_prefixes.iter().find(|(a, l)| r.overlaps(*a, *l)) {
                refused.push(format!(
                    "{}:{}: uplink {:?} key routed: {r} overlaps the LAN's {addr}/{len}; a prefix \
                     routed through an uplink is not a LAN's (lb would translate the LAN's)",
                    config.file, r.line, u.name
                ));
            }
        }
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
}

/// Refuse an uplink with an ingress shaper (an `ingress` qdisc feeding an
/// IFB, as SQM sets up): XDP forwards replies before it, so it would
/// silently shape nothing. `[uplink.shape] download` is the way lb shapes
/// downloads.
fn check_ingress_shapers(config: &Config, observed: &Observed) -> Result<()> {
    let refused: Vec<String> = config
        .uplinks
        .iter()
        .filter_map(|u| {
            let link = observed.link(&u.interface)?;
            egress::ingress_shaper(&observed.qdiscs, link.index, &u.name, &u.interface)
        })
        .collect();
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
}

/// Refuse an interface lb would redirect into (an uplink, a LAN port) that
/// the kernel says cannot take redirected frames: every packet sent there
/// would be lost without a word. Interfaces that do not exist yet are
/// checked by nobody (they are waited for); a kernel without the netdev
/// family (before 6.3) cannot say, and nothing is checked.
fn check_xdp_targets(config: &Config, observed: &Observed) -> Result<()> {
    let Some(mut caps) = crate::observe::xdpcaps::XdpCaps::open()? else {
        log::info!("the kernel does not report XDP features (before Linux 6.3): redirect targets not checked");
        return Ok(());
    };
    let uplinks = config.uplinks.iter().map(|u| u.interface.clone());
    let lan_ports = config
        .lans
        .iter()
        .flat_map(|l| observed.lan_ports(&l.interface))
        .map(|(_, name)| name);
    let mut refused = Vec::new();
    for ifname in uplinks.chain(lan_ports) {
        let Some(link) = observed.link(&ifname) else {
            continue;
        };
        let features = caps
            .features(link.index)
            .with_context(|| format!("asking the kernel for the XDP features of {ifname}"))?;
        refused.extend(crate::observe::xdpcaps::refusal(
            &ifname,
            link.kind.as_deref(),
            features,
        ));
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(())
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

/// Why an uplink waits, in the kernel's terms, for the operator; `None`
/// when it does not wait for the kernel.
fn waiting_reason(lifecycle: Lifecycle, cfg: &UplinkConfig, facts: &Facts) -> Option<String> {
    let ifname = &cfg.interface;
    Some(match lifecycle {
        Lifecycle::WaitingInterface => format!("no interface {ifname} (`ip link`)"),
        Lifecycle::WaitingCarrier => format!("{ifname} is down or has no carrier"),
        Lifecycle::WaitingAddress => {
            format!("no IPv4 address on {ifname} (DHCP or PPPoE pending?)")
        }
        Lifecycle::WaitingGateway => {
            format!(
                "no gateway: no default route through {ifname} in any table, and none configured"
            )
        }
        Lifecycle::GatewayUnresolved => format!(
            "gateway {} does not answer ARP on {ifname}",
            text_or_none(facts.gateway)
        ),
        _ => return None,
    })
}

/// Whether `addr` is in `prefix/len`.
fn contains(prefix: Ipv4Addr, len: u8, addr: Ipv4Addr) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(prefix) & mask == u32::from(addr) & mask
}

/// An address, or `-`.
fn text_or_none(addr: Option<Ipv4Addr>) -> String {
    addr.map_or_else(|| "-".into(), |a| a.to_string())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
