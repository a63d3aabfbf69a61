//! lb's nftables tables, `ip lb` and `ip6 lb`: the kernel's side of lb,
//! for the traffic the fast path does not translate.
//!
//! Owns exactly those tables (`ip6 lb` only while IPv6 is balanced: the
//! LAN's prefix translated to an uplink's, the same guard and the same
//! inbound marks, in [`Wanted::script6`]), and in `ip lb`:
//! - **NAT** (`nat`, after the kernel's own source NAT hook priority): what
//!   the kernel forwards out of an uplink (ESP, GRE, fragments, ICMP other
//!   than echo, connections it owns) leaves masqueraded to that uplink's
//!   address, unless its source is already one of the uplink's own
//!   addresses or a prefix declared as routed through it.
//! - **The guard** (`guard`, after NAT): a packet about to leave an uplink
//!   with any other source is dropped and counted (BCP38 egress
//!   filtering). It is built from what each uplink owns, never from a guess
//!   of what the LAN is, so it holds however the LAN is configured.
//! - **Inbound connections** (`inbound`, before routing): a connection that
//!   arrives on an uplink (a port forward, the router's own SSH or VPN
//!   server) is counted and marked with its uplink in conntrack (connmark);
//!   the packets of its reply direction carry that mark, and lbd's rule
//!   `fwmark` (see `kernel`) routes them out of the uplink they came in
//!   on, whatever the main table says. A connection the data plane handed
//!   over (a UDP datagram too big for its uplink without DF, its
//!   translation written into conntrack: [`HANDED_MARK`]) is routed the
//!   same way out of its flow's uplink, and never classified by policy.
//!
//! Built whole from [`Wanted`] as an `nft -f` script (the syntax operators
//! know), replaced in one transaction when it changes, deleted when lbd is
//! torn down. Never touches another table: a firewall beside it keeps
//! working, and sees whatever the fast path hands to the kernel. Its
//! connmark bits are [`MARK_MASK`]; other bits of the mark are left alone.
//!
//! The masquerade uses the router's own ephemeral port range: the fast path
//! never takes a port there (see `lb_common::nat`), so a connection the
//! kernel translates can never share a mapping with one XDP translates.
//! For the same reason the router's own new connections that picked a
//! port of the fast path's range themselves (a DNS forwarder's random
//! upstream ports) leave from an ephemeral port instead.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use anyhow::{Context, Result};

use crate::{config::UplinkConfig, observe::kernel::Observed};

/// The table's name (family `ip`).
pub const TABLE: &str = "lb";
/// The guard's counter of dropped packets.
const LEAKED: &str = "leaked";
/// The bits of the packet and connection marks lbd uses: which uplink a
/// connection came in on (`mark(index)`), or which uplink the kernel must
/// send a connection the data plane handed over out of, for 1 to 255
/// uplinks.
pub const MARK_MASK: u32 = lb_common::marks::UPLINK_MASK;
/// The connmark bit of a connection the data plane handed to the kernel,
/// its translation written into conntrack (`lb_common::marks`).
pub const HANDED_MARK: u32 = lb_common::marks::HANDED;
/// The bits of the packet and connection marks that carry a new
/// connection's policy (its index) on the slow path: `policy_mark`.
pub const POLICY_MASK: u32 = 0x0f00_0000;
/// The mark of lbd's own probes (`SO_MARK`): never classified by the
/// rules, so a probe leaves by the uplink it is bound to.
pub const PROBE_MARK: u32 = 0x1000_0000;
/// The connmark of the connections to the router itself that came in on
/// an interface that is no uplink (a LAN, a VPN), and the fwmark of their
/// replies: lbd's rules for each uplink's own address pass them by, so
/// that the router answers a LAN client that reached it at an uplink's
/// address (its public name) into the LAN, not to that uplink's ISP.
pub const INSIDE_MARK: u32 = 0x2000_0000;
/// Before routing and after conntrack (`mangle`).
const INBOUND_PRIORITY: i32 = -150;
/// The kernel's source NAT hook priority (`srcnat`).
const NAT_PRIORITY: i32 = 100;
/// After source NAT, so that the guard sees the address a packet really
/// leaves with.
const GUARD_PRIORITY: i32 = 110;

/// The first rule of the NAT and guard chains: a packet routed into an
/// IPsec policy (`rt ipsec exists`) is seen there before its encryption,
/// with its LAN source, and must keep it (the policy's selector names the
/// LAN); the encrypted packet, from the uplink's address, passes both
/// chains again.
const IPSEC_AS_IT_IS: &str = "    rt ipsec exists accept\n";

