//! One round of the reconciler: the view and the kernel's snapshot in,
//! every kind lbd owns converged in the order that keeps packets safe
//! (`reconcile`): uplink entries and states, bucket table, attachments,
//! bypass, qdiscs, then, outside the daemon's lock, routes and rules and
//! nftables. Health verdicts, operator actions and quota actions change
//! the view and run the data plane's part of a round at once
//! ([`Daemon::converge_dataplane`]); the kernel's part follows in the next round.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::maps::uplink_state;

use crate::{
    config::UplinkConfig,
    control::api::Reaction,
    daemon::uplink::Lifecycle,
    dataplane::flows::Roamed,
    health::State as Health,
    observe::facts::{self, Facts},
    observe::kernel::Observed,
    observe::{conntrack, netlink},
    reconcile::attachments,
    reconcile::buckets::{Candidate, PolicyWant},
    reconcile::bypass,
    reconcile::egress,
    reconcile::nftables,
    reconcile::policies,
    reconcile::routing,
    reconcile::uplinks,
};

use super::*;

impl Daemon {
    /// Converge everything lbd owns towards what `observed` and the
    /// daemon's view call for. Returns the routing changes and the
    /// nftables table, if it must change, for the caller to make without
    /// holding the daemon.
    pub fn converge(&mut self, observed: &Observed) -> Result<Converged> {
        // One uplink lbd cannot set up (someone else's XDP program on its
        // interface, a probe that cannot bind) is kept out of service and
        // said; the others, and the rest of the round, go on.
        for i in 0..self.uplinks.len() {
            let u = &self.uplinks[i];
            let facts = Facts::observe(observed, &u.cfg.interface, u.cfg.gateway, &u.facts);
            let done = self.converge_uplink(i, facts);
            self.note_fault(i, done.err());
        }
        self.observe_ipv6(observed);
        for i in 0..self.uplinks.len() {
            if let Err(e) = self.converge_monitor6(i) {
                self.note_fault6(i, e);
            }
        }
        // The data plane's kinds, in their order; should one fail, the
        // kernel's side (routes, rules, nftables: the slow path every
        // failover falls back on) is converged all the same.
        let dataplane_error = self
            .converge_dataplane_kinds(observed)
            .err()
            .map(|e| format!("{e:#}"));

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
        let mut slowpath = nftables::Wanted {
            policy_rules: nftables::policy_rules(&self.config.rules, |name| {
                policies::policy_index(&self.config, name)
            }),
            lan6: self.ipv6.lan(),
            ..nftables::wanted(
                self.uplinks.iter().map(|u| (&u.cfg, u.facts.ifindex)),
                observed,
                self.local_ports,
                (self.config.nat.port_min, self.config.nat.port_max),
            )
        };
        slowpath.transport_ports = self
            .uplinks
            .iter()
            .filter_map(|u| u.facts.transport_port)
            .collect();
        if let Some(lan) = slowpath.lan6 {
            for (rules, u) in slowpath.uplinks.iter_mut().zip(&self.uplinks) {
                let target = ipv6::target(lan, u.facts6.delegated);
                rules.own6 = u
                    .facts6
                    .addr
                    .map(|a| (a, 128))
                    .into_iter()
                    .chain(u.facts6.delegated)
                    .chain(target)
                    .collect();
                rules.target6 = target.filter(|&t| t != lan);
            }
        }
        // Routes and rules, then nftables: made by the caller, outside the
        // daemon's lock.
        Ok(Converged {
            dataplane_error,
            routing: routing::changes(observed, &self.wanted_routing()),
            slow_path: self.slow_path(),
            slow_path_uplink6: self.slow_path_uplink6(),
            lan6: self.lan6,
            slowpath: (self.slowpath.as_ref() != Some(&slowpath)).then_some(slowpath),
        })
    }

