//! lbd's routing: per uplink with an address and a gateway, a table with
//! one default route through the gateway, a rule `from <uplink address>`
//! to it (mwan3's approach: probes and the router's own sockets bound to an
//! uplink leave through it however many default routes main has), and a
//! rule `fwmark <uplink's mark>` to it for the replies of connections that
//! came in on that uplink (marked by lbd's nftables table); then the slow
//! path's rules: the main table without default routes first, then what
//! the LAN sends through the kernel, and what the router itself sends, to
//! the table of the uplink the slow path uses.
//!
//! [`wanted`] is a pure function of the view; [`changes`] compares it with
//! what the kernel holds; [`converge`] makes the changes. Everything lbd
//! adds carries the route protocol [`ROUTE_PROTOCOL`]: that is how it finds
//! its own routes and rules again (after a crash, too) and how it knows
//! never to touch anyone else's.

use std::{collections::BTreeSet, net::Ipv4Addr};

use rtnetlink::{
    packet_route::{
        route::{RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
    Handle, RouteMessageBuilder,
};

use crate::{
    config::RoutingConfig,
    observe::kernel::{Observed, MAIN_TABLE, ROUTE_PROTOCOL},
    reconcile::nftables::{self, MARK_MASK, POLICY_MASK},
};

/// The interface a rule's `iif` names for what the router itself sends.
const LOOPBACK: &str = "lo";

/// A route lbd wants: in `table`, the default route via `gateway` on
/// `ifindex` (or into `ifindex` itself, an L3 uplink's, without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRoute {
    pub table: u32,
    pub gateway: Option<Ipv4Addr>,
    pub ifindex: u32,
}

/// A rule lbd wants: at `priority`, what `selector` picks looks up
/// `table`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRule {
    pub priority: u32,
    pub selector: Selector,
    pub table: u32,
}

/// Which packets an owned rule is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector {
    /// `from ADDR/32 fwmark 0/`[`POLICY_MASK`]: an uplink's own traffic,
    /// unless the operator's rules gave it a policy (then the policy's
    /// rule routes it).
    From(Ipv4Addr),
    /// `iif NAME`: what arrives on a LAN interface (`lo`: what the router
    /// itself sends).
    Iif(String),
    /// `fwmark MARK/MASK`: the replies of the connections that came in on
    /// an uplink ([`MARK_MASK`]), or the slow path's connections of a
    /// policy ([`POLICY_MASK`]).
    Mark { mark: u32, mask: u32 },
    /// Every packet, with routes of prefix length 0 (default routes)
    /// ignored (`suppress_prefixlength 0`): whatever the table routes more
    /// specifically than by default stays routed so.
    AllButDefault,
}

impl std::fmt::Display for OwnedRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (priority, table) = (self.priority, self.table);
        match &self.selector {
            Selector::From(a) => write!(
                f,
                "{priority}: from {a} fwmark 0/{POLICY_MASK:#x} lookup {table}"
            ),
            Selector::Iif(n) => write!(f, "{priority}: iif {n} lookup {table}"),
            Selector::Mark { mark, mask } => {
                write!(f, "{priority}: fwmark {mark:#x}/{mask:#x} lookup {table}")
            }
            Selector::AllButDefault => {
                write!(f, "{priority}: lookup {table} suppress_prefixlength 0")
            }
        }
    }
}

/// lbd's routing, as it should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub routes: BTreeSet<OwnedRoute>,
    pub rules: BTreeSet<OwnedRule>,
}

/// What to change to get from what is to what is wanted.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub add_routes: Vec<OwnedRoute>,
    pub del_routes: Vec<RouteMessage>,
    pub add_rules: Vec<OwnedRule>,
    pub del_rules: Vec<RuleMessage>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add_routes.is_empty()
            && self.del_routes.is_empty()
            && self.add_rules.is_empty()
            && self.del_rules.is_empty()
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

