//! lbd's routing: per uplink with an address and a gateway, a table with
//! one default route through the gateway, a rule `from <uplink address>`
//! to it (mwan3's approach: probes and the router's own sockets bound to an
//! uplink leave through it however many default routes main has), and a
//! rule `fwmark <uplink's mark>` to it for the replies of connections that
//! came in on that uplink, and for the datagrams the data plane handed to
//! the kernel to fragment with that uplink's translation (both marked by
//! lbd's nftables table); then the slow
//! path's rules: the main table without default routes first, then the
//! tunnels' own packets (a WireGuard uplink's, by its listen port) to the
//! table of the best uplink that is no tunnel, then what the LAN sends
//! through the kernel, and what the router itself sends, to the table of
//! the uplink the slow path uses.
//!
//! IPv6 has the same, of its own ([`wanted6`]): per uplink with its IPv6
//! address and next hop, an IPv6 table (the same number: tables are per
//! family) and its rules, and the slow path's IPv6 rules to the table of
//! the best uplink whose IPv6 is in service. What the fast path leaves to
//! the kernel (fragments, ESP, extension headers, connections conntrack
//! had) and the router's own IPv6 then follow health, not the main
//! table's one default route from a router advertisement.
//!
//! [`wanted`] and [`wanted6`] are pure functions of the view; [`changes`]
//! compares them with what the kernel holds; [`converge`] makes the
//! changes. Everything lbd adds carries the route protocol
//! [`ROUTE_PROTOCOL`]: that is how it finds its own routes and rules again
//! (after a crash, too) and how it knows never to touch anyone else's.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rtnetlink::{
    packet_route::{
        route::{RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange},
        AddressFamily, IpProtocol,
    },
    Handle, RouteMessageBuilder,
};

use crate::{
    config::RoutingConfig,
    observe::{
        kernel::{Observed, Rule, MAIN_TABLE, ROUTE_PROTOCOL},
        kernel6::within,
    },
    reconcile::{
        ipv6::Prefix6,
        nftables::{self, INSIDE_MARK, MARK_MASK, POLICY_MASK},
    },
};

/// The interface a rule's `iif` names for what the router itself sends.
const LOOPBACK: &str = "lo";

/// What differs between lbd's IPv4 and IPv6 routes and rules: the family
/// in the messages, a host's prefix length, and how a default route is
/// said. Everything else is one code for both.
pub trait Family: Copy + Ord + fmt::Display + fmt::Debug + Into<IpAddr> {
    const FAMILY: AddressFamily;
    /// A single address's prefix length (32, 128).
    const HOST: u8;
    /// `ip` if it is of this family.
    fn of(ip: IpAddr) -> Option<Self>;
    /// The message that adds route `r`.
    fn route_message(r: &OwnedRoute<Self>) -> RouteMessage;
}

impl Family for Ipv4Addr {
    const FAMILY: AddressFamily = AddressFamily::Inet;
    const HOST: u8 = 32;

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }

    fn route_message(r: &OwnedRoute<Self>) -> RouteMessage {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(r.table)
            .output_interface(r.ifindex)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        match r.gateway {
            // The gateway is on the uplink's link by definition; the
            // kernel need not look for a route to it in this table.
            Some(gateway) => msg.gateway(gateway).onlink(),
            // Into the device itself (an L3 uplink): on its link.
            None => msg.scope(RouteScope::Link),
        }
        .build()
    }
}

impl Family for Ipv6Addr {
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    const HOST: u8 = 128;

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }

    fn route_message(r: &OwnedRoute<Self>) -> RouteMessage {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(r.table)
            .output_interface(r.ifindex)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        match r.gateway {
            // Usually the ISP router's link-local address, which needs
            // no route; a global one is on the link as IPv4's is.
            Some(gateway) => msg.gateway(gateway).onlink(),
            None => msg.scope(RouteScope::Link),
        }
        .build()
    }
}

/// A route lbd wants: in `table`, the default route via `gateway` on
/// `ifindex` (or into `ifindex` itself, an L3 uplink's, without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRoute<A = Ipv4Addr> {
    pub table: u32,
    pub gateway: Option<A>,
    pub ifindex: u32,
}

/// A rule lbd wants: at `priority`, what `selector` picks looks up
/// `table`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRule<A = Ipv4Addr> {
    pub priority: u32,
    pub selector: Selector<A>,
    pub table: u32,
}

/// The mark bits a `from` rule wants clear ([`Selector::From`]).
pub const FROM_MASK: u32 = POLICY_MASK | INSIDE_MARK;

/// Which packets an owned rule is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector<A = Ipv4Addr> {
    /// `from PREFIX fwmark 0/`[`FROM_MASK`]: an uplink's own traffic
    /// (its address: a host prefix; for IPv6 also a delegation), unless
    /// the operator's rules gave it a policy (then the policy's rule
    /// routes it) or it answers a connection from inside
    /// ([`INSIDE_MARK`]: then the main table routes it back there).
    From(A, u8),
    /// `iif NAME`: what arrives on a LAN interface (`lo`: what the router
    /// itself sends).
    Iif(String),
    /// `iif lo ipproto udp sport PORT`: a WireGuard tunnel's own packets,
    /// which the router sends from the tunnel's listen port.
    Transport(u16),
    /// `fwmark MARK/MASK`: the replies of the connections that came in on
    /// an uplink ([`MARK_MASK`]), or the slow path's connections of a
    /// policy ([`POLICY_MASK`]).
    Mark { mark: u32, mask: u32 },
    /// Every packet, with routes of prefix length 0 (default routes)
    /// ignored (`suppress_prefixlength 0`): whatever the table routes more
    /// specifically than by default stays routed so.
    AllButDefault,
}