/// The connmark and fwmark of the connections that came in on uplink
/// `index` (within [`MARK_MASK`]).
pub fn mark(index: usize) -> u32 {
    lb_common::marks::uplink(index as u32)
}

/// The connmark and fwmark of the slow path's connections of policy
/// `index` (within [`POLICY_MASK`]; the default policy has none).
pub fn policy_mark(index: u32) -> u32 {
    (index << POLICY_MASK.trailing_zeros()) & POLICY_MASK
}

/// One `[[rule]]` as the slow path has it: what it matches, in nft's
/// words, and the mark of its policy (`None`: a `kernel` rule, or the
/// default policy: no mark).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub matches: String,
    pub mark: Option<u32>,
}

/// The rules nftables can express, in order, for the slow path: what the
/// kernel forwards from the LAN and what the router sends itself. A rule
/// on prefix files, or on a bridge's port, cannot be (the kernel sees the
/// bridge; a million-prefix set is the fast path's job): it ends the list
/// there, since a packet it would take must not fall to a rule after it.
/// `policy_index` gives a policy's index by name.
pub fn policy_rules(
    rules: &[crate::config::RuleConfig],
    policy_index: impl Fn(&str) -> Option<u32>,
) -> Vec<PolicyRule> {
    use crate::config::RuleAction;
    let mut out = Vec::new();
    for rule in rules {
        if !rule.src.files.is_empty() || !rule.dst.files.is_empty() {
            break;
        }
        let mut m = Vec::new();
        let list = |items: Vec<String>| {
            if items.len() == 1 {
                items.join("")
            } else {
                format!("{{ {} }}", items.join(", "))
            }
        };
        if !rule.lan.is_empty() {
            m.push(format!(
                "iifname {}",
                list(rule.lan.iter().map(|l| format!("\"{l}\"")).collect())
            ));
        }
        // This table is IPv4's: a rule's IPv6 prefixes are not its
        // business, and a rule that names only IPv6 ones on a side never
        // matches an IPv4 packet.
        if !(rule.src.admits(false) && rule.dst.admits(false)) {
            continue;
        }
        let prefixes = |p: &[crate::config::Prefix]| {
            list(
                p.iter()
                    .filter(|(a, _)| a.is_ipv4())
                    .map(|(a, l)| format!("{a}/{l}"))
                    .collect(),
            )
        };
        if !rule.src.inline.is_empty() {
            m.push(format!("ip saddr {}", prefixes(&rule.src.inline)));
        }
        if !rule.dst.inline.is_empty() {
            m.push(format!("ip daddr {}", prefixes(&rule.dst.inline)));
        }
        let ports = |r: &[(u16, u16)]| {
            list(
                r.iter()
                    .map(|&(lo, hi)| {
                        if lo == hi {
                            lo.to_string()
                        } else {
                            format!("{lo}-{hi}")
                        }
                    })
                    .collect(),
            )
        };
        let has_ports = !rule.src_port.is_empty() || !rule.dst_port.is_empty();
        match rule.proto {
            Some(p) => m.push(format!("meta l4proto {p}")),
            None if has_ports => m.push("meta l4proto { 6, 17 }".into()),
            None => {}
        }
        if !rule.src_port.is_empty() {
            m.push(format!("th sport {}", ports(&rule.src_port)));
        }
        if !rule.dst_port.is_empty() {
            m.push(format!("th dport {}", ports(&rule.dst_port)));
        }
        if let Some(d) = rule.dscp {
            m.push(format!("ip dscp {d}"));
        }
        let mark = match &rule.action {
            RuleAction::Kernel => None,
            RuleAction::Policy(name) => policy_index(name).filter(|&i| i != 0).map(policy_mark),
        };
        out.push(PolicyRule {
            matches: m.join(" "),
            mark,
        });
    }
    out
}