    /// Converge the data plane's kinds after the uplinks', in the order
    /// that keeps packets safe, stopping at the first that fails.
    fn converge_dataplane_kinds(&mut self, observed: &Observed) -> Result<()> {
        // Uplink entries and states, then the bucket tables (one step
        // each), IPv6's too, then the rules that send flows to them.
        self.converge_dataplane()?;
        self.converge_rules()?;
        // Bypass: the destinations the kernel keeps (IPv4's; IPv6's went
        // with the data plane's step). Before lan_ingress takes over its
        // ports, so that it never meets a trie this round has not written
        // (one made anew at start is empty: `pins`).
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
        let (added, bypassed) = self.bypass.converge(bypass, &mut self.dataplane);
        // Their pinned flows are let go below, or by the next round should
        // this one stop before.
        self.bypass_added.extend(added);
        // Attachments: lan_ingress on the LAN ports (wan_ingress went on
        // with each uplink's entry), and what each is to the rules.
        self.converge_lan_ports(observed)?;
        // The earlier data plane's programs are swapped out now: the
        // flows they made since the start's copy.
        if self.lans_open {
            if let Some(carry) = self.carry.take() {
                let copied = carry.copy_into(&self.dataplane);
                say_carried(&carry, &copied, "carried since the start", false);
                carry.finish();
            }
        }
        // Clients that roamed to another port of their bridge; only these
        // bridges' news wake a round.
        self.lan_bridges
            .follow(roaming::lan_bridges(&self.config.lans, observed).into_keys());
        let moves = self.roaming.moves(&self.config.lans, observed);
        self.follow_clients(moves);
        let kept: Vec<(IpAddr, u8)> = std::mem::take(&mut self.bypass_added)
            .into_iter()
            .map(|(a, len)| (IpAddr::V4(a), len))
            .chain(
                self.ipv6
                    .take_added()
                    .into_iter()
                    .map(|(a, len)| (IpAddr::V6(a), len)),
            )
            .collect();
        self.forget_flows_to(kept);
        // Qdiscs: each device's way out, and lb's shapers; whatever the
        // bypass said (an L3 uplink's way out must not wait on a full
        // trie).
        let egress = self.converge_egress(observed);
        match (bypassed, egress) {
            (Err(b), Err(e)) => Err(anyhow::anyhow!("{b:#}; {e:#}")),
            (b, e) => b.and(e),
        }
    }

    /// Let go of the flows pinned to destinations in `kept` (prefixes the
    /// kernel has just come to keep: a route, an IPsec policy that came
    /// after them).
    fn forget_flows_to(&self, kept: Vec<(IpAddr, u8)>) {
        if kept.is_empty() {
            return;
        }
        let what = kept
            .iter()
            .map(|(a, len)| format!("{a}/{len}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.walk_flow_tables(
            move |t| t.forget_to(&kept),
            move |forgot| match forgot {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "{n} flows to destinations the kernel keeps now ({what}) let go: their next \
                     packets are the kernel's"
                ),
                Err(e) => log::warn!("letting go of the flows to {what}: {e:#}"),
            },
        );
    }

    /// Send the replies of clients heard on another port of their LAN's
    /// bridge out of that port (see `reconcile::roaming`): by the walk that
    /// runs, or by one started here.
    fn follow_clients(&self, moves: Vec<roaming::Move>) {
        let waiting = Arc::clone(&self.roamers);
        if !lock_waiting(&waiting).add(moves) {
            return;
        }
        let names: BTreeMap<u32, String> = self
            .attachments
            .lan_ports()
            .map(|(i, name)| (i, name.to_string()))
            .collect();
        // Until it ends by finding nothing waiting, the walk is running:
        // should it fail, panic or never run, the flag is let go with it.
        let mut walk = Walking {
            waiting,
            ended: false,
        };
        self.walk_flow_tables(
            move |t| {
                let mut total = 0;
                while let Some(moves) = walk.take() {
                    total += follow_walk(t, &moves, &names)?;
                }
                Ok(total)
            },
            |followed| {
                if let Err(e) = followed {
                    log::warn!("following the clients that roamed: {e:#}");
                }
            },
        );
    }