impl<A: Family> fmt::Display for OwnedRule<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (priority, table) = (self.priority, self.table);
        match &self.selector {
            // As `ip rule` says it: a host without its length.
            Selector::From(a, len) if *len == A::HOST => write!(
                f,
                "{priority}: from {a} fwmark 0/{FROM_MASK:#x} lookup {table}"
            ),
            Selector::From(a, len) => write!(
                f,
                "{priority}: from {a}/{len} fwmark 0/{FROM_MASK:#x} lookup {table}"
            ),
            Selector::Iif(n) => write!(f, "{priority}: iif {n} lookup {table}"),
            Selector::Transport(port) => write!(
                f,
                "{priority}: iif {LOOPBACK} ipproto udp sport {port} lookup {table}"
            ),
            Selector::Mark { mark, mask } => {
                write!(f, "{priority}: fwmark {mark:#x}/{mask:#x} lookup {table}")
            }
            Selector::AllButDefault => {
                write!(f, "{priority}: lookup {table} suppress_prefixlength 0")
            }
        }
    }
}

/// lbd's routing, as it should be: IPv4's and IPv6's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub routes: BTreeSet<OwnedRoute>,
    pub rules: BTreeSet<OwnedRule>,
    pub routes6: BTreeSet<OwnedRoute<Ipv6Addr>>,
    pub rules6: BTreeSet<OwnedRule<Ipv6Addr>>,
}

/// One of lbd's rules to remove: as `ip rule` says it, and the message.
pub type RuleRemoval = (String, RuleMessage);

/// What to change to get from what is to what is wanted. What goes is
/// removed by the kernel's own message, whatever its family.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub add_routes: Vec<OwnedRoute>,
    pub add_routes6: Vec<OwnedRoute<Ipv6Addr>>,
    /// lbd's routes to remove: as `ip route` says them, and the message.
    pub del_routes: Vec<(String, RouteMessage)>,
    pub add_rules: Vec<OwnedRule>,
    pub add_rules6: Vec<OwnedRule<Ipv6Addr>>,
    /// lbd's rules to remove: as `ip rule` says them, and the message.
    pub del_rules: Vec<RuleRemoval>,
    /// Interface names by index, to say the routes to add.
    pub names: BTreeMap<u32, String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// How many routes and rules they add or remove.
    pub fn count(&self) -> usize {
        self.add_routes.len()
            + self.add_routes6.len()
            + self.del_routes.len()
            + self.add_rules.len()
            + self.add_rules6.len()
            + self.del_rules.len()
    }
}

/// An uplink that can have its table: its interface, address and gateway
/// as the kernel has them now (and its carrier up); an L3 uplink needs no
/// gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
}

/// An uplink whose IPv6 can have its table: its interface, its WAN IPv6
/// address and IPv6 next hop as the kernel has them now (its carrier up),
/// and the prefix delegated through it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready6 {
    pub ifindex: u32,
    pub addr: Ipv6Addr,
    pub gateway: Ipv6Addr,
    pub delegated: Option<Prefix6>,
}

/// lbd's routing tables and rules as they should be: for each uplink
/// `Ready` (by index), its table, its rule for its own address and its
/// rule for the replies of the connections that came in on it (by their
/// mark); and the slow path's rules, which send the tunnels' own packets
/// by `slow_path.transport`, what the LAN's clients send through the
/// kernel to the internet (ESP, GRE, fragments) by uplink `slow_path.lan`,
/// and what else the router itself sends (its DNS forwarder, NTP, updates)
/// by `slow_path.own`.
pub fn wanted(
    routing: &RoutingConfig,
    uplinks: &[Option<Ready>],
    slow_path: &SlowPath,
    lans: &[&str],
    policies: &[(u32, usize)],
) -> Wanted {
    let mut wanted = Wanted::default();
    let later = routing.later_priorities();
    for (i, ready) in uplinks.iter().enumerate() {
        let Some(Ready {
            ifindex,
            addr,
            gateway,
        }) = *ready
        else {
            continue;
        };
        let table = routing.table(i);
        wanted.routes.insert(OwnedRoute {
            table,
            gateway,
            ifindex,
        });
        wanted.rules.insert(OwnedRule {
            priority: routing.priority(i),
            selector: Selector::From(addr, Ipv4Addr::HOST),
            table,
        });
        wanted.rules.insert(OwnedRule {
            priority: later.inbound,
            selector: Selector::Mark {
                mark: nftables::mark(i),
                mask: MARK_MASK,
            },
            table,
        });
    }
    if !wanted.routes.is_empty() {
        // The main table keeps what it routes more specifically than by
        // default (the LAN, static and VPN routes), before any of lbd's
        // tables is asked for a default route.
        wanted.rules.insert(OwnedRule {
            priority: later.main,
            selector: Selector::AllButDefault,
            table: MAIN_TABLE,
        });
    }
    // A tunnel's own packets never go into a tunnel, whatever a policy
    // says of the router's traffic: by the best uplink that is none, or
    // by the main table's default route while none is in service (as
    // without lbd; the rules after this one could send them into the
    // tunnel itself).
    let carrier = slow_path
        .transport
        .uplink
        .map_or(MAIN_TABLE, |i| routing.table(i));
    for &port in &slow_path.transport.ports {
        wanted.rules.insert(OwnedRule {
            priority: later.transport,
            selector: Selector::Transport(port),
            table: carrier,
        });
    }
    // The slow path's connections of a policy (marked by lb's table) go
    // by that policy's best uplink in service, before the rest.
    for &(mark, i) in policies {
        if uplinks.get(i).is_some_and(Option::is_some) {
            wanted.rules.insert(OwnedRule {
                priority: later.inbound,
                selector: Selector::Mark {
                    mark,
                    mask: POLICY_MASK,
                },
                table: routing.table(i),
            });
        }
    }
    // The rest from the LAN, and what the router sends unbound, goes by
    // an uplink in service. (A socket bound to an uplink's address has its
    // own rule above.)
    let sources = lans
        .iter()
        .map(|&lan| (lan, slow_path.lan))
        .chain([(LOOPBACK, slow_path.own)]);
    for (iif, uplink) in sources {
        if let Some(i) = uplink {
            wanted.rules.insert(OwnedRule {
                priority: later.slow_path,
                selector: Selector::Iif(iif.to_owned()),
                table: routing.table(i),
            });
        }
    }
    wanted
}

/// The uplinks of the slow path: the LAN's, the router's own, and the
/// tunnels' own packets'. `None`: the main table decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlowPath {
    pub lan: Option<usize>,
    /// Enters a tunnel only when every tunnel's own packets have their
    /// rule (`transport`): a tunnel would carry itself.
    pub own: Option<usize>,
    pub transport: Transport,
}