/// The table for these uplinks (their configuration, and their interface
/// now, if it exists) as the kernel has them now (`observed`): each may
/// send from its own addresses and its routed prefixes. `ports`: the
/// router's own ephemeral ports, for the masquerade; `nat_ports`: the fast
/// path's (`[nat] port_range`).
pub fn wanted<'a>(
    uplinks: impl Iterator<Item = (&'a UplinkConfig, Option<u32>)>,
    observed: &Observed,
    ports: (u16, u16),
    nat_ports: (u16, u16),
) -> Wanted {
    Wanted {
        nat_ports,
        transport_ports: Vec::new(),
        ipsec: observed.ipsec.is_some(),
        policy_rules: Vec::new(),
        lan6: None,
        uplinks: uplinks
            .map(|(cfg, ifindex)| UplinkRules {
                interface: cfg.interface.clone(),
                addrs: ifindex
                    .map(|i| observed.addresses_of(i))
                    .unwrap_or_default(),
                routed: cfg.routed.iter().map(|r| (r.addr, r.len)).collect(),
                own6: Vec::new(),
                target6: None,
            })
            .collect(),
        ports,
    }
}

/// What the table is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Every configured uplink, by index.
    pub uplinks: Vec<UplinkRules>,
    /// The router's own ephemeral ports (`ip_local_port_range`).
    pub ports: (u16, u16),
    /// The fast path's NAT ports (`[nat] port_range`): the router's own
    /// new connections never leave from one (`(0, 0)`: none)...
    pub nat_ports: (u16, u16),
    /// ...but for the listen ports of the WireGuard uplinks, whose peers
    /// expect them.
    pub transport_ports: Vec<u16>,
    /// The kernel does IPsec (its XFRM netlink answered): what an IPsec
    /// policy takes passes lb's NAT and guard as it is.
    pub ipsec: bool,
    /// The operator's rules as the slow path has them (see
    /// [`policy_rules`]).
    pub policy_rules: Vec<PolicyRule>,
    /// The prefix the LAN carries while IPv6 is balanced: the `ip6 lb`
    /// table translates and guards IPv6 only then.
    pub lan6: Option<(Ipv6Addr, u8)>,
}

/// One uplink's part of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkRules {
    /// Its interface (it may not exist yet: rules match by name).
    pub interface: String,
    /// The addresses on its interface now: the only sources that may
    /// leave through it, with `routed`.
    pub addrs: Vec<Ipv4Addr>,
    /// Prefixes the operator declared as routed through it
    /// (`[[uplink]] routed`): they leave as they are.
    pub routed: Vec<(Ipv4Addr, u8)>,
    /// IPv6 sources that may leave through it: its WAN address, its
    /// delegation, and the prefix the LAN's is translated to there.
    pub own6: Vec<(Ipv6Addr, u8)>,
    /// The prefix the LAN's takes when the kernel sends LAN traffic out
    /// of it (`None`: the LAN carries its own prefix, or it has none).
    pub target6: Option<(Ipv6Addr, u8)>,
}

impl UplinkRules {
    /// `ip saddr != { own addresses, routed prefixes }`, or nothing when
    /// it owns none (then every source is foreign).
    fn foreign_source(&self) -> String {
        let own: Vec<String> = self
            .addrs
            .iter()
            .map(|a| a.to_string())
            .chain(self.routed.iter().map(|(a, len)| format!("{a}/{len}")))
            .collect();
        if own.is_empty() {
            String::new()
        } else {
            format!("ip saddr != {{ {} }} ", own.join(", "))
        }
    }
}

/// The name of uplink `index`'s counter of inbound connections.
fn inbound_counter(index: usize) -> String {
    format!("inbound_{index}")
}

impl Wanted {
    /// The slow path's policies: a new connection from the LAN (not from
    /// an uplink) or from the router itself is classified by the rules
    /// once, its policy kept in its connmark; every packet of its original
    /// direction then carries the policy's mark, which lbd's rule
    /// `fwmark` routes by that policy's uplink.
    fn policy_chains(&self, s: &mut String) {
        if self.policy_rules.is_empty() {
            return;
        }
        let keep = !POLICY_MASK;
        let _ = writeln!(s, "  chain classify {{");
        for r in &self.policy_rules {
            let _ = match r.mark {
                Some(m) => writeln!(
                    s,
                    "    {} ct mark set ct mark & {keep:#010x} | {m:#010x} return",
                    r.matches
                ),
                None => writeln!(s, "    {} return", r.matches),
            };
        }
        let _ = writeln!(s, "  }}");
        let mut marks: Vec<u32> = self.policy_rules.iter().filter_map(|r| r.mark).collect();
        marks.sort_unstable();
        marks.dedup();
        let uplinks: Vec<String> = self
            .uplinks
            .iter()
            .map(|u| format!("\"{}\"", u.interface))
            .collect();
        for (chain, hook, first) in [
            (
                "by_policy",
                "type filter hook prerouting",
                format!("iifname != {{ {} }} ", uplinks.join(", ")),
            ),
            (
                "by_policy_out",
                "type route hook output",
                format!("meta mark & {PROBE_MARK:#010x} == 0 "),
            ),
        ] {
            let _ = writeln!(s, "  chain {chain} {{");
            let _ = writeln!(s, "    {hook} priority {INBOUND_PRIORITY}; policy accept;");
            // A connection the data plane handed over has its uplink.
            let _ = writeln!(
                s,
                "    {first}ct state new ct mark & {HANDED_MARK:#010x} == 0 jump classify"
            );
            for m in &marks {
                let _ = writeln!(
                    s,
                    "    ct direction original ct mark & {POLICY_MASK:#010x} == {m:#010x} meta mark set meta mark & {keep:#010x} | {m:#010x}"
                );
            }
            let _ = writeln!(s, "  }}");
        }
    }

