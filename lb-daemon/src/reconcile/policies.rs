//! Rules and policies as the data plane holds them: the compiled rules
//! (`lb_common::policy`'s bit vectors: a table, the port entries, the
//! prefix trie's entries), and what each LAN port is to the rules.
//!
//! [`compile`] is pure: from the configuration to, for every field a rule
//! can match, which rules each value of it matches. A prefix's entry
//! carries the rules of every prefix covering it, so the data plane learns
//! all the rules an address matches from one longest-prefix lookup. It is
//! checked against the rules' plain meaning by a property test.
//! [`Policies`] converges the data plane to it without a gap: the whole
//! new generation is written beside the live one, one write flips to it,
//! then the old generation's prefixes go. A reload that changes nothing
//! costs nothing. Each policy's bucket table is `reconcile::buckets`'s.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::Result;
use lb_common::{
    maps::LanPort,
    policy::{
        lookup, set_bit, Rule, RuleBits, RuleTable, TrieAddr, ACTION_KERNEL, DEFAULT_POLICY,
        DST_SIDE, IPPROTO_ICMP, IPPROTO_ICMPV6, NO_RULES, PORTS, SRC_SIDE,
    },
};

use crate::{
    config::{AddressMatch, Config, PolicyConfig, RuleAction, RuleConfig},
    dataplane::Dataplane,
};

/// The data-plane index of policy `name` (`"default"`: 0; the `[[policy]]`
/// sections from 1, in file order).
pub fn policy_index(config: &Config, name: &str) -> Option<u32> {
    if name == "default" {
        return Some(DEFAULT_POLICY);
    }
    config
        .policies
        .iter()
        .position(|p| p.name == name)
        .map(|i| i as u32 + 1)
}

/// The name of policy `index`.
pub fn policy_name(config: &Config, index: u32) -> String {
    match index {
        DEFAULT_POLICY => "default".into(),
        i => config
            .policies
            .get(i as usize - 1)
            .map_or_else(|| format!("#{i}"), |p| p.name.clone()),
    }
}

/// One entry of a prefix trie: (network in host order, length) and the
/// rules it matches; `A` is `u32` for the IPv4 trie, `u128` for IPv6's.
pub type TrieEntry<A = u32> = ((A, u8), RuleBits);

/// What the configuration's rules compile to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub table: RuleTable,
    /// Per side ([`SRC_SIDE`], [`DST_SIDE`]): the trie's entries, sorted,
    /// each with the rules of the prefixes covering it.
    pub prefixes: [Vec<TrieEntry>; 2],
    /// The same for the IPv6 prefixes, in their own trie.
    pub prefixes6: [Vec<TrieEntry<u128>>; 2],
    /// Per side: the rules each port matches ([`PORTS`] entries), or
    /// empty when no rule has a port range.
    pub ports: [Vec<RuleBits>; 2],
    /// The LAN names the rules use, and the rules that use each.
    pub lan_names: Vec<(String, RuleBits)>,
}