/// The tunnels' own packets: the listen ports of the WireGuard uplinks,
/// and the uplink (never a tunnel) that carries what leaves from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transport {
    pub ports: Vec<u16>,
    /// `None`: the main table's default route.
    pub uplink: Option<usize>,
}

/// An uplink as the slow path's choice sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    /// In service, with its table in place.
    pub in_service: bool,
    pub tier: u8,
    pub weight: u32,
    /// A tunnel (`observe::facts`), and its listen port if it is a
    /// WireGuard one that `wg` told.
    pub tunnel: bool,
    pub transport_port: Option<u16>,
}

impl SlowPath {
    /// The slow path's uplinks among `uplinks` (by index), each the
    /// lowest tier in service, then the heaviest weight, then the first:
    /// the LAN's, of all; the tunnels' own packets', of those that are no
    /// tunnel (sent into a tunnel, they would be lost, and its handshake
    /// with them); the router's other traffic, the LAN's while every
    /// tunnel's own packets are known apart, and the tunnels' otherwise
    /// (a tunnel that is no WireGuard, OpenVPN's, sends from ports lbd
    /// does not know).
    pub fn choose(uplinks: &[Candidate]) -> SlowPath {
        let best = |take: fn(&Candidate) -> bool| {
            uplinks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.in_service && take(c))
                .min_by_key(|(i, c)| (c.tier, std::cmp::Reverse(c.weight), *i))
                .map(|(i, _)| i)
        };
        let lan = best(|_| true);
        let carrier = best(|c| !c.tunnel);
        let mut ports: Vec<u16> = uplinks.iter().filter_map(|c| c.transport_port).collect();
        ports.sort_unstable();
        ports.dedup();
        let known_apart = uplinks
            .iter()
            .all(|c| !c.tunnel || c.transport_port.is_some());
        SlowPath {
            lan,
            own: if known_apart { lan } else { carrier },
            transport: Transport {
                ports,
                uplink: carrier,
            },
        }
    }

    /// One uplink for the LAN's and the router's own, no tunnel.
    pub fn both(uplink: Option<usize>) -> SlowPath {
        SlowPath {
            lan: uplink,
            own: uplink,
            transport: Transport::default(),
        }
    }
}

/// lbd's IPv6 tables and rules as they should be (the `routes6` and
/// `rules6` of a [`Wanted`]; the rest empty). For each uplink `Ready6`
/// (by index): its IPv6 table, with the default route through its IPv6
/// next hop; `from <its WAN address>`, at its own priority as IPv4's
/// (probes and sockets bound to it leave by it); the replies of the
/// connections that came in on it (the `ip6 lb` table's mark); and `from
/// <its delegation>` unless that delegation holds `lan`, the LAN's prefix.
/// Then the main table without default routes, and the slow path's rules:
/// what the LAN sends through the kernel and what the router sends by
/// uplink `slow_path`'s table, the best whose IPv6 is in service (`None`:
/// no rule, the main table's default routes decide, as without lbd).
///
/// A delegation's rule comes after the main table (a host of it talking
/// to the LAN or a VPN stays routed so) and before the slow path: an ISP
/// drops sources it did not delegate, so a host holding an address of
/// that delegation (a LAN announcing several prefixes), or answering a
/// connection made to one, can only be answered through it. The LAN's own
/// prefix has none: its traffic is the slow path's, by the best uplink and
/// translated there (`ip6 lb`), or it would never fail over.
pub fn wanted6(
    routing: &RoutingConfig,
    uplinks: &[Option<Ready6>],
    slow_path: Option<usize>,
    lans: &[&str],
    lan: Option<Prefix6>,
) -> Wanted {
    let mut wanted = Wanted::default();
    let later = routing.later_priorities();
    for (i, ready) in uplinks.iter().enumerate() {
        let Some(Ready6 {
            ifindex,
            addr,
            gateway,
            delegated,
        }) = *ready
        else {
            continue;
        };
        let table = routing.table(i);
        wanted.routes6.insert(OwnedRoute {
            table,
            gateway: Some(gateway),
            ifindex,
        });
        wanted.rules6.insert(OwnedRule {
            priority: routing.priority(i),
            selector: Selector::From(addr, Ipv6Addr::HOST),
            table,
        });
        wanted.rules6.insert(OwnedRule {
            priority: later.inbound,
            selector: Selector::Mark {
                mark: nftables::mark(i),
                mask: MARK_MASK,
            },
            table,
        });
        if let Some(d) = delegated.filter(|&d| !lan.is_some_and(|lan| within(lan, d))) {
            wanted.rules6.insert(OwnedRule {
                priority: later.inbound,
                selector: Selector::From(d.0, d.1),
                table,
            });
        }
    }
    if !wanted.routes6.is_empty() {
        // As for IPv4: the LAN, the delegations' unreachable routes,
        // static and VPN routes first.
        wanted.rules6.insert(OwnedRule {
            priority: later.main,
            selector: Selector::AllButDefault,
            table: MAIN_TABLE,
        });
    }
    if let Some(i) = slow_path.filter(|&i| uplinks.get(i).is_some_and(Option::is_some)) {
        for iif in lans.iter().copied().chain([LOOPBACK]) {
            wanted.rules6.insert(OwnedRule {
                priority: later.slow_path,
                selector: Selector::Iif(iif.to_owned()),
                table: routing.table(i),
            });
        }
    }
    wanted
}

