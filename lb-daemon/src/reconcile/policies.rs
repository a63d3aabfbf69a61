//! Rules and policies as the data plane holds them: the compiled rule
//! table (`lb_common::policy::RuleTable`), the prefix sets in their trie,
//! and what each LAN port is to the rules.
//!
//! [`compile`] is pure: from the configuration to the rules, the sets they
//! need and the LAN names they use; so is [`trie`], the entries of the
//! one prefix trie all sets share, where each prefix's value has the bit
//! of every set holding it or a prefix covering it (so the data plane
//! learns every set an address is in from one lookup). [`Policies`]
//! converges the data plane to them without a gap: new sets go in before
//! the rules that use them, the rules flip in one write, and sets no rule
//! uses any more go last. A set whose prefixes did not change keeps its
//! bit, so a reload that leaves a million-prefix file alone costs nothing.
//! Each policy's bucket table is `reconcile::buckets`'s.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use anyhow::{anyhow, Result};
use lb_common::{
    maps::LanPort,
    policy::{
        Rule, RuleTable, ACTION_KERNEL, ANY, ANY_DSCP, ANY_PROTO, DEFAULT_POLICY, MAX_SETS, NO_SET,
        SET_DST, SET_SRC,
    },
};

use crate::{
    config::{Config, Prefix, RuleAction, RuleConfig},
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

/// The prefixes of one set, as the rules need it.
pub type SetContent = Arc<Vec<Prefix>>;

/// What the configuration's rules compile to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub rules: RuleTable,
    /// The prefix sets, by the bit the rules know them by.
    pub sets: BTreeMap<u32, SetContent>,
    /// The LAN names the rules use; name `i` is class bit `i`.
    pub lan_names: Vec<String>,
}

/// Compile the rules: one data-plane rule per pair of port ranges, each
/// side's addresses inline (one prefix) or as a set (several, or files).
/// `set_bit(content)` gives a set its bit (the caller keeps the bits of
/// unchanged sets); `None` when there is none left, and the rule then
/// matches nothing until there is.
pub fn compile(config: &Config, mut set_bit: impl FnMut(&SetContent) -> Option<u32>) -> Compiled {
    let mut rules = RuleTable::empty();
    let mut sets = BTreeMap::new();
    let mut lan_names: Vec<String> = Vec::new();
    let mut n = 0;
    for (origin, rule) in config.rules.iter().enumerate() {
        let mut lan_classes = 0u32;
        for name in &rule.lan {
            let bit = match lan_names.iter().position(|l| l == name) {
                Some(i) => i,
                None => {
                    lan_names.push(name.clone());
                    lan_names.len() - 1
                }
            };
            lan_classes |= 1 << (bit as u32 % 32);
        }
        let mut side = |m: &crate::config::AddressMatch| -> (u32, u32, u32) {
            match (m.inline.as_slice(), m.files.is_empty()) {
                ([], true) => (0, 0, NO_SET),
                ([(addr, len)], true) => (u32::from(*addr), mask(*len), NO_SET),
                (inline, _) => {
                    let mut all: Vec<Prefix> = inline.to_vec();
                    for f in &m.files {
                        all.extend(f.prefixes.iter().copied());
                    }
                    let content = Arc::new(all);
                    match set_bit(&content) {
                        Some(bit) => {
                            sets.insert(bit, content);
                            (0, 0, bit)
                        }
                        // No bit: an address no packet has.
                        None => (u32::MAX, u32::MAX, NO_SET),
                    }
                }
            }
        };
        let (src_addr, src_mask, src_set) = side(&rule.src);
        let (dst_addr, dst_mask, dst_set) = side(&rule.dst);
        if src_set != NO_SET {
            rules.set_sides |= SET_SRC;
        }
        if dst_set != NO_SET {
            rules.set_sides |= SET_DST;
        }
        let base = Rule {
            src_addr,
            src_mask,
            dst_addr,
            dst_mask,
            src_set,
            dst_set,
            lan_classes,
            action: action(config, rule),
            fallback: fallback(config, rule) as u8,
            origin: origin as u32 + 1,
            proto: rule.proto.unwrap_or(ANY_PROTO),
            dscp: rule.dscp.unwrap_or(ANY_DSCP),
            ..ANY
        };
        let any = [(0, u16::MAX)];
        let ranges = |r: &[(u16, u16)]| {
            if r.is_empty() {
                any.to_vec()
            } else {
                r.to_vec()
            }
        };
        for (sl, sh) in ranges(&rule.src_port) {
            for (dl, dh) in ranges(&rule.dst_port) {
                if let Some(slot) = rules.rules.get_mut(n) {
                    *slot = Rule {
                        src_port_min: sl,
                        src_port_max: sh,
                        dst_port_min: dl,
                        dst_port_max: dh,
                        ..base
                    };
                    n += 1;
                }
            }
        }
    }
    rules.count = n as u32;
    Compiled {
        rules,
        sets,
        lan_names,
    }
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

/// One entry of the prefix trie: (network, length) and its set bits.
pub type TrieEntry = ((u32, u8), u32);

/// The prefix trie's entries for `sets`, sorted: every prefix of every
/// set, once, with the bits of all sets that hold it or a prefix covering
/// it. A longest-prefix lookup then finds every set an address is in:
/// any stored prefix covering the address covers the longest one too.
pub fn trie<'a>(sets: impl IntoIterator<Item = (u32, &'a SetContent)>) -> Vec<TrieEntry> {
    let mut own: Vec<TrieEntry> = Vec::new();
    for (bit, content) in sets {
        own.extend(content.iter().map(|&(a, l)| ((u32::from(a), l), bit)));
    }
    own.sort_unstable_by_key(|e| e.0);
    let mut merged: Vec<TrieEntry> = Vec::with_capacity(own.len());
    for (prefix, bit) in own {
        match merged.last_mut() {
            Some((p, bits)) if *p == prefix => *bits |= bit,
            _ => merged.push((prefix, bit)),
        }
    }
    // Sorted by (network, length), a prefix comes after every prefix
    // covering it: a stack of the covering ones carries their bits down.
    let mut stack: Vec<TrieEntry> = Vec::new();
    for entry in &mut merged {
        let ((addr, len), _) = *entry;
        while let Some(&((a, l), _)) = stack.last() {
            if l <= len && addr & mask(l) == a {
                break;
            }
            stack.pop();
        }
        entry.1 |= stack.last().map_or(0, |e| e.1);
        stack.push(*entry);
    }
    merged
}