/// Compile the rules: one data-plane rule per pair of port ranges, its
/// bit set in every value of every field it matches.
pub fn compile(config: &Config) -> Compiled {
    let mut table = RuleTable::empty();
    let mut prefixes: [Vec<TrieEntry>; 2] = [Vec::new(), Vec::new()];
    let mut prefixes6: [Vec<TrieEntry<u128>>; 2] = [Vec::new(), Vec::new()];
    let mut ranges: [Vec<(usize, (u16, u16))>; 2] = [Vec::new(), Vec::new()];
    let mut lan_names: Vec<(String, RuleBits)> = Vec::new();
    let mut n = 0;
    for (origin, rule) in config.rules.iter().enumerate() {
        let any = [(0, u16::MAX)];
        let or_any = |r: &[(u16, u16)]| {
            if r.is_empty() {
                any.to_vec()
            } else {
                r.to_vec()
            }
        };
        for src_range in or_any(&rule.src_port) {
            for dst_range in or_any(&rule.dst_port) {
                if n >= table.rules.len() {
                    // The configuration refuses more; never a panic here.
                    continue;
                }
                let i = n;
                n += 1;
                table.rules[i] = Rule {
                    action: action(config, rule),
                    origin: origin as u32 + 1,
                    fallback: fallback(config, rule) as u8,
                    _pad: [0; 3],
                };
                if rule.action == RuleAction::Kernel
                    || fallback(config, rule) != lb_common::policy::fallback::NEXT
                {
                    set_bit(&mut table.decisive, i);
                }
                if let Some(by) = table.by_policy.get_mut(table.rules[i].action as usize) {
                    set_bit(by, i);
                }
                for (side, m, any) in [
                    (SRC_SIDE, &rule.src, &mut table.any_src),
                    (DST_SIDE, &rule.dst, &mut table.any_dst),
                ] {
                    if m.is_any() {
                        set_bit(any, i);
                    } else {
                        let side = side as usize;
                        add_prefixes(&mut prefixes[side], &mut prefixes6[side], m, i);
                    }
                }
                if rule.src_port.is_empty() && rule.dst_port.is_empty() {
                    set_bit(&mut table.any_ports, i);
                }
                ranges[SRC_SIDE as usize].push((i, src_range));
                ranges[DST_SIDE as usize].push((i, dst_range));
                if rule.lan.is_empty() {
                    set_bit(&mut table.any_lan, i);
                }
                for name in &rule.lan {
                    match lan_names.iter_mut().find(|(l, _)| l == name) {
                        Some((_, bits)) => set_bit(bits, i),
                        None => {
                            let mut bits = NO_RULES;
                            set_bit(&mut bits, i);
                            lan_names.push((name.clone(), bits));
                        }
                    }
                }
                for (p, by) in table.by_proto.iter_mut().enumerate() {
                    if rule.proto.is_none_or(|want| takes_proto(want, p as u8)) {
                        set_bit(by, i);
                    }
                }
                for (d, by) in table.by_dscp.iter_mut().enumerate() {
                    if rule.dscp.is_none_or(|want| usize::from(want) == d) {
                        set_bit(by, i);
                    }
                }
            }
        }
    }
    table.count = n as u32;
    let rules = &config.rules;
    for (flag, used) in [
        (lookup::SRC, rules.iter().any(|r| !r.src.is_any())),
        (lookup::DST, rules.iter().any(|r| !r.dst.is_any())),
        (
            lookup::PORTS,
            rules
                .iter()
                .any(|r| !r.src_port.is_empty() || !r.dst_port.is_empty()),
        ),
        (lookup::LAN, rules.iter().any(|r| !r.lan.is_empty())),
    ] {
        if used {
            table.lookups |= flag;
        }
    }
    let ports = if table.lookups & lookup::PORTS != 0 {
        ranges.map(|r| port_entries(&r))
    } else {
        [Vec::new(), Vec::new()]
    };
    Compiled {
        table,
        prefixes: prefixes.map(trie),
        prefixes6: prefixes6.map(trie),
        ports,
        lan_names,
    }
}

/// Whether a rule's protocol `want` takes a packet of protocol `proto`:
/// the same number, or ICMPv6 for `"icmp"` (a rule about ICMP means both
/// families' ICMP).
fn takes_proto(want: u8, proto: u8) -> bool {
    want == proto || (want == IPPROTO_ICMP && proto == IPPROTO_ICMPV6)
}

/// Rule `i`'s prefixes of one side, inline and from files, each into its
/// family's trie.
fn add_prefixes(
    out: &mut Vec<TrieEntry>,
    out6: &mut Vec<TrieEntry<u128>>,
    m: &AddressMatch,
    i: usize,
) {
    let mut bits = NO_RULES;
    set_bit(&mut bits, i);
    for &(a, l) in m.prefixes() {
        match a {
            IpAddr::V4(a) => out.push(((u32::from(a).masked(l), l), bits)),
            IpAddr::V6(a) => out6.push(((u128::from(a).masked(l), l), bits)),
        }
    }
}

/// The rules each port matches, from each rule's range on this side.
fn port_entries(ranges: &[(usize, (u16, u16))]) -> Vec<RuleBits> {
    let mut ports = vec![NO_RULES; PORTS as usize];
    for &(i, (lo, hi)) in ranges {
        for p in &mut ports[usize::from(lo)..=usize::from(hi)] {
            set_bit(p, i);
        }
    }
    ports
}