    /// Run `work` on the flow tables off the reconciler (the walk of a big
    /// table takes seconds), and say what it did.
    fn walk_flow_tables(
        &self,
        work: impl FnOnce(&mut FlowTables) -> Result<usize> + Send + 'static,
        say: impl FnOnce(Result<usize>) + Send + 'static,
    ) {
        let tables = Arc::clone(&self.flow_tables);
        let walk = move || {
            say(tables
                .lock()
                .map_err(|_| anyhow::anyhow!("the flow tables' lock is poisoned"))
                .and_then(|mut t| work(&mut t)))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(walk)),
            Err(_) => walk(),
        }
    }

    /// lb's nftables table was replaced by `wanted`; the one before had
    /// counted `counted`.
    pub(super) fn slowpath_applied(
        &mut self,
        wanted: nftables::Wanted,
        counted: &nftables::Counted,
    ) {
        self.counted_before.add(counted);
        self.slowpath = Some(wanted);
    }

    /// Keep what uplink `i`'s convergence could not do (`None`: it did it
    /// all), and say it when that changes: once, not once a round.
    pub(super) fn note_fault(&mut self, i: usize, error: Option<anyhow::Error>) {
        let u = &mut self.uplinks[i];
        let fault = error.map(|e| format!("{e:#}"));
        if fault == u.fault {
            return;
        }
        let said = match &fault {
            Some(why) => {
                let said =
                    format!("not set up, so out of service (tried again every round): {why}");
                log::warn!("uplink {}: {said}", u.cfg.name);
                u.reason = why.clone();
                said
            }
            None => {
                let said = "set up".to_string();
                log::info!("uplink {}: {said}", u.cfg.name);
                u.reason = said.clone();
                said
            }
        };
        self.history.say("fault", Some(&u.cfg.name), said);
        u.fault = fault;
    }

    /// Say why uplink `i`'s IPv6 probes could not start, once: its IPv6
    /// stays out of service (without health), its IPv4 is not concerned.
    pub(super) fn note_fault6(&mut self, i: usize, error: anyhow::Error) {
        let u = &mut self.uplinks[i];
        let said = format!("IPv6 probes not started: {error:#}; tried again every round");
        if u.six.reason != said {
            log::warn!("uplink {}: {said}", u.cfg.name);
            self.history.say("fault", Some(&u.cfg.name), said.clone());
            u.six.reason = said;
        }
    }

    /// Take in uplink `i`'s new facts: its data-plane entry, its XDP
    /// attachment, its health monitor, and asking for its gateway.
    pub(super) fn converge_uplink(&mut self, i: usize, facts: Facts) -> Result<()> {
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
        self.converge_monitor(i)?;
        let u = &mut self.uplinks[i];

        // The entry, with the state these facts call for, in one write.
        let flags = u.entry_flags();
        let entry = uplinks::wanted(&facts, u.dataplane_state(), u.epoch, flags, u.written);
        uplinks::converge(u.index, &mut u.written, entry, &mut self.dataplane)?;
        self.attachments.converge_uplink(
            &u.cfg.interface,
            facts.ifindex.filter(|_| facts.mac.is_some()),
            facts.l3,
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

    /// Attach `lan_ingress` where the LANs' frames arrive (see
    /// `reconcile::attachments`), once the guard is in place.
    pub(super) fn converge_lan_ports(&mut self, observed: &Observed) -> Result<()> {
        if !self.lans_open {
            return Ok(());
        }
        let wanted = attachments::wanted_lan_ports(&self.config.lans, observed);
        let mut facts = Vec::new();
        for lan in &self.config.lans {
            let addr = observed
                .link(&lan.interface)
                .and_then(|l| observed.address_of(l.index));
            for (ifindex, name) in observed.lan_ports(&lan.interface) {
                facts.push(policies::LanPortFacts {
                    ifindex,
                    names: vec![name, lan.interface.clone()],
                    addr,
                });
            }
        }
        // The router's MACs before the ports' programs, so that a new
        // port's first frame is asked; neither holds up the other.
        let macs = self
            .router_macs
            .converge(&self.config.lans, observed, &mut self.dataplane);
        self.attachments
            .converge_lans(wanted, &mut self.dataplane)?;
        self.policies
            .converge_lan_ports(&facts, &mut self.dataplane)?;
        macs
    }

    /// Write the operator's rules and prefix sets where they changed (see
    /// `reconcile::policies`).
    pub(super) fn converge_rules(&mut self) -> Result<()> {
        let started = Instant::now();
        let written = self.policies.converge(&self.config, &mut self.dataplane)?;
        if written > 0 {
            log::info!(
                "prefix sets: {written} trie entries written in {} ms",
                started.elapsed().as_millis()
            );
        }
        Ok(())
    }

    /// Converge lb's shapers, and tell the data plane which devices'
    /// qdiscs its packets must pass (see `egress`).
    pub(super) fn converge_egress(&mut self, observed: &Observed) -> Result<()> {
        let uplinks: Vec<(u32, &str, crate::config::Shape)> = self
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
        // Which devices take no XDP redirects, as the kernel says in this
        // round's observation (a veth's answer moves with its peer's GRO).
        let no_redirect = |ifindex: u32| observed.no_redirect(ifindex);
        let mut devices: Vec<egress::Device> = self
            .uplinks
            .iter()
            .filter(|u| u.attached.is_some())
            .filter_map(|u| {
                let ifindex = u.facts.ifindex?;
                Some(egress::Device {
                    ifindex,
                    name: u.cfg.interface.clone(),
                    bridge: None,
                    l3: u.facts.l3,
                    no_redirect: !u.facts.l3 && no_redirect(ifindex),
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
                        l3: false,
                        no_redirect: no_redirect(ifindex),
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
    pub(super) fn wanted_routing(&self) -> routing::Wanted {
        let ready: Vec<Option<routing::Ready>> = self
            .uplinks
            .iter()
            .map(|u| {
                let f = &u.facts;
                match (f.ifindex, f.addr) {
                    (Some(ifindex), Some(addr)) if f.routable() => Some(routing::Ready {
                        ifindex,
                        addr,
                        gateway: f.gateway,
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
        let policies: Vec<(u32, usize)> = (1..=self.config.policies.len() as u32)
            .filter_map(|p| Some((nftables::policy_mark(p), self.policy_slow_path_uplink(p)?)))
            .collect();
        let four = routing::wanted(
            &self.config.routing,
            &ready,
            &self.slow_path(),
            &lans,
            &policies,
        );
        let ready6: Vec<Option<routing::Ready6>> = self.uplinks.iter().map(ready6).collect();
        let six = routing::wanted6(
            &self.config.routing,
            &ready6,
            self.slow_path_uplink6(),
            &lans,
            self.lan6,
        );
        routing::Wanted {
            routes6: six.routes6,
            rules6: six.rules6,
            ..four
        }
    }

    /// The uplink that carries policy `index`'s slow path: of its uplinks
    /// in service with their table in place, the lowest tier (its own),
    /// then the heaviest weight, then the first. `None` when none is: the
    /// slow path's default uplink takes its connections then.
    pub fn policy_slow_path_uplink(&self, index: u32) -> Option<usize> {
        let policy = self.config.policies.get(index.checked_sub(1)? as usize)?;
        self.uplinks
            .iter()
            .enumerate()
            .filter(|(_, u)| self.carries_slow_path(u))
            .filter_map(|(i, u)| {
                let m = policy.uplinks.iter().find(|m| m.name == u.cfg.name)?;
                Some((i, m.tier, m.weight))
            })
            .min_by_key(|&(i, tier, weight)| (tier, std::cmp::Reverse(weight), i))
            .map(|(i, _, _)| i)
    }

    /// Whether uplink `u` is in service with its table in place.
    fn carries_slow_path(&self, u: &Uplink) -> bool {
        u.dataplane_state() == uplink_state::ACTIVE && u.facts.routable()
    }

    /// The uplinks of the slow path ([`routing::SlowPath::choose`]).
    pub fn slow_path(&self) -> routing::SlowPath {
        let candidates: Vec<routing::Candidate> = self
            .uplinks
            .iter()
            .map(|u| routing::Candidate {
                in_service: self.carries_slow_path(u),
                tier: u.cfg.tier,
                weight: u.weight,
                tunnel: u.facts.tunnel,
                transport_port: u.facts.transport_port,
            })
            .collect();
        routing::SlowPath::choose(&candidates)
    }

    /// The uplinks' devices that are tunnels (`wg` is asked about them):
    /// index and name.
    fn tunnel_devices(&self, observed: &Observed) -> Vec<(u32, String)> {
        self.uplinks
            .iter()
            .filter_map(|u| observed.link(&u.cfg.interface))
            .filter(|link| facts::is_tunnel(link))
            .map(|link| (link.index, link.name.clone()))
            .collect()
    }

    /// The uplink that carries the kernel's IPv6 (what the LAN sends
    /// through the kernel, what the router sends unbound): of the uplinks
    /// whose IPv6 is in service (its state as the data plane's IPv6 gets
    /// it: operator, carrier, IPv6 health, next hop, delegation) with
    /// their IPv6 table in place, and translated and guarded by lb's
    /// `ip6 lb` table as put in place, the lowest tier, then the heaviest
    /// weight, then the first, as for IPv4. Never a tunnel (a tap with
    /// IPv6): the router's own IPv6 takes this way, and lbd does not set a
    /// tunnel's own IPv6 packets apart. `None` when none is: the main
    /// table's default routes decide then, as without lbd.
    pub fn slow_path_uplink6(&self) -> Option<usize> {
        self.uplinks
            .iter()
            .enumerate()
            .filter(|&(i, u)| {
                if u.facts.tunnel {
                    return false;
                }
                let in_service = ipv6::side(self.lan6, &u.facts6, u.dataplane_state6(), true)
                    .is_some_and(|s| s.state == uplink_state::ACTIVE);
                in_service && ready6(u).is_some() && self.guards6(i, u)
            })
            .min_by_key(|(i, u)| (u.cfg.tier, std::cmp::Reverse(u.weight), *i))
            .map(|(i, _)| i)
    }

    /// Whether lb's `ip6 lb` table, as last put in place, translates the
    /// LAN's prefix for uplink `i` (`u`) as its IPv6 facts now call for
    /// (or leaves it be, on the uplink whose prefix it is) and guards it.
    /// The table follows the routing in a round: until it has caught up
    /// (the first round, a new delegation), the LAN's traffic must not be
    /// routed out of `u`, where it would leave untranslated.
    fn guards6(&self, i: usize, u: &Uplink) -> bool {
        let (Some(table), Some(lan)) = (&self.slowpath, self.lan6) else {
            return false;
        };
        let target = ipv6::target(lan, u.facts6.delegated).filter(|&t| t != lan);
        table.lan6 == Some(lan) && table.uplinks.get(i).is_some_and(|r| r.target6 == target)
    }

    /// Push every uplink's state to the data plane, then the bucket table
    /// that follows from it. The state write alone already moves traffic
    /// (the data plane steers new and orphaned flows past buckets whose
    /// uplink cannot take them, `lb_common::table::steer`); the table then
    /// spreads the moved buckets by weight.
    pub fn converge_dataplane(&mut self) -> Result<()> {
        self.converge_uplink_entries()?;
        self.converge_buckets()?;
        self.converge_ipv6()
    }

    /// [`converge_dataplane`](Self::converge_dataplane), recording in uplink `index`'s `last_change`
    /// how long it took from `seen` (the cause) through `taken` (the daemon
    /// took it up) to the data plane.
    pub(super) fn converge_dataplane_timed(
        &mut self,
        index: usize,
        seen: Instant,
        taken: Instant,
    ) -> Result<()> {
        self.converge_uplink_entries()?;
        let states = Instant::now();
        let applied_monotonic_ns = monotonic_ns();
        self.converge_buckets()?;
        self.converge_ipv6()?;
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
    pub(super) fn converge_uplink_entries(&mut self) -> Result<()> {
        for u in &mut self.uplinks {
            let lifecycle = u.lifecycle();
            let fault = u.fault.clone().filter(|_| lifecycle == Lifecycle::Faulty);
            if let Some(why) = fault.or_else(|| waiting_reason(lifecycle, &u.cfg, &u.facts)) {
                u.reason = why;
            }
            if lifecycle != u.lifecycle {
                let said = format!("{} -> {lifecycle} ({})", u.lifecycle, u.reason);
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("lifecycle", Some(&u.cfg.name), said);
                u.lifecycle = lifecycle;
            }
            let flags = u.entry_flags();
            let entry = uplinks::wanted(
                &u.facts,
                lifecycle.dataplane_state(),
                u.epoch,
                flags,
                u.written,
            );
            uplinks::converge(u.index, &mut u.written, entry, &mut self.dataplane)
                .with_context(|| format!("uplink {}", u.cfg.name))?;
        }
        Ok(())
    }

    /// Take in the kernel's IPv6 view: each uplink's IPv6 facts (its
    /// delegation among them), the LAN's prefix, and the IPv6
    /// destinations the kernel keeps; ask an unresolved next hop for its
    /// address.
    pub(super) fn observe_ipv6(&mut self, observed: &Observed) {
        let v6 = &observed.v6;
        let addrs: Vec<Option<std::net::Ipv6Addr>> = self
            .uplinks
            .iter()
            .map(|u| u.facts.ifindex.and_then(|i| v6.address_of(i)).map(|a| a.0))
            .collect();
        let configured: Vec<_> = self.uplinks.iter().map(|u| u.cfg.prefix6).collect();
        let now = Instant::now();
        let delegated: Vec<_> = ipv6::delegations(&v6.delegations(), &addrs, &configured)
            .into_iter()
            .zip(self.uplinks.iter_mut())
            .map(|(seen, u)| ipv6::held(seen, u.facts6.delegated, &mut u.delegation_lost, now))
            .collect();
        for (u, delegated) in self.uplinks.iter_mut().zip(&delegated) {
            let facts = match u.facts.ifindex {
                Some(ifindex) => {
                    // The interface's IPv6 MTU, or its default route's
                    // (where dhcpcd puts a router advertisement's),
                    // whichever is smaller.
                    let link = observed
                        .links
                        .iter()
                        .find(|l| l.index == ifindex)
                        .and_then(|l| l.ipv6_mtu);
                    let mtu = [link, v6.default_route_mtu(ifindex)]
                        .into_iter()
                        .flatten()
                        .min();
                    Facts6::observe(v6, ifindex, *delegated, mtu, &u.facts6)
                }
                None => Facts6::default(),
            };
            if facts.delegated != u.facts6.delegated {
                let said = format!(
                    "delegated IPv6 prefix {} -> {}",
                    prefix6_text(u.facts6.delegated),
                    prefix6_text(facts.delegated)
                );
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("prefix", Some(&u.cfg.name), said);
            }
            // Said when it changes, or first seen below the link's.
            let said_before = u.facts6.mtu.is_some();
            if facts.mtu != u.facts6.mtu
                && (said_before || facts.mtu.is_some_and(|m| m < u.facts.mtu))
            {
                let mtu =
                    |m: Option<u32>| m.map_or_else(|| "the link's".to_string(), |m| m.to_string());
                log::info!(
                    "uplink {}: IPv6 MTU {} -> {}",
                    u.cfg.name,
                    mtu(u.facts6.mtu),
                    mtu(facts.mtu)
                );
            }
            if facts.gateway != u.facts6.gateway {
                let said = format!(
                    "IPv6 gateway {} -> {}",
                    text_or_none(u.facts6.gateway),
                    text_or_none(facts.gateway)
                );
                log::info!("uplink {}: {said}", u.cfg.name);
                self.history.say("gateway", Some(&u.cfg.name), said);
            }
            u.facts6 = facts;
            if let (Some(ifindex), Some(gateway), None, true) = (
                u.facts.ifindex,
                facts.gateway,
                facts.gateway_mac,
                u.facts.carrier,
            ) {
                if u.last_poke6.is_none_or(|t| t.elapsed() >= POKE_EVERY) {
                    u.last_poke6 = Some(Instant::now());
                    if let Err(e) = netlink::poke6(&u.cfg.interface, ifindex, gateway) {
                        log::debug!("uplink {}: asking for {gateway}: {e:#}", u.cfg.name);
                    }
                }
            }
        }
        let lans: Vec<u32> = self
            .config
            .lans
            .iter()
            .filter_map(|l| observed.link(&l.interface).map(|l| l.index))
            .collect();
        self.lan6 = self
            .config
            .lans
            .iter()
            .find_map(|l| l.prefix6)
            .or_else(|| ipv6::lan_prefix(v6, &lans, &delegated));
        let uplink_ifindexes: Vec<u32> = self
            .uplinks
            .iter()
            .filter_map(|u| u.facts.ifindex)
            .collect();
        let ipsec = observed
            .ipsec
            .iter()
            .flatten()
            .filter_map(|&(addr, len)| match addr {
                std::net::IpAddr::V6(a) => Some((crate::observe::kernel6::mask6(a, len), len)),
                std::net::IpAddr::V4(_) => None,
            });
        self.bypass6 = v6
            .kernel_destinations(&uplink_ifindexes)
            .into_iter()
            .chain(ipsec)
            .collect();
    }

    /// Each uplink's IPv6 entry for its state and IPv6 facts, each
    /// policy's IPv6 bucket table, and the destinations the kernel keeps
    /// (see `reconcile::ipv6`). The tables go before the switch that turns
    /// IPv6 balancing on, so that the first balanced packet finds them.
    pub(super) fn converge_ipv6(&mut self) -> Result<()> {
        let lan = self.lan6;
        let sides: Vec<_> = self
            .uplinks
            .iter()
            .map(|u| ipv6::side(lan, &u.facts6, u.dataplane_state6(), true))
            .collect();
        let takes: Vec<bool> = sides
            .iter()
            .map(|side| side.is_some_and(|s| s.state == uplink_state::ACTIVE))
            .collect();
        let wants = self.policy_wants(|u| {
            (
                takes.get(u.index as usize).copied().unwrap_or(false),
                u.health6() == Some(Health::Degraded),
            )
        });
        self.ipv6.converge(
            lan,
            &sides,
            self.bypass6.clone(),
            &mut self.dataplane,
            |dataplane| self.buckets6.converge(&wants, dataplane).map(drop),
        )
    }

    /// Rebalance each policy's bucket table for the current states and
    /// weights (see `reconcile::buckets`): the default policy's from the
    /// uplinks' own weights and tiers, each `[[policy]]`'s from its own.
    pub(super) fn converge_buckets(&mut self) -> Result<()> {
        let wants = self.policy_wants(|u| {
            (
                u.dataplane_state() == uplink_state::ACTIVE,
                u.health == Some(Health::Degraded),
            )
        });
        self.buckets.converge(&wants, &mut self.dataplane)?;
        Ok(())
    }

    /// What each policy wants of one family's bucket tables, the default
    /// policy first: `state(uplink)` says whether an uplink takes new
    /// flows of the family, and whether it is degraded.
    fn policy_wants(&self, state: impl Fn(&Uplink) -> (bool, bool)) -> Vec<PolicyWant> {
        let candidate = |u: &Uplink, weight: u32, tier: u8| {
            let (takes_new_flows, degraded) = state(u);
            Candidate {
                weight,
                tier,
                takes_new_flows,
                degraded,
            }
        };
        let mut wants = vec![PolicyWant {
            candidates: self
                .uplinks
                .iter()
                .map(|u| candidate(u, u.weight, u.cfg.tier))
                .collect(),
            fallback: lb_common::policy::fallback::DEFAULT,
            sticky: lb_common::policy::sticky::NONE,
            sticky_timeout_ns: 0,
        }];
        for p in &self.config.policies {
            wants.push(PolicyWant {
                candidates: self
                    .uplinks
                    .iter()
                    .map(|u| match p.uplinks.iter().find(|m| m.name == u.cfg.name) {
                        Some(m) => candidate(u, m.weight, m.tier),
                        None => candidate(u, 0, 0),
                    })
                    .collect(),
                fallback: p.fallback.number(),
                sticky: p.sticky.map_or(0, |s| s.by.number()),
                sticky_timeout_ns: p.sticky.map_or(0, |s| s.timeout.as_nanos() as u64),
            });
        }
        wants
    }
}

/// One round of the reconciler: read what the kernel holds, converge every
/// kind in order, lb's nftables table and then the routing outside the
/// daemon's lock. Returns what failed (the data plane's part, routing
/// changes: for the caller to say; the next round tries them again); an
/// error is a round that could not be made at all.
pub async fn round(daemon: &Mutex<Daemon>, link: &KernelLink) -> Result<Vec<String>> {
    let mut observed = Observed::take(&link.handle).await?;
    let lock = || lock(daemon, "the daemon's state");
    let tunnels = lock()?.tunnel_devices(&observed);
    observed.wireguard_ports = link.wireguard.of(&tunnels).await;
    // Off the async workers: a convergence may run `tc` (lb's shapers).
    let Converged {
        dataplane_error,
        routing,
        slow_path,
        slow_path_uplink6,
        lan6,
        slowpath,
    } = tokio::task::block_in_place(|| lock()?.converge(&observed))?;
    let changes = routing.count() as u64;
    let routing_errors = if routing.is_empty() {
        Vec::new()
    } else {
        routing::converge(&link.handle, routing).await
    };
    {
        let mut d = lock()?;
        d.rounds += 1;
        d.routing_changes += changes;
    }
    let routed = routing_errors.is_empty();
    let errors: Vec<String> = dataplane_error
        .map(|e| format!("data plane: {e}"))
        .into_iter()
        .chain(routing_errors.into_iter().map(|e| format!("routing: {e}")))
        .collect();
    let applied = match slowpath {
        Some(wanted) => tokio::task::block_in_place(|| {
            // The table may not be there (yet): nothing counted then.
            let counted = nftables::counted().unwrap_or_default();
            nftables::apply(&wanted).map(|()| (wanted, counted))
        })
        .map(Some),
        None => Ok(None),
    };
    {
        let mut d = lock()?;
        // The routes are made, and the guard knows the uplinks' addresses:
        // new monitors may probe (should either have failed, the probes
        // show it).
        d.release_monitors();
        if let Some((wanted, counted)) = applied? {
            d.slowpath_applied(wanted, &counted);
        }
    }
    if routed {
        // The tunnels' own packets have another way out now: each
        // WireGuard uplink is made to send its next one by it (in the
        // background, and again for a while: `wireguard::Sources`).
        let moved = lock()?.slow_path_applied.transport != slow_path.transport;
        link.sources.after_round(moved, || {
            lock().map_or_else(
                |_| Vec::new(),
                |d| {
                    d.uplinks
                        .iter()
                        .filter(|u| u.facts.transport_port.is_some())
                        .map(|u| u.cfg.interface.clone())
                        .collect()
                },
            )
        });
        let moved6 = {
            let mut d = lock()?;
            d.slow_path_applied = slow_path;
            let before = std::mem::replace(&mut d.slow_path6_applied, slow_path_uplink6);
            before.is_some() && before != slow_path_uplink6
        };
        if let (true, Some(lan)) = (moved6, lan6) {
            tokio::task::block_in_place(|| forget_leaving6(lan));
        }
    }
    Ok(errors)
}

/// The kernel's IPv6 now leaves by another uplink: the LAN's connections
/// it forwarded are forgotten by conntrack, so that each one's next
/// packet starts anew, translated for the new uplink. (A prefix SNAT
/// keeps a connection's first translation whatever way it later leaves;
/// the old one would leave by the new uplink with the old uplink's
/// prefix, which the guard drops, until conntrack gave it up, minutes
/// later. Forgetting costs nothing more: conntrack picks a connection up
/// from its next packet.)
fn forget_leaving6(lan: crate::reconcile::ipv6::Prefix6) {
    let forgotten = conntrack::all6()
        .map(|all| conntrack::leaving(&all, lan))
        .and_then(|leaving| conntrack::forget(&leaving));
    match forgotten {
        Ok(n) => log::info!(
            "IPv6 slow path moved: conntrack forgot {n} of the LAN's connections, to be \
             translated for the new uplink"
        ),
        Err(e) => log::warn!(
            "IPv6 slow path moved, but its old connections could not be forgotten: {e:#}; \
             they recover when conntrack drops them"
        ),
    }
}

/// What a convergence leaves to be done outside the daemon's lock.
pub struct Converged {
    /// What the data plane's part of the round could not do, if anything.
    pub dataplane_error: Option<String>,
    pub routing: routing::Changes,
    /// The slow path's uplinks that `routing` puts in place.
    pub slow_path: routing::SlowPath,
    /// The same for the kernel's IPv6, and the LAN's prefix then.
    pub slow_path_uplink6: Option<usize>,
    pub lan6: Option<crate::reconcile::ipv6::Prefix6>,
    /// lb's nftables table, when it must change.
    pub slowpath: Option<nftables::Wanted>,
}

/// Uplink `u`'s IPv6 as its IPv6 table needs it (see
/// `reconcile::routing::wanted6`): its WAN IPv6 address and next hop, on
/// a link with carrier (the kernel takes no route through a link that is
/// down, and drops those it had).
fn ready6(u: &Uplink) -> Option<routing::Ready6> {
    let (f, six) = (&u.facts, &u.facts6);
    match (f.ifindex, six.addr, six.gateway) {
        (Some(ifindex), Some(addr), Some(gateway)) if f.carrier => Some(routing::Ready6 {
            ifindex,
            addr,
            gateway,
            delegated: six.delegated,
        }),
        _ => None,
    }
}

/// Why an uplink waits, in the kernel's terms, for the operator; `None`
/// when it does not wait for the kernel.
pub(super) fn waiting_reason(
    lifecycle: Lifecycle,
    cfg: &UplinkConfig,
    facts: &Facts,
) -> Option<String> {
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
        // Said at every start too, for the moment the kernel asks: "not
        // yet", not "does not".
        Lifecycle::GatewayUnresolved => format!(
            "no answer yet to ARP for gateway {} on {ifname}",
            text_or_none(facts.gateway)
        ),
        _ => return None,
    })
}

/// A walk for the clients that roamed, from its start to its end.
struct Walking {
    waiting: Arc<Mutex<roaming::Waiting>>,
    /// It ended by finding nothing waiting (which let go of the flag).
    ended: bool,
}

impl Walking {
    /// The moves to follow next, the lock held only to take them (rounds
    /// add while this walks); `None` ends the walk.
    fn take(&mut self) -> Option<Vec<roaming::Move>> {
        let next = lock_waiting(&self.waiting).take();
        self.ended = next.is_none();
        next
    }
}

impl Drop for Walking {
    fn drop(&mut self) {
        if !self.ended {
            lock_waiting(&self.waiting).give_up();
        }
    }
}

/// The moves waiting for a walk, whatever a panicking holder did (a list
/// and a flag stay consistent).
fn lock_waiting(w: &Mutex<roaming::Waiting>) -> std::sync::MutexGuard<'_, roaming::Waiting> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One walk of the flow tables for `moves`, said in the log; how many
/// flows followed.
fn follow_walk(
    t: &mut FlowTables,
    moves: &[roaming::Move],
    names: &BTreeMap<u32, String>,
) -> Result<usize> {
    let asked: Vec<Roamed> = moves
        .iter()
        .map(|m| Roamed {
            mac: m.mac,
            ports: &m.ports,
            to: m.to,
            generation: m.generation,
        })
        .collect();
    let followed = t.follow(&asked)?;
    let roamed: Vec<String> = moves
        .iter()
        .zip(&followed)
        .filter(|(_, &n)| n > 0)
        .map(|(m, n)| {
            let port = names
                .get(&m.to)
                .cloned()
                .unwrap_or_else(|| m.to.to_string());
            format!("{} to {port}, {n} flows", mac_text(&m.mac))
        })
        .collect();
    if !roamed.is_empty() {
        log::info!(
            "clients that roamed: {}; their flows' replies follow them",
            roamed.join("; ")
        );
    }
    Ok(followed.iter().sum())
}