    /// The counters and the chain that mark each connection arriving on
    /// an uplink with that uplink, and its replies with the connection's
    /// mark, for lbd's rule `fwmark` (of the table's family) to route them
    /// out of it; and the chains that mark the connections reaching the
    /// router from inside ([`INSIDE_MARK`]) and the router's replies to
    /// them.
    fn inbound_chain(&self, s: &mut String, six: bool) {
        for i in 0..self.uplinks.len() {
            let _ = writeln!(s, "  counter {} {{ }}", inbound_counter(i));
        }
        let keep = !MARK_MASK;
        let _ = writeln!(s, "  chain inbound {{");
        let _ = writeln!(
            s,
            "    type filter hook prerouting priority {INBOUND_PRIORITY}; policy accept;"
        );
        for (i, u) in self.uplinks.iter().enumerate() {
            let (iface, mark) = (&u.interface, mark(i));
            let _ = writeln!(
                s,
                "    iifname \"{iface}\" ct state new ct mark set ct mark & {keep:#010x} | {mark:#010x} counter name \"{}\"",
                inbound_counter(i)
            );
            // Its replies (from a LAN server behind a port forward) are
            // routed by the mark; what comes in is routed as ever.
            let _ = writeln!(
                s,
                "    ct direction reply ct mark & {MARK_MASK:#010x} == {mark:#010x} meta mark set meta mark & {keep:#010x} | {mark:#010x}"
            );
            // A datagram the data plane handed over (too big for its
            // uplink, without DF: the kernel fragments it) leaves by the
            // flow's uplink, as its translation in conntrack says.
            if !six {
                let handed = HANDED_MARK | mark;
                let _ = writeln!(
                    s,
                    "    ct direction original ct mark & {:#010x} == {handed:#010x} meta mark set meta mark & {keep:#010x} | {mark:#010x}",
                    HANDED_MARK | MARK_MASK
                );
            }
        }
        // Connections to an uplink's own address (the router's public
        // name) from anywhere but an uplink.
        let (family, addrs): (&str, Vec<String>) = if six {
            let wan = self.uplinks.iter().flat_map(|u| &u.own6);
            let wan = wan
                .filter(|(_, len)| *len == 128)
                .map(|(a, _)| a.to_string());
            ("ip6", wan.collect())
        } else {
            let wan = self.uplinks.iter().flat_map(|u| &u.addrs);
            ("ip", wan.map(Ipv4Addr::to_string).collect())
        };
        if !addrs.is_empty() {
            let uplinks: Vec<String> = self
                .uplinks
                .iter()
                .map(|u| format!("\"{}\"", u.interface))
                .collect();
            let _ = writeln!(
                s,
                "    iifname != {{ {} }} {family} daddr {{ {} }} ct state new ct mark set ct mark | {INSIDE_MARK:#010x}",
                uplinks.join(", "),
                addrs.join(", ")
            );
        }
        let _ = writeln!(s, "  }}");
        // The router's answers are its own packets: marked on the way out,
        // before the routing that the mark changes.
        let _ = writeln!(s, "  chain inside_replies {{");
        let _ = writeln!(
            s,
            "    type route hook output priority {INBOUND_PRIORITY}; policy accept;"
        );
        let _ = writeln!(
            s,
            "    ct direction reply ct mark & {INSIDE_MARK:#010x} == {INSIDE_MARK:#010x} meta mark set meta mark | {INSIDE_MARK:#010x}"
        );
        let _ = writeln!(s, "  }}");
    }