fn action(config: &Config, rule: &RuleConfig) -> u32 {
    match &rule.action {
        RuleAction::Kernel => ACTION_KERNEL,
        RuleAction::Policy(name) => policy_index(config, name).unwrap_or(DEFAULT_POLICY),
    }
}

/// The fallback of the rule's policy.
fn fallback(config: &Config, rule: &RuleConfig) -> u32 {
    match &rule.action {
        RuleAction::Policy(name) => config
            .policies
            .iter()
            .find(|p| &p.name == name)
            .map_or(lb_common::policy::fallback::DEFAULT, |p| {
                p.fallback.number()
            }),
        RuleAction::Kernel => lb_common::policy::fallback::DEFAULT,
    }
}

/// The prefix trie's entries for `own` (each prefix with the rules that
/// name it), sorted, each prefix once, with the rules of every prefix
/// covering it too. A longest-prefix lookup then finds every rule an
/// address matches: any stored prefix covering the address covers the
/// longest one too.
pub fn trie<A: TrieAddr>(mut own: Vec<TrieEntry<A>>) -> Vec<TrieEntry<A>> {
    own.sort_unstable_by_key(|e| e.0);
    let mut merged: Vec<TrieEntry<A>> = Vec::with_capacity(own.len());
    for (prefix, bits) in own {
        match merged.last_mut() {
            Some((p, have)) if *p == prefix => or(have, &bits),
            _ => merged.push((prefix, bits)),
        }
    }
    // Sorted by (network, length), a prefix comes after every prefix
    // covering it: a stack of the covering ones carries their rules down.
    let mut stack: Vec<TrieEntry<A>> = Vec::new();
    for entry in &mut merged {
        let ((addr, len), _) = *entry;
        while let Some(&((a, l), _)) = stack.last() {
            if l <= len && addr.masked(l) == a {
                break;
            }
            stack.pop();
        }
        if let Some((_, covering)) = stack.last() {
            or(&mut entry.1, covering);
        }
        stack.push(*entry);
    }
    merged
}

fn or(into: &mut RuleBits, from: &RuleBits) {
    for (a, b) in into.iter_mut().zip(from) {
        *a |= b;
    }
}

/// One LAN port as the rules see it: the names it answers to (its own,
/// and its bridge's) and the router's address on its LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanPortFacts {
    pub ifindex: u32,
    pub names: Vec<String>,
    pub addr: Option<Ipv4Addr>,
}

/// What each LAN port is to the data plane: the rules that name it in
/// each generation (`lan_names`, per generation), and the router's
/// address there.
pub fn lan_ports(
    ports: &[LanPortFacts],
    lan_names: &[Vec<(String, RuleBits)>; 2],
) -> BTreeMap<u32, LanPort> {
    ports
        .iter()
        .map(|p| {
            let rules = lan_names.clone().map(|names| {
                let mut bits = NO_RULES;
                for (_, named) in names.iter().filter(|(n, _)| p.names.contains(n)) {
                    or(&mut bits, named);
                }
                bits
            });
            let addr = p.addr.map_or([0; 4], |a| a.octets());
            (p.ifindex, LanPort { rules, addr })
        })
        .collect()
}

/// The rules and LAN ports the data plane has, as lbd wrote them.
#[derive(Debug, Default)]
pub struct Policies {
    /// The live generation's compiled rules (`None`: none written yet).
    written: Option<Compiled>,
    /// Each generation's LAN names: what each half of a LAN port's entry
    /// says.
    lan_names: [Vec<(String, RuleBits)>; 2],
    /// The LAN ports as last observed, and their entries as written.
    lan_facts: Vec<LanPortFacts>,
    lan_ports: BTreeMap<u32, LanPort>,
    /// Whether the idle generation is known to hold no prefix. Not at
    /// first (an adopted data plane's may), nor after a failed write.
    idle_clean: bool,
    /// The `[[policy]]` and `[[rule]]` sections `written` came from: a
    /// round whose sections are the same compiles nothing (a million
    /// prefixes take a while to compile, and rounds come every second).
    source: Option<(Vec<PolicyConfig>, Vec<RuleConfig>)>,
}

impl Policies {
    /// The rules as written, for `explain` and `status`.
    pub fn compiled(&self) -> Option<&Compiled> {
        self.written.as_ref()
    }