/// What to write to go from trie `old` to trie `new` (both sorted): new
/// or changed entries, and removed ones with bits 0.
pub fn trie_changes(old: &[TrieEntry], new: &[TrieEntry]) -> Vec<((std::net::Ipv4Addr, u8), u32)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let as_key = |(a, l): (u32, u8)| (std::net::Ipv4Addr::from(a), l);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.0 == n.0 => {
                if o.1 != n.1 {
                    out.push((as_key(n.0), n.1));
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 => {
                out.push((as_key(o.0), 0));
                i += 1;
            }
            (Some(o), None) => {
                out.push((as_key(o.0), 0));
                i += 1;
            }
            (_, Some(n)) => {
                out.push((as_key(n.0), n.1));
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// One LAN port as the rules see it: the names it answers to (its own,
/// and its bridge's) and the router's address on its LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanPortFacts {
    pub ifindex: u32,
    pub names: Vec<String>,
    pub addr: Option<Ipv4Addr>,
}

/// What each LAN port is to the data plane: its class bits for
/// `lan_names`, and the router's address there.
pub fn lan_ports(ports: &[LanPortFacts], lan_names: &[String]) -> BTreeMap<u32, LanPort> {
    ports
        .iter()
        .map(|p| {
            let classes = lan_names
                .iter()
                .enumerate()
                .filter(|(_, n)| p.names.contains(n))
                .fold(0u32, |bits, (i, _)| bits | 1 << (i as u32 % 32));
            let addr = p.addr.map_or([0; 4], |a| a.octets());
            (p.ifindex, LanPort { classes, addr })
        })
        .collect()
}

/// The rules, sets and LAN ports the data plane has, as lbd wrote them.
#[derive(Debug, Default)]
pub struct Policies {
    /// The compiled rules last written (`None`: none yet).
    written: Option<Compiled>,
    /// The prefix trie as written.
    trie: Vec<TrieEntry>,
    lan_ports: BTreeMap<u32, LanPort>,
}

impl Policies {
    /// The rules as written, for `explain` and `status`.
    pub fn compiled(&self) -> Option<&Compiled> {
        self.written.as_ref()
    }

    /// Make the data plane hold `config`'s rules: new sets first, then the
    /// rules in one write, then the sets no rule uses any more. Returns
    /// how many trie entries were written.
    pub fn converge(&mut self, config: &Config, dataplane: &mut Dataplane) -> Result<usize> {
        let old_sets = self
            .written
            .as_ref()
            .map(|c| c.sets.clone())
            .unwrap_or_default();
        let mut taken: u32 = old_sets.keys().fold(0, |a, b| a | b);
        let mut short = false;
        let compiled = compile(config, |content| {
            if let Some((&bit, _)) = old_sets.iter().find(|(_, c)| *c == content) {
                return Some(bit);
            }
            let free = (0..MAX_SETS).map(|i| 1u32 << i).find(|b| taken & b == 0);
            match free {
                Some(bit) => taken |= bit,
                None => short = true,
            }
            free
        });
        if short {
            return Err(anyhow!(
                "the rules use more prefix sets than the data plane holds ({MAX_SETS}, half of \
                 them kept free for reloads): merge some prefix lists into one file"
            ));
        }
        if self.written.as_ref() == Some(&compiled) {
            return Ok(0);
        }
        // Old and new sets side by side, then the rules, then the new ones
        // alone.
        let both = trie(
            old_sets
                .iter()
                .chain(compiled.sets.iter())
                .map(|(b, c)| (*b, c)),
        );
        let mut written = 0;
        let changes = trie_changes(&self.trie, &both);
        dataplane.write_prefixes(&changes)?;
        written += changes.len();
        self.trie = both;
        if self.written.as_ref().map(|c| &c.rules) != Some(&compiled.rules) {
            dataplane.set_rules(&compiled.rules)?;
            log::info!(
                "rules written: {} compiled from {} [[rule]]",
                compiled.rules.count,
                config.rules.len()
            );
        }
        let only_new = trie(compiled.sets.iter().map(|(b, c)| (*b, c)));
        let changes = trie_changes(&self.trie, &only_new);
        dataplane.write_prefixes(&changes)?;
        written += changes.len();
        self.trie = only_new;
        self.written = Some(compiled);
        Ok(written)
    }

    /// Tell the data plane what each LAN port is to the rules.
    pub fn converge_lan_ports(
        &mut self,
        ports: &[LanPortFacts],
        dataplane: &mut Dataplane,
    ) -> Result<()> {
        let names = self
            .written
            .as_ref()
            .map(|c| c.lan_names.clone())
            .unwrap_or_default();
        let wanted = lan_ports(ports, &names);
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

    fn set(prefixes: &[([u8; 4], u8)]) -> SetContent {
        Arc::new(
            prefixes
                .iter()
                .map(|&(a, l)| (Ipv4Addr::from(a), l))
                .collect(),
        )
    }

    #[test]
    fn the_trie_carries_covering_sets_down() {
        let a = set(&[([10, 0, 0, 0], 8), ([192, 0, 2, 0], 24)]);
        let b = set(&[([10, 1, 0, 0], 16), ([10, 0, 0, 0], 8)]);
        let t = trie([(1, &a), (2, &b)]);
        let get = |addr: [u8; 4], len: u8| {
            t.iter()
                .find(|e| e.0 == (u32::from_be_bytes(addr), len))
                .map(|e| e.1)
        };
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(get([10, 0, 0, 0], 8), Some(0b11));
        assert_eq!(
            get([10, 1, 0, 0], 16),
            Some(0b11),
            "10/8 of set 1 covers it"
        );
        assert_eq!(get([192, 0, 2, 0], 24), Some(0b01));
        let only_a = trie([(1, &a)]);
        let changes = trie_changes(&t, &only_a);
        assert_eq!(
            changes,
            vec![
                ((Ipv4Addr::new(10, 0, 0, 0), 8), 0b01),
                ((Ipv4Addr::new(10, 1, 0, 0), 16), 0)
            ]
        );
        assert!(trie_changes(&t, &t).is_empty());
    }
    use crate::config::parse;

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
        let c = compile(&config, |_| Some(7));
        assert_eq!(c.rules.count, 4);
        let r = &c.rules.rules;
        assert_eq!(
            (r[0].dst_port_min, r[0].dst_port_max, r[0].action),
            (5060, 5060, 1)
        );
        assert_eq!(
            (r[1].dst_port_min, r[1].dst_port_max, r[1].origin),
            (10000, 20000, 1)
        );
        assert_eq!(r[0].proto, 17);
        assert_eq!((r[2].src_addr, r[2].src_mask), (0x0a00_0900, 0xffff_ff00));
        assert_eq!((r[2].dst_set, r[2].action, r[2].lan_classes), (7, 2, 0b11));
        assert_eq!((r[3].action, r[3].lan_classes), (ACTION_KERNEL, 0b01));
        assert_eq!(c.sets[&7].len(), 2);
        assert_eq!(c.lan_names, ["guest", "br-lan"]);
        assert_eq!(c.rules.set_sides, SET_DST);

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
            &c.lan_names,
        );
        assert_eq!(ports[&4].classes, 0b10);
        assert_eq!(ports[&4].addr, [10, 0, 0, 1]);
        assert_eq!(ports[&5].classes, 0b01);
    }
}