/// Routes and rules in the places lbd would use that are not lbd's: a
/// table of its range with someone else's routes, or a rule at one of
/// its priorities, of either family. Each is a sentence for the operator.
pub fn clashes(observed: &Observed, routing: &RoutingConfig, uplinks: usize) -> Vec<String> {
    let tables = routing.first_table..routing.first_table + uplinks as u32;
    let priorities = (routing.first_priority..routing.first_priority + uplinks as u32)
        .chain(routing.later_priorities().all());
    let routes = observed
        .routes
        .iter()
        .map(|r| (r.table, IpAddr::V4(r.dst), r.dst_len, r.protocol, ""))
        .chain(
            observed
                .v6
                .routes
                .iter()
                .map(|r| (r.table, IpAddr::V6(r.dst), r.dst_len, r.protocol, " -6")),
        );
    let rules = observed
        .rules
        .iter()
        .map(|r| (r, ""))
        .chain(observed.v6.rules.iter().map(|r| (r, " -6")));
    let mut out = Vec::new();
    for table in tables {
        if let Some((_, dst, len, protocol, ip)) = routes
            .clone()
            .find(|r| r.0 == table && r.3 != ROUTE_PROTOCOL)
        {
            out.push(format!(
                "routing table {table} already holds routes lbd did not make (e.g. {dst}/{len} \
                 proto {protocol}; `ip{ip} route show table {table}`); set [routing] first_table \
                 to a free range"
            ));
        }
    }
    for priority in priorities {
        if let Some((r, ip)) = rules
            .clone()
            .find(|(r, _)| r.priority == priority && r.protocol != ROUTE_PROTOCOL)
        {
            out.push(format!(
                "a rule at priority {priority} is not lbd's (it looks up table {}; `ip{ip} rule \
                 show`); set [routing] first_priority to a free range",
                r.table
            ));
        }
    }
    out
}

/// `r` (one of lbd's) as lbd would have wanted it, if it is of a kind lbd
/// makes.
fn owned_rule<A: Family>(r: &Rule) -> Option<OwnedRule<A>> {
    if r.other {
        return None;
    }
    let udp = u8::from(IpProtocol::Udp);
    let selector = match (r.source, &r.iif, r.suppress, r.fwmark, r.ip_proto, r.sport) {
        (Some((source, len)), None, None, Some((0, FROM_MASK)), None, None) => {
            Selector::From(A::of(source)?, len)
        }
        (None, Some(iif), None, None, None, None) => Selector::Iif(iif.clone()),
        (None, Some(iif), None, None, Some(p), Some((first, last)))
            if iif == LOOPBACK && p == udp && first == last =>
        {
            Selector::Transport(first)
        }
        (None, None, Some(0), None, None, None) => Selector::AllButDefault,
        (None, None, None, Some((mark, mask)), None, None)
            if mask == MARK_MASK || mask == POLICY_MASK =>
        {
            Selector::Mark { mark, mask }
        }
        _ => return None,
    };
    r.looks_up.then_some(OwnedRule {
        priority: r.priority,
        selector,
        table: r.table,
    })
}

/// Sorts what the kernel holds of lbd's (`held`: each as lbd would want
/// it, `None` if lbd never makes such a thing, with the message that
/// removes it) against `wanted`: what is not wanted goes to `remove`;
/// returns what is wanted and missing.
fn sort_out<'a, T: Ord + Clone, M: Clone + 'a>(
    held: impl Iterator<Item = (Option<T>, &'a M, String)>,
    wanted: &BTreeSet<T>,
    remove: &mut Vec<(String, M)>,
) -> Vec<T> {
    let mut have = BTreeSet::new();
    for (owned, message, text) in held {
        match owned {
            Some(o) if wanted.contains(&o) => {
                have.insert(o);
            }
            _ => remove.push((text, message.clone())),
        }
    }
    wanted.difference(&have).cloned().collect()
}

/// What to add and remove so that lbd's routes and rules are `wanted`:
/// its own that are not wanted go, wanted ones that are missing come.
pub fn changes(observed: &Observed, wanted: &Wanted) -> Changes {
    let mut changes = Changes::default();
    let ours = |protocol: u8| protocol == ROUTE_PROTOCOL;
    let names: BTreeMap<u32, String> = observed
        .links
        .iter()
        .map(|l| (l.index, l.name.clone()))
        .collect();
    let dev = |ifindex: u32| {
        names
            .get(&ifindex)
            .map_or_else(|| format!(" dev #{ifindex}"), |n| format!(" dev {n}"))
    };
    let routes = observed
        .routes
        .iter()
        .filter(|r| ours(r.protocol))
        .map(|r| {
            let (owned, text) = held(r.table, r.dst, r.dst_len, r.gateway, &r.oifs, &dev);
            (owned, &r.message, text)
        });
    changes.add_routes = sort_out(routes, &wanted.routes, &mut changes.del_routes);
    let routes6 = observed
        .v6
        .routes
        .iter()
        .filter(|r| ours(r.protocol))
        .map(|r| {
            let (owned, text) = held(r.table, r.dst, r.dst_len, r.gateway, r.oif.as_slice(), &dev);
            (owned, &r.message, text)
        });
    changes.add_routes6 = sort_out(routes6, &wanted.routes6, &mut changes.del_routes);
    let rules = observed
        .rules
        .iter()
        .filter(|r| ours(r.protocol))
        .map(|r| (owned_rule(r), &r.message, rule_text(r)));
    changes.add_rules = sort_out(rules, &wanted.rules, &mut changes.del_rules);
    let rules6 = observed
        .v6
        .rules
        .iter()
        .filter(|r| ours(r.protocol))
        .map(|r| (owned_rule(r), &r.message, rule_text(r)));
    changes.add_rules6 = sort_out(rules6, &wanted.rules6, &mut changes.del_rules);
    changes.names = names;
    changes
}

/// Add route `r` (`names`: interfaces by index, to say it); a failure is
/// said in `errors`.
async fn add_route<A: Family>(
    handle: &Handle,
    r: &OwnedRoute<A>,
    names: &BTreeMap<u32, String>,
    errors: &mut Vec<String>,
) {
    let msg = A::route_message(r);
    if let Err(e) = handle.route().add(msg).replace().execute().await {
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        let dev = names
            .get(&r.ifindex)
            .map_or_else(|| format!("#{} (gone?)", r.ifindex), Clone::clone);
        errors.push(format!(
            "adding default{via} dev {dev} to table {}: {e} (`ip route show table {}`)",
            r.table, r.table
        ));
    }
}

/// One of lbd's routes as the kernel holds it: as lbd would want it (a
/// default route through one interface; `None` if lbd never makes such
/// a route), and as `ip route` says it (`dev` names an interface).
fn held<A: Copy + Into<IpAddr>>(
    table: u32,
    dst: A,
    dst_len: u8,
    gateway: Option<A>,
    oifs: &[u32],
    dev: &impl Fn(u32) -> String,
) -> (Option<OwnedRoute<A>>, String) {
    let owned = match (dst_len, oifs) {
        (0, &[ifindex]) => Some(OwnedRoute {
            table,
            gateway,
            ifindex,
        }),
        _ => None,
    };
    let devs: String = oifs.iter().map(|&i| dev(i)).collect();
    let text = route_text(dst.into(), dst_len, gateway.map(Into::into), &devs, table);
    (owned, text)
}

/// A route as `ip route` says it: `DEST/LEN [via GATEWAY] DEVS table N`.
fn route_text(dst: IpAddr, len: u8, gateway: Option<IpAddr>, devs: &str, table: u32) -> String {
    let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    format!("{dst}/{len}{via}{devs} table {table}")
}

/// A rule as `ip rule` says it: `PRIORITY: [from P] [iif N] [fwmark M/K]
/// [ipproto N] [sport A-B] lookup T [suppress_prefixlength S]`.
fn rule_text(r: &Rule) -> String {
    let mut text = format!("{}:", r.priority);
    if let Some((source, len)) = r.source {
        text += &format!(" from {source}/{len}");
    }
    if let Some(iif) = &r.iif {
        text += &format!(" iif {iif}");
    }
    if let Some((mark, mask)) = r.fwmark {
        text += &format!(" fwmark {mark:#x}/{mask:#x}");
    }
    if let Some(p) = r.ip_proto {
        text += &format!(" ipproto {p}");
    }
    if let Some((first, last)) = r.sport {
        text += &format!(" sport {first}-{last}");
    }
    text += &format!(" lookup {}", r.table);
    if let Some(s) = r.suppress {
        text += &format!(" suppress_prefixlength {s}");
    }
    text
}

/// Add rule `r`; a failure is said in `errors`.
async fn add_rule<A: Family>(handle: &Handle, r: &OwnedRule<A>, errors: &mut Vec<String>) {
    let mut req = handle
        .rule()
        .add()
        .action(RuleAction::ToTable)
        .table_id(r.table)
        .priority(r.priority);
    let msg = req.message_mut();
    msg.header.family = A::FAMILY;
    match &r.selector {
        Selector::From(source, len) => {
            msg.header.src_len = *len;
            msg.attributes.extend([
                RuleAttribute::Source((*source).into()),
                RuleAttribute::FwMark(0),
                RuleAttribute::FwMask(FROM_MASK),
            ]);
        }
        Selector::Iif(name) => msg.attributes.push(RuleAttribute::Iifname(name.clone())),
        Selector::Transport(port) => msg.attributes.extend([
            RuleAttribute::Iifname(LOOPBACK.to_owned()),
            RuleAttribute::IpProtocol(IpProtocol::Udp),
            RuleAttribute::SourcePortRange(RulePortRange {
                start: *port,
                end: *port,
            }),
        ]),
        Selector::Mark { mark, mask } => msg
            .attributes
            .extend([RuleAttribute::FwMark(*mark), RuleAttribute::FwMask(*mask)]),
        Selector::AllButDefault => msg.attributes.push(RuleAttribute::SuppressPrefixLen(0)),
    }
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(
            ROUTE_PROTOCOL,
        )));
    if let Err(e) = req.execute().await {
        errors.push(format!("adding rule {r}: {e}"));
    }
}