    /// Make the data plane hold `config`'s rules: the idle generation is
    /// written whole (prefixes, ports, LAN ports' halves, the table), one
    /// write makes it live, then the old generation's prefixes go.
    /// Returns how many prefix entries were written.
    pub fn converge(&mut self, config: &Config, dataplane: &mut Dataplane) -> Result<usize> {
        if self
            .source
            .as_ref()
            .is_some_and(|(policies, rules)| *policies == config.policies && *rules == config.rules)
        {
            return Ok(0);
        }
        let compiled = compile(config);
        if self.written.as_ref() == Some(&compiled) {
            self.source = Some((config.policies.clone(), config.rules.clone()));
            return Ok(0);
        }
        self.source = None;
        let live = dataplane.rule_generation();
        let idle = live ^ 1;
        // What this lbd did not write (an adopted data plane's prefixes,
        // or what a failed write left in the idle generation), in one
        // walk of each trie: empty on a fresh start.
        let (stray, stray6) = if self.written.is_none() || !self.idle_clean {
            (
                dataplane.prefixes_by_generation::<u32>()?,
                dataplane.prefixes_by_generation::<u128>()?,
            )
        } else {
            Default::default()
        };
        dataplane.remove_prefix_keys::<u32>(&stray[idle as usize])?;
        dataplane.remove_prefix_keys::<u128>(&stray6[idle as usize])?;
        self.idle_clean = false;
        let mut written = 0;
        for side in [SRC_SIDE, DST_SIDE] {
            let prefixes = &compiled.prefixes[side as usize];
            dataplane.write_prefixes(idle, side, prefixes)?;
            let prefixes6 = &compiled.prefixes6[side as usize];
            dataplane.write_prefixes(idle, side, prefixes6)?;
            written += prefixes.len() + prefixes6.len();
            let ports = &compiled.ports[side as usize];
            if !ports.is_empty() {
                dataplane.write_ports(idle, side, ports)?;
            }
        }
        self.lan_names[idle as usize] = compiled.lan_names.clone();
        self.write_lan_ports(dataplane)?;
        dataplane.write_rule_table(idle, &compiled.table)?;
        dataplane.flip_rules(idle)?;
        log::info!(
            "rules written: {} compiled from {} [[rule]], {written} prefixes",
            compiled.table.count,
            config.rules.len()
        );
        // The old generation: no packet reads it any more.
        match self.written.take() {
            Some(old) => {
                for side in [SRC_SIDE, DST_SIDE] {
                    let prefixes = old.prefixes[side as usize].iter().map(|e| e.0);
                    dataplane.remove_prefixes(live, side, prefixes)?;
                    let prefixes6 = old.prefixes6[side as usize].iter().map(|e| e.0);
                    dataplane.remove_prefixes(live, side, prefixes6)?;
                }
            }
            None => {
                dataplane.remove_prefix_keys::<u32>(&stray[live as usize])?;
                dataplane.remove_prefix_keys::<u128>(&stray6[live as usize])?;
            }
        }
        self.idle_clean = true;
        self.written = Some(compiled);
        self.source = Some((config.policies.clone(), config.rules.clone()));
        Ok(written)
    }

    /// Tell the data plane what each LAN port is to the rules.
    pub fn converge_lan_ports(
        &mut self,
        ports: &[LanPortFacts],
        dataplane: &mut Dataplane,
    ) -> Result<()> {
        self.lan_facts = ports.to_vec();
        self.write_lan_ports(dataplane)
    }