/// lbd's routing tables and rules as they should be: for each uplink
/// `Ready` (by index), its table, its rule for its own address and its
/// rule for the replies of the connections that came in on it (by their
/// mark); and the slow path's rules, which send what the LAN's clients
/// send through the kernel to the internet (ESP, GRE, fragments) and what
/// the router itself sends (its DNS forwarder, NTP, updates) by uplink
/// `slow_path`.
pub fn wanted(
    routing: &RoutingConfig,
    uplinks: &[Option<Ready>],
    slow_path: Option<usize>,
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
            selector: Selector::From(addr),
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
    if let Some(i) = slow_path {
        // The rest from the LAN, and what the router sends unbound, goes
        // by an uplink in service. (A socket bound to an uplink's address
        // has its own rule above.)
        for iif in lans.iter().copied().chain([LOOPBACK]) {
            wanted.rules.insert(OwnedRule {
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
/// its priorities. Each is a sentence for the operator.
pub fn clashes(observed: &Observed, routing: &RoutingConfig, uplinks: usize) -> Vec<String> {
    let tables = routing.first_table..routing.first_table + uplinks as u32;
    let priorities = (routing.first_priority..routing.first_priority + uplinks as u32)
        .chain(routing.later_priorities().all());
    let mut out = Vec::new();
    for table in tables {
        if let Some(r) = observed
            .routes
            .iter()
            .find(|r| r.table == table && r.protocol != ROUTE_PROTOCOL)
        {
            out.push(format!(
                "routing table {table} already holds routes lbd did not make (e.g. {}/{} \
                 proto {}; `ip route show table {table}`); set [routing] first_table to a \
                 free range",
                r.dst, r.dst_len, r.protocol
            ));
        }
    }
    for priority in priorities {
        if let Some(r) = observed
            .rules
            .iter()
            .find(|r| r.priority == priority && r.protocol != ROUTE_PROTOCOL)
        {
            out.push(format!(
                "a rule at priority {priority} is not lbd's (it looks up table {}; `ip rule \
                 show`); set [routing] first_priority to a free range",
                r.table
            ));
        }
    }
    out
}

/// What to add and remove so that lbd's routes and rules are `wanted`:
/// its own that are not wanted go, wanted ones that are missing come.
pub fn changes(observed: &Observed, wanted: &Wanted) -> Changes {
    let mut changes = Changes::default();
    let mut have_routes = BTreeSet::new();
    for r in observed
        .routes
        .iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
    {
        let owned = match (r.dst_len, r.gateway, r.oifs.as_slice()) {
            (0, gateway, &[ifindex]) => Some(OwnedRoute {
                table: r.table,
                gateway,
                ifindex,
            }),
            _ => None,
        };
        match owned {
            Some(o) if wanted.routes.contains(&o) => {
                have_routes.insert(o);
            }
            _ => changes.del_routes.push(r.message.clone()),
        }
    }
    let mut have_rules = BTreeSet::new();
    for r in observed
        .rules
        .iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
    {
        let selector = match (r.source, &r.iif, r.suppress, r.fwmark) {
            (Some((source, 32)), None, None, Some((0, POLICY_MASK))) => {
                Some(Selector::From(source))
            }
            (None, Some(iif), None, None) => Some(Selector::Iif(iif.clone())),
            (None, None, Some(0), None) => Some(Selector::AllButDefault),
            (None, None, None, Some((mark, mask))) if mask == MARK_MASK || mask == POLICY_MASK => {
                Some(Selector::Mark { mark, mask })
            }
            _ => None,
        };
        let owned = selector.filter(|_| r.looks_up).map(|selector| OwnedRule {
            priority: r.priority,
            selector,
            table: r.table,
        });
        match owned {
            Some(o) if wanted.rules.contains(&o) => {
                have_rules.insert(o);
            }
            _ => changes.del_rules.push(r.message.clone()),
        }
    }
    changes.add_routes = wanted.routes.difference(&have_routes).copied().collect();
    changes.add_rules = wanted.rules.difference(&have_rules).cloned().collect();
    changes
}

/// Make `changes`: removals first (an old rule for an address that moved
/// must not outlive it), then additions. Every step is tried; the errors
/// are returned together, for the next round to retry.
pub async fn converge(handle: &Handle, changes: Changes) -> Vec<String> {
    let mut errors = Vec::new();
    for msg in changes.del_rules {
        if let Err(e) = handle.rule().del(msg.clone()).execute().await {
            errors.push(format!("removing rule {msg:?}: {e}"));
        }
    }
    for msg in changes.del_routes {
        if let Err(e) = handle.route().del(msg.clone()).execute().await {
            errors.push(format!("removing route {msg:?}: {e}"));
        }
    }
    for r in changes.add_routes {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(r.table)
            .output_interface(r.ifindex)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        if let Some(gateway) = r.gateway {
            // The gateway is on the uplink's link by definition; the
            // kernel need not look for a route to it in this table.
            msg = msg.gateway(gateway).onlink();
        } else {
            // Into the device itself (an L3 uplink): on its link.
            msg = msg.scope(RouteScope::Link);
        }
        if let Err(e) = handle.route().add(msg.build()).replace().execute().await {
            let via = r.gateway.map_or_else(|| "-".to_string(), |g| g.to_string());
            errors.push(format!(
                "adding default via {via} (ifindex {}) to table {}: {e}",
                r.ifindex, r.table
            ));
        }
    }
    for r in changes.add_rules {
        let req = handle
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .table_id(r.table)
            .priority(r.priority);
        let mut req = match &r.selector {
            Selector::From(source) => {
                let mut req = req.source_prefix(*source, 32);
                req.message_mut()
                    .attributes
                    .extend([RuleAttribute::FwMark(0), RuleAttribute::FwMask(POLICY_MASK)]);
                req
            }
            Selector::Iif(name) => req.input_interface(name.clone()),
            Selector::Mark { mark, mask } => {
                let mut req = req;
                req.message_mut()
                    .attributes
                    .extend([RuleAttribute::FwMark(*mark), RuleAttribute::FwMask(*mask)]);
                req
            }
            Selector::AllButDefault => {
                let mut req = req;
                req.message_mut()
                    .attributes
                    .push(RuleAttribute::SuppressPrefixLen(0));
                req
            }
        };
        req.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )));
        if let Err(e) = req.execute().await {
            errors.push(format!("adding rule {r}: {e}"));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::kernel::{fixtures::*, Rule};

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
                selector: Selector::From(ip("100.64.1.2")),
                table: 4000,
            }]
            .into_iter()
            .collect(),
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
            source: Some((ip("100.64.1.2"), 32)),
            iif: None,
            suppress: None,
            fwmark: Some((0, POLICY_MASK)),
            protocol: ROUTE_PROTOCOL,
            message: RuleMessage::default(),
        });
        assert!(changes(&o2, &wanted).is_empty());
        // Wanting nothing removes all of lbd's, and only lbd's.
        let c = changes(&o2, &Wanted::default());
        assert_eq!((c.del_routes.len(), c.del_rules.len()), (1, 1));
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
            Some(1),
            &["br-lan"],
            &[(0x0100_0000, 1)],
        );
        assert_eq!(w.routes.len(), 1, "only the ready uplink has a table");
        let rules: Vec<String> = w.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "4001: from 100.64.2.2 fwmark 0/0xf000000 lookup 4001",
                "4016: lookup 254 suppress_prefixlength 0",
                "4017: fwmark 0x20000/0xff0000 lookup 4001",
                "4017: fwmark 0x1000000/0xf000000 lookup 4001",
                "4018: iif br-lan lookup 4001",
                "4018: iif lo lookup 4001",
            ]
        );
        // Nothing ready: nothing wanted, not even the main table's rule.
        assert_eq!(
            wanted(&routing, &[None, None], None, &["br-lan"], &[]),
            Wanted::default()
        );
    }
}