    /// The whole table as an `nft -f` script: one transaction that
    /// replaces any earlier table (so no packet sees it half made).
    pub fn script(&self) -> String {
        let mut s = String::new();
        // Declared, then deleted, then built: the delete never fails.
        let _ = writeln!(s, "table ip {TABLE}\ndelete table ip {TABLE}");
        let _ = writeln!(s, "table ip {TABLE} {{");
        let _ = writeln!(s, "  counter {LEAKED} {{ }}");
        self.inbound_chain(&mut s, false);

        self.policy_chains(&mut s);

        let _ = writeln!(s, "  chain nat {{");
        let _ = writeln!(
            s,
            "    type nat hook postrouting priority {NAT_PRIORITY}; policy accept;"
        );
        if self.ipsec {
            s.push_str(IPSEC_AS_IT_IS);
        }
        let (low, high) = self.ports;
        let (nat_low, nat_high) = self.nat_ports;
        for u in &self.uplinks {
            let (iface, foreign) = (&u.interface, u.foreign_source());
            // A socket of the router's own that picked a port of the fast
            // path's range itself (a DNS forwarder's random upstream
            // ports) leaves from one of the router's ephemeral ports: a
            // client's flow may hold that port to the same server, and the
            // fast path would take the answers for the client's.
            if nat_high > 0 {
                let kept = if self.transport_ports.is_empty() {
                    String::new()
                } else {
                    let ports: Vec<String> =
                        self.transport_ports.iter().map(u16::to_string).collect();
                    format!("th sport != {{ {} }} ", ports.join(", "))
                };
                for a in &u.addrs {
                    let _ = writeln!(
                        s,
                        "    oifname \"{iface}\" ip saddr {a} meta l4proto {{ tcp, udp }} th sport {nat_low}-{nat_high} {kept}snat to {a}:{low}-{high}"
                    );
                }
            }
            // TCP and UDP ports into the router's own range; other
            // protocols (ESP, GRE, ICMP) have none to choose.
            let _ = writeln!(
                s,
                "    oifname \"{iface}\" {foreign}meta l4proto {{ tcp, udp }} masquerade to :{low}-{high}"
            );
            let _ = writeln!(s, "    oifname \"{iface}\" {foreign}masquerade");
        }
        let _ = writeln!(s, "  }}");

        let _ = writeln!(s, "  chain guard {{");
        let _ = writeln!(
            s,
            "    type filter hook postrouting priority {GUARD_PRIORITY}; policy accept;"
        );
        if self.ipsec {
            s.push_str(IPSEC_AS_IT_IS);
        }
        for u in &self.uplinks {
            let (iface, foreign) = (&u.interface, u.foreign_source());
            // A DHCP client asking for its first lease has no address yet
            // (most use packet sockets, which nftables never sees; this is
            // for those that do not).
            let _ = writeln!(
                s,
                "    oifname \"{iface}\" ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept"
            );
            let _ = writeln!(
                s,
                "    oifname \"{iface}\" {foreign}counter name \"{LEAKED}\" drop"
            );
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "}}");
        self.script6(&mut s);
        s
    }