/// Which of lbd's rules to remove go before the additions: those of an
/// address (`from`), since an old rule for an address that moved must not
/// outlive it. The rest go after, so that no packet finds neither the old
/// rule nor its successor (a slow path that moves to another uplink: the
/// old `iif` rule, at the same priority, is asked first while both are
/// there).
fn removal_order(del_rules: Vec<RuleRemoval>) -> (Vec<RuleRemoval>, Vec<RuleRemoval>) {
    del_rules
        .into_iter()
        .partition(|(_, msg)| msg.header.src_len > 0)
}

/// Make `changes`: the removals of rules for addresses and of routes
/// first, then the additions, then the other removals
/// ([`removal_order`]). Every step is tried; the errors are returned
/// together, for the next round to retry.
pub async fn converge(handle: &Handle, changes: Changes) -> Vec<String> {
    let mut errors = Vec::new();
    let (first, last) = removal_order(changes.del_rules);
    for (text, msg) in first {
        if let Err(e) = handle.rule().del(msg).execute().await {
            errors.push(format!("removing rule {text} (`ip rule show`): {e}"));
        }
    }
    for (text, msg) in changes.del_routes {
        if let Err(e) = handle.route().del(msg).execute().await {
            errors.push(format!("removing route {text}: {e}"));
        }
    }
    for r in &changes.add_routes {
        add_route(handle, r, &changes.names, &mut errors).await;
    }
    for r in &changes.add_routes6 {
        add_route(handle, r, &changes.names, &mut errors).await;
    }
    for r in &changes.add_rules {
        add_rule(handle, r, &mut errors).await;
    }
    for r in &changes.add_rules6 {
        add_rule(handle, r, &mut errors).await;
    }
    for (text, msg) in last {
        if let Err(e) = handle.rule().del(msg).execute().await {
            errors.push(format!("removing rule {text} (`ip rule show`): {e}"));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{
        kernel::{fixtures::*, Rule},
        kernel6::fixtures::{ip6, route6, router6},
    };
    use rtnetlink::packet_route::route::RouteType;

    #[test]
    fn rules_of_an_address_go_before_the_additions_and_the_rest_after() {
        let rule = |src_len: u8| {
            let mut msg = RuleMessage::default();
            msg.header.src_len = src_len;
            (format!("/{src_len}"), msg)
        };
        let (first, last) = removal_order(vec![rule(0), rule(32), rule(0), rule(56)]);
        let said =
            |v: &[(String, RuleMessage)]| v.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
        assert_eq!(said(&first), ["/32", "/56"]);
        assert_eq!(said(&last), ["/0", "/0"]);
    }

    #[test]
    fn changes_replace_lbds_stale_routes_and_leave_others_alone() {
        let o = router();
        let wanted = Wanted {
            routes: [OwnedRoute {
                table: 4000,
                gateway: Some(ip("100.64.1.1")),
                ifindex: WAN1,
            }]
            .into_iter()
            .collect(),
            rules: [OwnedRule {
                priority: 4000,
                selector: Selector::From(ip("100.64.1.2"), 32),
                table: 4000,
            }]
            .into_iter()
            .collect(),
            ..Wanted::default()
        };
        let c = changes(&o, &wanted);
        assert_eq!(c.add_routes.len(), 1);
        // Only lbd's own stale route (via .9) goes.
        assert_eq!(c.del_routes.len(), 1);
        assert_eq!(c.add_rules.len(), 1);
        assert!(c.del_rules.is_empty());
        // Once it is there, nothing to do.
        let mut o2 = o.clone();
        o2.routes.retain(|r| r.protocol != ROUTE_PROTOCOL);
        o2.routes.push(route_in(
            4000,
            "0.0.0.0",
            0,
            Some("100.64.1.1"),
            WAN1,
            ROUTE_PROTOCOL,
        ));
        o2.rules.push(Rule {
            priority: 4000,
            looks_up: true,
            table: 4000,
            source: Some((ip("100.64.1.2").into(), 32)),
            iif: None,
            suppress: None,
            fwmark: Some((0, FROM_MASK)),
            ip_proto: None,
            sport: None,
            other: false,
            protocol: ROUTE_PROTOCOL,
            message: RuleMessage::default(),
        });
        assert!(changes(&o2, &wanted).is_empty());
        // The same rule as an lbd before INSIDE_MARK made it (its mask the
        // policies' alone) is replaced: the router's answers into the LAN
        // would take it.
        let mut older = o2.clone();
        if let Some(r) = older.rules.last_mut() {
            r.fwmark = Some((0, POLICY_MASK));
        }
        let c = changes(&older, &wanted);
        assert_eq!((c.add_rules.len(), c.del_rules.len()), (1, 1));
        // Wanting nothing removes all of lbd's, and only lbd's; said as
        // `ip route` and `ip rule` say them.
        let c = changes(&o2, &Wanted::default());
        assert_eq!((c.del_routes.len(), c.del_rules.len()), (1, 1));
        // (The fixture names no links: an interface by its index then.)
        assert_eq!(
            c.del_routes[0].0,
            "0.0.0.0/0 via 100.64.1.1 dev #3 table 4000"
        );
        assert_eq!(
            c.del_rules[0].0,
            format!("4000: from 100.64.1.2/32 fwmark 0x0/{FROM_MASK:#x} lookup 4000")
        );
    }

    #[test]
    fn clashes_name_foreign_routes_and_rules_in_lbds_range() {
        let mut o = router();
        let routing = RoutingConfig::default();
        assert!(
            clashes(&o, &routing, 2).is_empty(),
            "lbd's own route is no clash"
        );
        o.routes
            .push(route_in(4001, "0.0.0.0", 0, Some("100.64.2.1"), WAN2, DHCP));
        o.rules.push(Rule {
            priority: 4000,
            looks_up: true,
            table: 100,
            source: None,
            iif: None,
            suppress: None,
            fwmark: None,
            ip_proto: None,
            sport: None,
            other: false,
            protocol: 0,
            message: RuleMessage::default(),
        });
        let clashes = clashes(&o, &routing, 2);
        assert_eq!(clashes.len(), 2, "{clashes:?}");
        assert!(clashes[0].contains("table 4001"), "{}", clashes[0]);
        assert!(clashes[1].contains("priority 4000"), "{}", clashes[1]);
    }
    #[test]
    fn each_ready_uplink_gets_its_table_and_rules_and_the_slow_path_its_uplinks() {
        let routing = RoutingConfig::default();
        let ready = Ready {
            ifindex: WAN2,
            addr: ip("100.64.2.2"),
            gateway: Some(ip("100.64.2.1")),
        };
        let w = wanted(
            &routing,
            &[None, Some(ready)],
            &SlowPath::both(Some(1)),
            &["br-lan"],
            &[(0x0100_0000, 1)],
        );
        assert_eq!(w.routes.len(), 1, "only the ready uplink has a table");
        let rules: Vec<String> = w.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "4001: from 100.64.2.2 fwmark 0/0x2f000000 lookup 4001",
                "4016: lookup 254 suppress_prefixlength 0",
                "4018: fwmark 0x20000/0xff0000 lookup 4001",
                "4018: fwmark 0x1000000/0xf000000 lookup 4001",
                "4019: iif br-lan lookup 4001",
                "4019: iif lo lookup 4001",
            ]
        );
        // Nothing ready: nothing wanted, not even the main table's rule.
        assert_eq!(
            wanted(
                &routing,
                &[None, None],
                &SlowPath::default(),
                &["br-lan"],
                &[]
            ),
            Wanted::default()
        );
        // The LAN's slow path by a tunnel, and no uplink for the router's
        // own: main decides for it (the tunnel's own packets among them).
        let w = wanted(
            &routing,
            &[None, Some(ready)],
            &SlowPath {
                lan: Some(1),
                own: None,
                transport: Transport::default(),
            },
            &["br-lan"],
            &[],
        );
        let slow: Vec<String> = w
            .rules
            .iter()
            .filter(|r| r.priority == 4019)
            .map(ToString::to_string)
            .collect();
        assert_eq!(slow, ["4019: iif br-lan lookup 4001"]);
    }

    #[test]
    fn a_tunnels_own_packets_go_by_an_uplink_before_any_rule_that_could_send_them_into_it() {
        let routing = RoutingConfig::default();
        let ready = |n: u8| {
            Some(Ready {
                ifindex: u32::from(n) + 2,
                addr: ip(&format!("100.64.{n}.2")),
                gateway: Some(ip(&format!("100.64.{n}.1"))),
            })
        };
        // Uplink 0 is a tunnel listening on 51820 and carries everything
        // else of the router's, and a policy's; uplink 1 its packets.
        let slow_path = SlowPath {
            lan: Some(0),
            own: Some(0),
            transport: Transport {
                ports: vec![51820],
                uplink: Some(1),
            },
        };
        let w = wanted(
            &routing,
            &[ready(1), ready(2)],
            &slow_path,
            &["br-lan"],
            &[(0x0100_0000, 0)],
        );
        let after: Vec<String> = w
            .rules
            .iter()
            .filter(|r| r.priority > 4016)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            after,
            [
                "4017: iif lo ipproto udp sport 51820 lookup 4001",
                "4018: fwmark 0x10000/0xff0000 lookup 4000",
                "4018: fwmark 0x20000/0xff0000 lookup 4001",
                "4018: fwmark 0x1000000/0xf000000 lookup 4000",
                "4019: iif br-lan lookup 4000",
                "4019: iif lo lookup 4000",
            ]
        );
        // No uplink but tunnels in service: the main table's default route.
        let none = SlowPath {
            transport: Transport {
                ports: vec![51820],
                uplink: None,
            },
            ..slow_path
        };
        let w = wanted(&routing, &[ready(1), None], &none, &[], &[]);
        assert!(
            w.rules.contains(&OwnedRule {
                priority: 4017,
                selector: Selector::Transport(51820),
                table: MAIN_TABLE,
            }),
            "{:?}",
            w.rules
        );
    }

    #[test]
    fn the_routers_own_traffic_enters_a_tunnel_only_when_every_tunnels_own_packets_are_known() {
        let line = |tier| Candidate {
            in_service: true,
            tier,
            weight: 1,
            ..Candidate::default()
        };
        let tunnel = |port| Candidate {
            tunnel: true,
            transport_port: port,
            ..line(0)
        };
        // A WireGuard tunnel first, a line its backup.
        let p = SlowPath::choose(&[line(1), tunnel(Some(51820))]);
        assert_eq!((p.lan, p.own), (Some(1), Some(1)));
        assert_eq!(
            p.transport,
            Transport {
                ports: vec![51820],
                uplink: Some(0),
            }
        );
        // Another tunnel whose own packets lbd cannot tell apart (no
        // WireGuard): nothing of the router's goes into a tunnel.
        let p = SlowPath::choose(&[line(1), tunnel(Some(51820)), tunnel(None)]);
        assert_eq!(
            (p.lan, p.own, p.transport.uplink),
            (Some(1), Some(0), Some(0))
        );
        assert_eq!(p.transport.ports, [51820]);
        // No line in service: the tunnel's packets take the main table.
        let down = Candidate {
            in_service: false,
            ..line(1)
        };
        let p = SlowPath::choose(&[down, tunnel(Some(51820))]);
        assert_eq!((p.lan, p.own, p.transport.uplink), (Some(1), Some(1), None));
        // Lines only: one choice for all, no tunnel's rule.
        let p = SlowPath::choose(&[line(1), line(0)]);
        assert_eq!((p.lan, p.own), (Some(1), Some(1)));
        assert!(p.transport.ports.is_empty());
    }

    #[test]
    fn a_tunnels_rule_as_the_kernel_holds_it_is_known_again() {
        let mut held = Rule {
            priority: 4017,
            looks_up: true,
            table: 4001,
            source: None,
            iif: Some("lo".into()),
            suppress: None,
            fwmark: None,
            ip_proto: Some(17),
            sport: Some((51820, 51820)),
            other: false,
            protocol: ROUTE_PROTOCOL,
            message: RuleMessage::default(),
        };
        assert_eq!(
            owned_rule::<Ipv4Addr>(&held).map(|r| r.selector),
            Some(Selector::Transport(51820))
        );
        assert_eq!(
            rule_text(&held),
            "4017: iif lo ipproto 17 sport 51820-51820 lookup 4001"
        );
        // A range, another protocol, or anything lbd never selects by is
        // not lbd's rule, to be removed.
        for change in [
            |r: &mut Rule| r.sport = Some((1, 2)),
            |r: &mut Rule| r.ip_proto = Some(6),
            |r: &mut Rule| r.other = true,
        ] {
            let mut r = held.clone();
            change(&mut r);
            assert_eq!(owned_rule::<Ipv4Addr>(&r), None, "{r:?}");
        }
        held.ip_proto = None;
        held.sport = None;
        assert_eq!(
            owned_rule::<Ipv4Addr>(&held).map(|r| r.selector),
            Some(Selector::Iif("lo".into()))
        );
    }

    /// wan1 (3) and wan2 (4) as `router6` has them: wan1's delegation
    /// holds the LAN's prefix, wan2's is its own.
    fn ready6() -> [Option<Ready6>; 2] {
        [
            Some(Ready6 {
                ifindex: WAN1,
                addr: ip6("2001:db8:1:ffff::2"),
                gateway: ip6("fe80::1"),
                delegated: Some((ip6("2001:db8:1:100::"), 56)),
            }),
            Some(Ready6 {
                ifindex: WAN2,
                addr: ip6("2001:db8:2:ffff::2"),
                gateway: ip6("fe80::2"),
                delegated: Some((ip6("2001:db8:2:200::"), 56)),
            }),
        ]
    }

    const LAN6: Option<Prefix6> = Some((Ipv6Addr::new(0x2001, 0xdb8, 1, 0x100, 0, 0, 0, 0), 64));

    #[test]
    fn each_uplink_with_ipv6_gets_its_table_and_rules_and_the_slow_path_the_best() {
        let routing = RoutingConfig::default();
        let w = wanted6(&routing, &ready6(), Some(1), &["br-lan"], LAN6);
        assert!(w.routes.is_empty() && w.rules.is_empty(), "IPv6 alone");
        assert_eq!(
            w.routes6.iter().copied().collect::<Vec<_>>(),
            [
                OwnedRoute {
                    table: 4000,
                    gateway: Some(ip6("fe80::1")),
                    ifindex: WAN1
                },
                OwnedRoute {
                    table: 4001,
                    gateway: Some(ip6("fe80::2")),
                    ifindex: WAN2
                },
            ]
        );
        let rules: Vec<String> = w.rules6.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "4000: from 2001:db8:1:ffff::2 fwmark 0/0x2f000000 lookup 4000",
                "4001: from 2001:db8:2:ffff::2 fwmark 0/0x2f000000 lookup 4001",
                "4016: lookup 254 suppress_prefixlength 0",
                // wan2's delegation, not wan1's: the LAN's prefix is the
                // slow path's to send, by the best uplink.
                "4018: from 2001:db8:2:200::/56 fwmark 0/0x2f000000 lookup 4001",
                "4018: fwmark 0x10000/0xff0000 lookup 4000",
                "4018: fwmark 0x20000/0xff0000 lookup 4001",
                "4019: iif br-lan lookup 4001",
                "4019: iif lo lookup 4001",
            ]
        );
        // Without a LAN prefix every delegation has its rule.
        let w = wanted6(&routing, &ready6(), None, &["br-lan"], None);
        assert!(w
            .rules6
            .iter()
            .any(|r| r.selector == Selector::From(ip6("2001:db8:1:100::"), 56) && r.table == 4000));
        // No uplink's IPv6 in service: no slow path rule, main decides.
        assert!(!w
            .rules6
            .iter()
            .any(|r| matches!(r.selector, Selector::Iif(_))));
        // A slow path through an uplink without its table is none.
        let [one, _] = ready6();
        let w = wanted6(&routing, &[one, None], Some(1), &["br-lan"], LAN6);
        assert_eq!(w.routes6.len(), 1);
        assert!(!w
            .rules6
            .iter()
            .any(|r| matches!(r.selector, Selector::Iif(_))));
        // Nothing ready: nothing wanted, not even the main table's rule.
        assert_eq!(
            wanted6(&routing, &[None, None], Some(0), &["br-lan"], LAN6),
            Wanted::default()
        );
    }

    /// `r` as the kernel would report it.
    fn held(r: &OwnedRule<Ipv6Addr>) -> Rule {
        let (source, iif, suppress, fwmark) = match &r.selector {
            Selector::From(a, len) => (Some(((*a).into(), *len)), None, None, Some((0, FROM_MASK))),
            Selector::Iif(n) => (None, Some(n.clone()), None, None),
            Selector::Transport(_) => (None, Some(LOOPBACK.into()), None, None),
            Selector::Mark { mark, mask } => (None, None, None, Some((*mark, *mask))),
            Selector::AllButDefault => (None, None, Some(0), None),
        };
        let port = match r.selector {
            Selector::Transport(port) => Some((port, port)),
            _ => None,
        };
        Rule {
            priority: r.priority,
            looks_up: true,
            table: r.table,
            source,
            iif,
            suppress,
            fwmark,
            ip_proto: port.map(|_| u8::from(IpProtocol::Udp)),
            sport: port,
            other: false,
            protocol: ROUTE_PROTOCOL,
            message: RuleMessage::default(),
        }
    }

    #[test]
    fn changes_find_lbds_ipv6_routes_and_rules_and_leave_others_alone() {
        let routing = RoutingConfig::default();
        let wanted = wanted6(&routing, &ready6(), Some(0), &["br-lan"], LAN6);
        let mut o = router();
        o.v6 = router6();
        // lbd's own from before: wan1's table via a next hop gone, and a
        // slow path through wan2.
        let mut stale = route6(0, "::", 0, RouteType::Unicast, Some("fe80::9"), Some(WAN1));
        (stale.table, stale.protocol) = (4000, ROUTE_PROTOCOL);
        o.v6.routes.push(stale);
        o.v6.rules.push(held(&OwnedRule {
            priority: 4019,
            selector: Selector::Iif("br-lan".into()),
            table: 4001,
        }));
        // Someone else's rule, and an IPv4 rule of lbd's: not IPv6's business.
        o.v6.rules.push(Rule {
            protocol: 0,
            ..held(&OwnedRule {
                priority: 100,
                selector: Selector::Iif("wg0".into()),
                table: 77,
            })
        });
        let c = changes(&o, &wanted);
        assert_eq!(c.add_routes6.len(), 2);
        assert_eq!(c.add_rules6.len(), wanted.rules6.len());
        assert_eq!(
            (c.del_routes.len(), c.del_rules.len()),
            (2, 1),
            "lbd's IPv4 route too, not wanted here"
        );
        assert!(c.add_routes.is_empty() && c.add_rules.is_empty());

        // Once all is there, nothing to do.
        o.v6.routes.retain(|r| r.protocol != ROUTE_PROTOCOL);
        for r in &wanted.routes6 {
            let mut route = route6(r.table, "::", 0, RouteType::Unicast, None, Some(r.ifindex));
            (route.gateway, route.protocol) = (r.gateway, ROUTE_PROTOCOL);
            o.v6.routes.push(route);
        }
        o.v6.rules.retain(|r| r.protocol != ROUTE_PROTOCOL);
        o.v6.rules.extend(wanted.rules6.iter().map(held));
        o.routes.retain(|r| r.protocol != ROUTE_PROTOCOL);
        assert!(changes(&o, &wanted).is_empty());

        // Wanting nothing removes all of lbd's, and only lbd's.
        let c = changes(&o, &Wanted::default());
        assert_eq!(
            (c.del_routes.len(), c.del_rules.len()),
            (wanted.routes6.len(), wanted.rules6.len())
        );
    }

    #[test]
    fn clashes_name_foreign_ipv6_routes_and_rules_in_lbds_range() {
        let routing = RoutingConfig::default();
        let mut o = router();
        o.routes.retain(|r| r.protocol != ROUTE_PROTOCOL);
        o.v6 = router6();
        assert!(clashes(&o, &routing, 2).is_empty());
        o.v6.routes.push(route6(
            4001,
            "::",
            0,
            RouteType::Unicast,
            Some("fe80::2"),
            Some(WAN2),
        ));
        o.v6.rules.push(Rule {
            protocol: 0,
            ..held(&OwnedRule {
                priority: 4016,
                selector: Selector::AllButDefault,
                table: 254,
            })
        });
        let clashes = clashes(&o, &routing, 2);
        assert_eq!(clashes.len(), 2, "{clashes:?}");
        assert!(
            clashes[0].contains("`ip -6 route show table 4001`"),
            "{}",
            clashes[0]
        );
        assert!(
            clashes[1].contains("priority 4016") && clashes[1].contains("`ip -6 rule show`"),
            "{}",
            clashes[1]
        );
    }
}