    /// Write the LAN port entries that differ from what they should be.
    fn write_lan_ports(&mut self, dataplane: &mut Dataplane) -> Result<()> {
        let wanted = lan_ports(&self.lan_facts, &self.lan_names);
        for (ifindex, port) in &wanted {
            if self.lan_ports.get(ifindex) != Some(port) {
                dataplane.set_lan_port(*ifindex, Some(*port))?;
            }
        }
        for ifindex in self.lan_ports.keys() {
            if !wanted.contains_key(ifindex) {
                dataplane.set_lan_port(*ifindex, None)?;
            }
        }
        self.lan_ports = wanted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use lb_common::policy::{decide, has_bit, Decision, Flow, Found, IPPROTO_UDP};
    use proptest::prelude::*;

    fn entry(addr: [u8; 4], len: u8, rules: &[usize]) -> TrieEntry {
        let mut bits = NO_RULES;
        for &i in rules {
            set_bit(&mut bits, i);
        }
        ((u32::from_be_bytes(addr), len), bits)
    }

    #[test]
    fn the_trie_carries_covering_rules_down() {
        let t = trie(vec![
            entry([10, 0, 0, 0], 8, &[1]),
            entry([192, 0, 2, 0], 24, &[1]),
            entry([10, 1, 0, 0], 16, &[2]),
            entry([10, 0, 0, 0], 8, &[2]),
        ]);
        assert_eq!(
            t,
            vec![
                entry([10, 0, 0, 0], 8, &[1, 2]),
                entry([10, 1, 0, 0], 16, &[1, 2]),
                entry([192, 0, 2, 0], 24, &[1]),
            ],
            "10/8 of rule 1 covers 10.1/16"
        );
    }

    const BASE: &str = r#"
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
[[policy]]
name = "bulk"
uplinks = ["isp2"]
"#;

    #[test]
    fn rules_compile_one_per_pair_of_port_ranges() {
        let config = parse(
            &format!(
                "{BASE}
[[rule]]
proto = \"udp\"
dst_port = [5060, \"10000-20000\"]
policy = \"voip\"
[[rule]]
lan = [\"guest\", \"br-lan\"]
src = \"10.0.9.0/24\"
dst = [\"192.0.2.0/24\", \"198.51.100.0/24\"]
policy = \"bulk\"
[[rule]]
lan = \"guest\"
policy = \"kernel\"
"
            ),
            "lbd.toml",
        )
        .expect("valid");
        let c = compile(&config);
        let t = &c.table;
        assert_eq!(t.count, 4);
        let actions: Vec<_> = t.rules[..4].iter().map(|r| (r.action, r.origin)).collect();
        assert_eq!(actions, [(1, 1), (1, 1), (2, 2), (ACTION_KERNEL, 3)]);
        assert_eq!(
            t.lookups,
            lookup::SRC | lookup::DST | lookup::PORTS | lookup::LAN
        );
        let dst_ports = &c.ports[DST_SIDE as usize];
        assert!(has_bit(&dst_ports[5060], 0) && !has_bit(&dst_ports[5060], 1));
        assert!(has_bit(&dst_ports[10000], 1) && !has_bit(&dst_ports[20001], 1));
        assert!(
            has_bit(&dst_ports[20001], 2),
            "rules without ports match every port"
        );
        assert!(has_bit(&t.by_proto[17], 0) && !has_bit(&t.by_proto[6], 0));
        assert!(has_bit(&t.any_ports, 2) && !has_bit(&t.any_ports, 0));
        assert_eq!(
            c.prefixes[SRC_SIDE as usize],
            vec![entry([10, 0, 9, 0], 24, &[2])]
        );
        assert_eq!(c.prefixes[DST_SIDE as usize].len(), 2);
        let names: Vec<_> = c.lan_names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["guest", "br-lan"]);

        let ports = lan_ports(
            &[
                LanPortFacts {
                    ifindex: 4,
                    names: vec!["lan1".into(), "br-lan".into()],
                    addr: Some(Ipv4Addr::new(10, 0, 0, 1)),
                },
                LanPortFacts {
                    ifindex: 5,
                    names: vec!["guest".into()],
                    addr: None,
                },
            ],
            &[c.lan_names.clone(), Vec::new()],
        );
        let rules_of = |ifindex: u32| {
            let bits = ports[&ifindex].rules[0];
            (0..4).filter(|&i| has_bit(&bits, i)).collect::<Vec<_>>()
        };
        assert_eq!(rules_of(4), [2]);
        assert_eq!(rules_of(5), [2, 3]);
        assert_eq!(ports[&4].addr, [10, 0, 0, 1]);
        assert_eq!(ports[&5].rules[1], NO_RULES, "generation 1 has no rules");
    }

    /// A packet, as the property test below sees it.
    #[derive(Debug, Clone)]
    struct Packet {
        lan: Vec<String>,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        src_port: u16,
        dst_port: u16,
        dscp: u8,
    }

    /// Whether `rule` matches `p`, read straight from the configuration.
    fn plainly_matches(rule: &RuleConfig, p: &Packet) -> bool {
        let within =
            |m: &AddressMatch, a: IpAddr| m.is_any() || m.prefixes().any(|&n| inside(a, n));
        let in_ranges = |r: &[(u16, u16)], port: u16| {
            r.is_empty() || r.iter().any(|&(lo, hi)| lo <= port && port <= hi)
        };
        let ported = !rule.src_port.is_empty() || !rule.dst_port.is_empty();
        (rule.lan.is_empty() || rule.lan.iter().any(|l| p.lan.contains(l)))
            && within(&rule.src, p.src)
            && within(&rule.dst, p.dst)
            && rule
                .proto
                .is_none_or(|want| want == p.proto || (want == 1 && p.proto == 58))
            && rule.dscp.is_none_or(|want| want == p.dscp)
            && (!ported
                || (lb_common::policy::has_ports(p.proto)
                    && in_ranges(&rule.src_port, p.src_port)
                    && in_ranges(&rule.dst_port, p.dst_port)))
    }

    /// What the compiled rules decide for `p`, with the lookups done as
    /// the data plane does them, every policy live.
    fn compiled_decision(c: &Compiled, p: &Packet) -> Decision {
        let longest = |side: u32, a: IpAddr| match a {
            IpAddr::V4(a) => c.prefixes[side as usize]
                .iter()
                .filter(|((n, l), _)| u32::from(a).masked(*l) == *n)
                .max_by_key(|((_, l), _)| *l)
                .map(|e| e.1),
            IpAddr::V6(a) => c.prefixes6[side as usize]
                .iter()
                .filter(|((n, l), _)| u128::from(a).masked(*l) == *n)
                .max_by_key(|((_, l), _)| *l)
                .map(|e| e.1),
        };
        let port = |side: u32, port: u16| c.ports[side as usize].get(usize::from(port)).copied();
        let facts = LanPortFacts {
            ifindex: 1,
            names: p.lan.clone(),
            addr: None,
        };
        let lan = lan_ports(&[facts], &[c.lan_names.clone(), Vec::new()])[&1].rules[0];
        let tuple = lb_common::hash::Tuple {
            src_addr: 0,
            dst_addr: 0,
            src_port: p.src_port,
            dst_port: p.dst_port,
            proto: p.proto,
        };
        let mut found = Found::default();
        found.look_up(
            &c.table,
            &tuple,
            |out, side| {
                let addr = if side == SRC_SIDE { p.src } else { p.dst };
                *out = longest(side, addr).unwrap_or(NO_RULES)
            },
            |out, side, p| *out = port(side, p).unwrap_or(NO_RULES),
            |out| *out = lan,
        );
        let flow = Flow {
            proto: p.proto,
            dscp: p.dscp,
            found,
        };
        decide(&c.table, &flow, u32::MAX)
    }

    /// Whether `a` is in prefix `n` (never across families).
    fn inside(a: IpAddr, (n, l): (IpAddr, u8)) -> bool {
        match (a, n) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u32::from(a).masked(l) == u32::from(n).masked(l),
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a).masked(l) == u128::from(n).masked(l),
            _ => false,
        }
    }

    const PREFIXES: [&str; 7] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "192.0.2.0/24",
        "192.0.2.128/25",
        "2001:db8::/32",
        "2001:db8:1::/48",
    ];
    /// Which of [`PREFIXES`] are IPv6.
    const PREFIXES6: usize = 0b110_0000;
    const ADDRESSES: [&str; 6] = [
        "10.1.2.3",
        "10.1.9.9",
        "10.9.9.9",
        "192.0.2.1",
        "192.0.2.200",
        "198.51.100.1",
    ];
    const ADDRESSES6: [&str; 3] = ["2001:db8:1::5", "2001:db8:2::5", "2001:db9::5"];
    const PORT_LISTS: [&str; 4] = ["[]", "[53]", "[5060, \"10000-20000\"]", "[\"80-89\"]"];
    const PORTS_SEEN: [u16; 6] = [53, 80, 85, 443, 5060, 15000];