    /// The `ip6 lb` table, in the same transaction: what the kernel
    /// forwards from the LAN out of an uplink whose prefix is not the
    /// LAN's gets that uplink's prefix (a stateful prefix translation, the
    /// slow path's NPTv6), and the guard drops any other foreign source.
    /// Link-local and unspecified sources (neighbour discovery, DHCPv6,
    /// duplicate address detection) are every uplink's. Inbound
    /// connections are marked as in `ip lb`: the kernel's IPv6 leaves by
    /// the slow path's uplink (lbd's IPv6 rules), and the replies of a
    /// connection that came in on another (to a LAN host, under the LAN's
    /// own prefix) must leave by that one, where their source is the
    /// uplink's. The translation is by the interface a packet leaves, so it
    /// applies whichever uplink the routing chose. Without a LAN prefix,
    /// IPv6 is the kernel's as without lb: no table.
    fn script6(&self, s: &mut String) {
        let _ = writeln!(s, "table ip6 {TABLE}\ndelete table ip6 {TABLE}");
        let Some((lan, len)) = self.lan6 else {
            return;
        };
        let _ = writeln!(s, "table ip6 {TABLE} {{");
        let _ = writeln!(s, "  counter {LEAKED} {{ }}");
        self.inbound_chain(s, true);
        let _ = writeln!(s, "  chain nat {{");
        let _ = writeln!(
            s,
            "    type nat hook postrouting priority {NAT_PRIORITY}; policy accept;"
        );
        if self.ipsec {
            s.push_str(IPSEC_AS_IT_IS);
        }
        for u in &self.uplinks {
            if let Some((to, to_len)) = u.target6 {
                let _ = writeln!(
                    s,
                    "    oifname \"{}\" ip6 saddr {lan}/{len} snat ip6 prefix to ip6 saddr map {{ {lan}/{len} : {to}/{to_len} }}",
                    u.interface
                );
            }
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "  chain guard {{");
        let _ = writeln!(
            s,
            "    type filter hook postrouting priority {GUARD_PRIORITY}; policy accept;"
        );
        if self.ipsec {
            s.push_str(IPSEC_AS_IT_IS);
        }
        for u in &self.uplinks {
            let own: Vec<String> = ["fe80::/10".to_string(), "::/128".to_string()]
                .into_iter()
                .chain(u.own6.iter().map(|(a, l)| format!("{a}/{l}")))
                .collect();
            let _ = writeln!(
                s,
                "    oifname \"{}\" ip6 saddr != {{ {} }} counter name \"{LEAKED}\" drop",
                u.interface,
                own.join(", ")
            );
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "}}");
    }
}

/// Run `nft -f -` with `script` (blocking).
fn nft_script(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    child
        .stdin
        .take()
        .context("nft's standard input")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    anyhow::ensure!(
        out.status.success(),
        "nft refused the script: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Put the table in place (blocking: runs `nft`).
pub fn apply(wanted: &Wanted) -> Result<()> {
    nft_script(&wanted.script()).context(
        "installing lbd's nftables table `ip lb` (is nftables installed, and the kernel's nf_nat and conntrack?)",
    )
}

/// What the table's counters say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// Packets the guard dropped.
    pub leaked: u64,
    /// Connections that came in, by uplink index.
    pub inbound: BTreeMap<usize, u64>,
}

impl Counted {
    /// Add `other`'s counts to these (a table about to be replaced).
    pub fn add(&mut self, other: &Counted) {
        self.leaked += other.leaked;
        for (i, n) in &other.inbound {
            *self.inbound.entry(*i).or_default() += n;
        }
    }

    /// Inbound connections of uplink `index`.
    pub fn inbound(&self, index: usize) -> u64 {
        self.inbound.get(&index).copied().unwrap_or(0)
    }

    /// The counters in `nft -j list counters table ip lb`'s answer.
    fn parse(json: &[u8]) -> Result<Counted> {
        let doc: serde_json::Value =
            serde_json::from_slice(json).context("parsing nft's answer")?;
        let mut counted = Counted::default();
        let items = doc["nftables"]
            .as_array()
            .context("no list in nft's answer")?;
        for counter in items.iter().filter_map(|i| i.get("counter")) {
            let packets = counter["packets"].as_u64().unwrap_or(0);
            match counter["name"].as_str() {
                Some(LEAKED) => counted.leaked = packets,
                Some(name) => {
                    if let Some(i) = name
                        .strip_prefix("inbound_")
                        .and_then(|i| i.parse::<usize>().ok())
                    {
                        counted.inbound.insert(i, packets);
                    }
                }
                None => {}
            }
        }
        Ok(counted)
    }
}

/// The tables' counters now (blocking: runs `nft`); the `ip6` table's
/// count with the `ip` table's (drops, and inbound connections by uplink).
pub fn counted() -> Result<Counted> {
    let list = |family: &str| -> Result<Counted> {
        let out = Command::new("nft")
            .args(["-j", "list", "counters", "table", family, TABLE])
            .output()
            .context("running nft")?;
        anyhow::ensure!(
            out.status.success(),
            "nft list counters table {family} {TABLE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Counted::parse(&out.stdout)
    };
    let mut counted = list("ip")?;
    // Absent while IPv6 is not balanced.
    if let Ok(six) = list("ip6") {
        counted.add(&six);
    }
    Ok(counted)
}

/// Remove the table (`lbd --teardown`).
pub fn remove() -> Result<()> {
    nft_script(&format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip6 {TABLE}\ndelete table ip6 {TABLE}\n"
    ))
    .context("removing lbd's nftables tables `ip lb` and `ip6 lb`")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Wanted {
        Wanted {
            uplinks: vec![
                UplinkRules {
                    interface: "wan1".into(),
                    addrs: vec![Ipv4Addr::new(100, 64, 1, 2)],
                    routed: vec![(Ipv4Addr::new(203, 0, 113, 8), 29)],
                    ..UplinkRules::default()
                },
                UplinkRules {
                    interface: "wan2".into(),
                    addrs: Vec::new(),
                    routed: Vec::new(),
                    ..UplinkRules::default()
                },
            ],
            ports: (32768, 60999),
            nat_ports: (20000, 29999),
            transport_ports: vec![25000],
            ipsec: true,
            policy_rules: Vec::new(),
            lan6: None,
        }
    }

    #[test]
    fn ipv6_is_translated_to_each_uplinks_prefix_and_guarded_only_while_balanced() {
        let mut w = wanted();
        let p = |s: &str, l: u8| (s.parse::<Ipv6Addr>().expect("address"), l);
        assert!(
            !w.script().contains("table ip6 lb {"),
            "no LAN prefix: IPv6 is the kernel's"
        );
        w.lan6 = Some(p("2001:db8:1:100::", 64));
        w.uplinks[0].own6 = vec![p("2001:db8:1:100::", 56)];
        w.uplinks[1].own6 = vec![p("2001:db8:2:ffff::2", 128), p("2001:db8:2:200::", 56)];
        w.uplinks[1].target6 = Some(p("2001:db8:2:200::", 64));
        let s = w.script();
        assert!(s.contains(
            "oifname \"wan2\" ip6 saddr 2001:db8:1:100::/64 snat ip6 prefix to ip6 saddr map { 2001:db8:1:100::/64 : 2001:db8:2:200::/64 }"
        ));
        assert!(!s.contains("oifname \"wan1\" ip6 saddr 2001:db8:1:100::/64 snat"));
        assert!(s.contains(
            "oifname \"wan2\" ip6 saddr != { fe80::/10, ::/128, 2001:db8:2:ffff::2/128, 2001:db8:2:200::/56 } counter name \"leaked\" drop"
        ));
        // Inbound connections are marked by uplink in `ip6 lb` too, for
        // lbd's IPv6 rules `fwmark`.
        let six = &s[s.find("table ip6 lb {").expect("an ip6 table")..];
        for line in [
            "iifname \"wan1\" ct state new ct mark set ct mark & 0xff00ffff | 0x00010000 counter name \"inbound_0\"",
            "ct direction reply ct mark & 0x00ff0000 == 0x00020000 meta mark set meta mark & 0xff00ffff | 0x00020000",
        ] {
            assert!(six.contains(line), "{line}\n{six}");
        }
    }

    #[test]
    fn the_rules_nftables_can_express_mark_the_slow_path_by_policy() {
        let config = crate::config::parse(
            r#"
[[lan]]
interface = "br-lan"
[[uplink]]
name = "isp1"
interface = "wan1"
[[uplink]]
name = "isp2"
interface = "wan2"
[[policy]]
name = "voip"
uplinks = ["isp1"]
[[rule]]
proto = "udp"
dst_port = [5060, "10000-20000"]
policy = "voip"
[[rule]]
dst = ["203.0.113.0/24", "192.0.2.1"]
dscp = 46
policy = "kernel"
[[rule]]
src_port = 123
lan = "br-lan"
policy = "default"
"#,
            "lbd.toml",
        )
        .expect("valid");
        let rules = policy_rules(&config.rules, |n| {
            crate::reconcile::policies::policy_index(&config, n)
        });
        assert_eq!(
            rules,
            vec![
                PolicyRule {
                    matches: "meta l4proto 17 th dport { 5060, 10000-20000 }".into(),
                    mark: Some(0x0100_0000)
                },
                PolicyRule {
                    matches: "ip daddr { 203.0.113.0/24, 192.0.2.1/32 } ip dscp 46".into(),
                    mark: None
                },
                PolicyRule {
                    matches: "iifname \"br-lan\" meta l4proto { 6, 17 } th sport 123".into(),
                    mark: None
                },
            ]
        );
        let script = Wanted {
            policy_rules: rules,
            ..wanted()
        }
        .script();
        for line in [
            "meta l4proto 17 th dport { 5060, 10000-20000 } ct mark set ct mark & 0xf0ffffff | 0x01000000 return",
            "iifname != { \"wan1\", \"wan2\" } ct state new ct mark & 0x40000000 == 0 jump classify",
            "type route hook output priority -150; policy accept;",
            "meta mark & 0x10000000 == 0 ct state new ct mark & 0x40000000 == 0 jump classify",
            "ct direction original ct mark & 0x0f000000 == 0x01000000 meta mark set meta mark & 0xf0ffffff | 0x01000000",
        ] {
            assert!(script.contains(line), "{line}\n{script}");
        }
    }

    #[test]
    fn each_uplink_masquerades_and_guards_all_but_its_own_sources() {
        let script = wanted().script();
        assert!(
            script.contains(
                "oifname \"wan1\" ip saddr != { 100.64.1.2, 203.0.113.8/29 } meta l4proto { tcp, udp } masquerade to :32768-60999"
            ),
            "{script}"
        );
        assert!(
            script.contains(
                "oifname \"wan1\" ip saddr != { 100.64.1.2, 203.0.113.8/29 } counter name \"leaked\" drop"
            ),
            "{script}"
        );
        // An uplink without an address owns no source: all are foreign.
        assert!(
            script.contains("oifname \"wan2\" counter name \"leaked\" drop"),
            "{script}"
        );
        // The router's own sockets leave from none of the fast path's
        // ports, from each of an uplink's addresses.
        assert!(
            script.contains(
                "oifname \"wan1\" ip saddr 100.64.1.2 meta l4proto { tcp, udp } th sport 20000-29999 th sport != { 25000 } snat to 100.64.1.2:32768-60999"
            ),
            "{script}"
        );
        assert_eq!(script.matches(" snat to ").count(), 1, "{script}");
        // What an IPsec policy takes keeps its source, past the NAT and
        // the guard.
        assert_eq!(script.matches(IPSEC_AS_IT_IS).count(), 2, "{script}");
        let without = Wanted {
            ipsec: false,
            ..wanted()
        };
        assert!(
            !without.script().contains("rt ipsec"),
            "a kernel without XFRM"
        );
        // Nothing of the LAN is needed.
        assert!(!script.contains("10.10."), "{script}");
    }

    #[test]
    fn connections_to_the_router_from_inside_are_answered_inside() {
        let script = wanted().script();
        assert!(
            script.contains(
                "iifname != { \"wan1\", \"wan2\" } ip daddr { 100.64.1.2 } ct state new ct mark set ct mark | 0x20000000"
            ),
            "{script}"
        );
        assert!(
            script.contains(
                "type route hook output priority -150; policy accept;\n    ct direction reply ct mark & 0x20000000 == 0x20000000 meta mark set meta mark | 0x20000000"
            ),
            "{script}"
        );
    }

    #[test]
    fn inbound_connections_are_counted_and_marked_by_uplink() {
        let script = wanted().script();
        assert_eq!(mark(0), 0x0001_0000);
        assert_eq!(mark(1), 0x0002_0000);
        assert!(
            script.contains(
                "iifname \"wan2\" ct state new ct mark set ct mark & 0xff00ffff | 0x00020000 counter name \"inbound_1\""
            ),
            "{script}"
        );
        assert!(
            script.contains(
                "ct direction reply ct mark & 0x00ff0000 == 0x00020000 meta mark set meta mark & 0xff00ffff | 0x00020000"
            ),
            "{script}"
        );
        // A datagram the data plane handed over leaves by its flow's
        // uplink; IPv6 has no such hand-over (no router fragments it).
        let handed = "ct direction original ct mark & 0x40ff0000 == 0x40020000 meta mark set meta mark & 0xff00ffff | 0x00020000";
        assert!(script.contains(handed), "{script}");
        assert_eq!(
            script
                .matches("ct direction original ct mark & 0x40ff0000")
                .count(),
            2
        );
    }

    #[test]
    fn counters_are_read_from_nfts_json() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "ip", "name": "leaked", "table": "lb", "handle": 1, "packets": 3, "bytes": 180}},
            {"counter": {"family": "ip", "name": "inbound_1", "table": "lb", "handle": 3, "packets": 7, "bytes": 420}}]}"#;
        let mut counted = Counted::parse(json).expect("parses");
        assert_eq!(counted.leaked, 3);
        assert_eq!((counted.inbound(0), counted.inbound(1)), (0, 7));
        let before = counted.clone();
        counted.add(&before);
        assert_eq!((counted.leaked, counted.inbound(1)), (6, 14));
    }
}