    /// One `[[rule]]` section from choices.
    fn rule_text(choice: [usize; 8]) -> String {
        let mut out = String::from("[[rule]]\n");
        let list = |mask: usize| {
            let chosen: Vec<String> = PREFIXES
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, p)| format!("\"{p}\""))
                .collect();
            format!("[{}]", chosen.join(", "))
        };
        let (src, mut dst) = (
            (!choice[0].is_multiple_of(4)).then_some(1 + choice[0] % 127),
            (!choice[1].is_multiple_of(3)).then_some(1 + choice[1] % 127),
        );
        // One family on one side and only the other on the other: lbd
        // refuses that rule (it never matches), so it is not written.
        let only = |mask: usize, six: bool| {
            if six {
                mask & !PREFIXES6 == 0
            } else {
                mask & PREFIXES6 == 0
            }
        };
        if let (Some(s), Some(d)) = (src, dst) {
            if only(s, true) && only(d, false) || only(s, false) && only(d, true) {
                dst = None;
            }
        }
        if let Some(s) = src {
            out += &format!("src = {}\n", list(s));
        }
        if let Some(d) = dst {
            out += &format!("dst = {}\n", list(d));
        }
        let proto = ["", "tcp", "udp", "icmp"][choice[2] % 4];
        if !proto.is_empty() {
            out += &format!("proto = \"{proto}\"\n");
        }
        if proto != "icmp" {
            let (s, d) = (PORT_LISTS[choice[3] % 4], PORT_LISTS[choice[4] % 4]);
            if choice[3] % 3 == 1 && s != "[]" {
                out += &format!("src_port = {s}\n");
            }
            if d != "[]" {
                out += &format!("dst_port = {d}\n");
            }
        }
        match choice[5] % 4 {
            1 => out += "dscp = 46\n",
            2 => out += "dscp = 0\n",
            _ => {}
        }
        match choice[6] % 4 {
            1 => out += "lan = \"guest\"\n",
            2 => out += "lan = [\"br-lan\", \"guest\"]\n",
            _ => {}
        }
        let policy = ["voip", "bulk", "kernel", "default"][choice[7] % 4];
        out + &format!("policy = \"{policy}\"\n")
    }

    proptest! {
        /// The compiled bit vectors, looked up as the data plane does,
        /// pick the rule the configuration plainly says comes first.
        #[test]
        fn compiled_rules_decide_as_the_rules_read(
            rules in proptest::collection::vec(any::<[usize; 8]>(), 0..12),
            packets in proptest::collection::vec(any::<[usize; 8]>(), 20),
        ) {
            let text = BASE.to_owned() + &rules.iter().map(|c| rule_text(*c)).collect::<String>();
            let config = parse(&text, "lbd.toml")
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let compiled = compile(&config);
            for c in packets {
                let six = c[7] % 3 == 0;
                let addr = |i: usize| -> IpAddr {
                    let text = if six { ADDRESSES6[i % 3] } else { ADDRESSES[i % 6] };
                    text.parse().expect("an address")
                };
                let p = Packet {
                    lan: if c[0] % 2 == 0 { vec!["lan1".into(), "br-lan".into()] } else { vec!["guest".into()] },
                    src: addr(c[1]),
                    dst: addr(c[2]),
                    proto: [6, IPPROTO_UDP, if six { 58 } else { 1 }][c[3] % 3],
                    src_port: PORTS_SEEN[c[4] % 6],
                    dst_port: PORTS_SEEN[c[5] % 6],
                    dscp: [0, 46, 10][c[6] % 3],
                };
                let first = config.rules.iter().position(|r| plainly_matches(r, &p));
                let want = first.map(|i| (i as u32 + 1, action(&config, &config.rules[i])));
                let got = match compiled_decision(&compiled, &p) {
                    Decision::Policy { policy, rule: Some(r) } => {
                        Some((compiled.table.rules[r as usize].origin, policy))
                    }
                    Decision::Kernel { rule } => Some((compiled.table.rules[rule as usize].origin, ACTION_KERNEL)),
                    Decision::Policy { rule: None, .. } => None,
                    other => return Err(TestCaseError::fail(format!("{other:?} with every policy live"))),
                };
                prop_assert_eq!(got, want, "{:?}\n{}", p, text);
            }
        }
    }
}
