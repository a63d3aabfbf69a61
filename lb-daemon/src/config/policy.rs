//! `[[policy]]` and `[[rule]]`: which traffic takes which uplinks.
//!
//! Owns their keys, defaults and checks, and the reading of prefix files
//! (one prefix a line, `#` comments), whose problems name the line inside
//! the file as well as the rule's. It never compiles rules for the data
//! plane: that is `reconcile::policies`, from these plain values.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    as_int, as_str, check_ifname, describe, parse_duration, prefix_bits, Checker, Field, Problem,
    MAX_TIER, MAX_WEIGHT,
};

/// Most `[[policy]]` sections (the default policy takes one more slot of
/// the data plane's).
pub const MAX_POLICIES: usize = lb_common::policy::MAX_POLICIES as usize - 1;
/// Most rules once compiled (a `[[rule]]` with several port ranges is
/// several); the data plane walks at most this many.
pub const MAX_COMPILED_RULES: usize = lb_common::policy::MAX_RULES as usize;
/// Most prefixes the rules can name on one side (source or destination),
/// inline and in files, a file counted once however many rules name it.
pub const MAX_SIDE_PREFIXES: usize = lb_common::MAX_SIDE_PREFIXES as usize;
/// Names a policy cannot have: they mean something else in a rule.
const RESERVED: [&str; 2] = ["default", "kernel"];

/// `[[policy]]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub name: String,
    pub uplinks: Vec<PolicyUplink>,
    pub sticky: Option<Sticky>,
    pub fallback: Fallback,
    pub line: usize,
}

/// One uplink of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyUplink {
    pub name: String,
    pub weight: u32,
    pub tier: u8,
}

/// `sticky = { by = ..., timeout = ... }`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sticky {
    pub by: StickyBy,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyBy {
    Src,
    SrcDstNet,
}

impl StickyBy {
    pub fn number(self) -> u32 {
        match self {
            Self::Src => lb_common::policy::sticky::SRC,
            Self::SrcDstNet => lb_common::policy::sticky::SRC_DST_NET,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Src => "src",
            Self::SrcDstNet => "src-dst-net",
        }
    }
}

/// What a policy does with a new flow none of its uplinks can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// The next rule that matches.
    Next,
    /// The default policy.
    #[default]
    Default,
    Drop,
    Unreachable,
}

impl Fallback {
    pub fn number(self) -> u32 {
        use lb_common::policy::fallback;
        match self {
            Self::Next => fallback::NEXT,
            Self::Default => fallback::DEFAULT,
            Self::Drop => fallback::DROP,
            Self::Unreachable => fallback::UNREACHABLE,
        }
    }
}

/// Where a rule sends what it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// A `[[policy]]` by name, or `"default"`.
    Policy(String),
    /// The kernel's routing.
    Kernel,
}

/// A prefix: network address and length (0..=32 for IPv4, 0..=128 for
/// IPv6).
pub type Prefix = (IpAddr, u8);

/// A prefix file, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixFile {
    /// As resolved (relative paths from the configuration's directory).
    pub path: PathBuf,
    pub prefixes: Arc<Vec<Prefix>>,
}

/// Addresses a rule matches on one side: inline prefixes and files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressMatch {
    pub inline: Vec<Prefix>,
    pub files: Vec<PrefixFile>,
}

impl AddressMatch {
    pub fn is_any(&self) -> bool {
        self.inline.is_empty() && self.files.is_empty()
    }

    /// Every prefix, inline and from files.
    pub fn prefixes(&self) -> impl Iterator<Item = &Prefix> {
        self.inline
            .iter()
            .chain(self.files.iter().flat_map(|f| f.prefixes.iter()))
    }

    /// Whether it names a prefix of that family (IPv6 when `ipv6`): a
    /// side that names prefixes, none of one family, matches no flow of
    /// that family.
    pub fn has_family(&self, ipv6: bool) -> bool {
        self.prefixes().any(|(a, _)| a.is_ipv6() == ipv6)
    }

    /// Whether it matches some address of that family.
    pub fn admits(&self, ipv6: bool) -> bool {
        self.is_any() || self.has_family(ipv6)
    }

    /// Whether every address of `other` is in `self` (as far as can be
    /// told without reading the files: the same files, and inline
    /// prefixes each inside one of ours).
    fn covers(&self, other: &Self) -> bool {
        if self.is_any() {
            return true;
        }
        if other.is_any() {
            return false;
        }
        let files = other
            .files
            .iter()
            .all(|f| self.files.iter().any(|g| g.path == f.path));
        let inline = other.inline.iter().all(|&(a, l)| {
            self.inline
                .iter()
                .any(|&(b, m)| m <= l && network(a, m) == b)
        });
        files && inline
    }
}

/// `[[rule]]`, validated. Empty lists and `None` mean "any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub lan: Vec<String>,
    pub src: AddressMatch,
    pub dst: AddressMatch,
    pub proto: Option<u8>,
    pub src_port: Vec<(u16, u16)>,
    pub dst_port: Vec<(u16, u16)>,
    pub dscp: Option<u8>,
    pub action: RuleAction,
    pub line: usize,
}

impl RuleConfig {
    /// How many data-plane rules it compiles to (one per pair of port
    /// ranges).
    pub fn compiled_len(&self) -> usize {
        self.src_port.len().max(1) * self.dst_port.len().max(1)
    }

    /// Whether every packet `other` matches, `self` matches too.
    fn covers(&self, other: &Self) -> bool {
        let lan = self.lan.is_empty()
            || (!other.lan.is_empty() && other.lan.iter().all(|l| self.lan.contains(l)));
        let ports = |mine: &[(u16, u16)], theirs: &[(u16, u16)]| {
            mine.is_empty()
                || (!theirs.is_empty()
                    && theirs
                        .iter()
                        .all(|&(lo, hi)| mine.iter().any(|&(a, b)| a <= lo && hi <= b)))
        };
        lan && self.src.covers(&other.src)
            && self.dst.covers(&other.dst)
            && (self.proto.is_none() || self.proto == other.proto)
            && ports(&self.src_port, &other.src_port)
            && ports(&self.dst_port, &other.dst_port)
            && (self.dscp.is_none() || self.dscp == other.dscp)
    }
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: Field,
    uplinks: Field,
    sticky: Field,
    fallback: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
pub(super) struct RawRule {
    lan: Field,
    src: Field,
    dst: Field,
    src_file: Field,
    dst_file: Field,
    proto: Field,
    src_port: Field,
    dst_port: Field,
    dscp: Field,
    policy: Field,
}

impl Checker<'_> {
    /// The policies, checked against the uplinks' names.
    pub(super) fn policies(
        &mut self,
        raw: &[Spanned<RawPolicy>],
        uplinks: &[String],
    ) -> Vec<PolicyConfig> {
        let mut out: Vec<PolicyConfig> = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let table = p.span();
            let r = p.get_ref();
            let section = match r.name.as_ref().map(|n| n.get_ref()) {
                Some(Value::String(n)) => format!("policy {n:?}"),
                _ => format!("policy #{}", i + 1),
            };
            let s = section.as_str();
            let line = self.line(&table);
            if i == MAX_POLICIES {
                self.report(
                    Some(&table),
                    s,
                    None,
                    format!("too many policies: at most {MAX_POLICIES} are supported"),
                );
            }
            let name = self.required(&r.name, &table, s, "name", |v| {
                let name = as_str(v)?;
                super::check_uplink_name(name)?;
                if RESERVED.contains(&name) {
                    return Err(format!(
                        "{name:?} is reserved: a rule's `policy = \"{name}\"` means the {}",
                        if name == "kernel" {
                            "kernel's routing"
                        } else {
                            "default policy"
                        }
                    ));
                }
                Ok(name.to_owned())
            });
            if let (Some(n), Some(field)) = (&name, &r.name) {
                if let Some(first) = out.iter().find(|o| &o.name == n) {
                    let message = format!(
                        "duplicate policy name {n:?} (first used on line {})",
                        first.line
                    );
                    self.report(Some(&field.span()), s, Some("name"), message);
                }
            }
            let members = self
                .required(&r.uplinks, &table, s, "uplinks", |v| {
                    policy_uplinks(v, uplinks)
                })
                .unwrap_or_default();
            let sticky = self.field(&r.sticky, s, "sticky", parse_sticky);
            let fallback = self
                .field(&r.fallback, s, "fallback", |v| {
                    match as_str(v)? {
                        "next" => Ok(Fallback::Next),
                        "default" => Ok(Fallback::Default),
                        "drop" => Ok(Fallback::Drop),
                        "unreachable" => Ok(Fallback::Unreachable),
                        other => Err(format!(
                            "expected \"next\", \"default\", \"drop\" or \"unreachable\", got {other:?}"
                        )),
                    }
                })
                .unwrap_or_default();
            out.push(PolicyConfig {
                name: name.unwrap_or_default(),
                uplinks: members,
                sticky,
                fallback,
                line,
            });
        }
        out
    }

    /// The rules, checked against the policies; prefix files are read
    /// (relative to the configuration file's directory). A rule that an
    /// earlier one shadows is a warning.
    pub(super) fn rules(
        &mut self,
        raw: &[Spanned<RawRule>],
        policies: &[PolicyConfig],
        warnings: &mut Vec<Problem>,
    ) -> Vec<RuleConfig> {
        let mut out: Vec<RuleConfig> = Vec::new();
        let mut compiled = 0;
        for (i, rule) in raw.iter().enumerate() {
            let table = rule.span();
            let r = rule.get_ref();
            let section = format!("rule #{}", i + 1);
            let s = section.as_str();
            let line = self.line(&table);
            let lan = self
                .field(&r.lan, s, "lan", |v| {
                    one_or_many(v, |v| {
                        let name = as_str(v)?;
                        check_ifname(name)?;
                        Ok(name.to_owned())
                    })
                })
                .unwrap_or_default();
            let src = self.addresses(&r.src, &r.src_file, s, "src");
            let dst = self.addresses(&r.dst, &r.dst_file, s, "dst");
            if !(src.admits(false) && dst.admits(false) || src.admits(true) && dst.admits(true)) {
                let span = r.dst.as_ref().or(r.dst_file.as_ref()).map(Spanned::span);
                let (one, other) = if src.has_family(true) {
                    ("IPv6", "IPv4")
                } else {
                    ("IPv4", "IPv6")
                };
                self.report(
                    span.as_ref(),
                    s,
                    Some("dst"),
                    format!(
                        "src names only {one} prefixes and dst only {other} ones: no packet has \
                         both, so the rule would never match; write one rule per family"
                    ),
                );
            }
            let proto = self.field(&r.proto, s, "proto", parse_proto);
            let src_port = self
                .field(&r.src_port, s, "src_port", parse_ports)
                .unwrap_or_default();
            let dst_port = self
                .field(&r.dst_port, s, "dst_port", parse_ports)
                .unwrap_or_default();
            if (!src_port.is_empty() || !dst_port.is_empty())
                && proto.is_some_and(|p| p != 6 && p != 17)
            {
                let span = r.proto.as_ref().map(Spanned::span);
                self.report(
                    span.as_ref(),
                    s,
                    Some("proto"),
                    "ports are only for tcp and udp; drop the ports or the protocol",
                );
            }
            let dscp = self.field(&r.dscp, s, "dscp", parse_dscp);
            let action = self
                .required(&r.policy, &table, s, "policy", |v| {
                    let name = as_str(v)?;
                    if name == "kernel" {
                        return Ok(RuleAction::Kernel);
                    }
                    if name == "default" || policies.iter().any(|p| p.name == name) {
                        return Ok(RuleAction::Policy(name.to_owned()));
                    }
                    let known: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
                    Err(format!(
                        "unknown policy {name:?}; the policies are {}, and \"default\" and \
                         \"kernel\"",
                        if known.is_empty() {
                            "none yet (add a [[policy]])".to_string()
                        } else {
                            format!("{known:?}")
                        }
                    ))
                })
                .unwrap_or(RuleAction::Kernel);
            let config = RuleConfig {
                lan,
                src,
                dst,
                proto,
                src_port,
                dst_port,
                dscp,
                action,
                line,
            };
            compiled += config.compiled_len();
            if compiled > MAX_COMPILED_RULES {
                self.report(
                    Some(&table),
                    s,
                    None,
                    format!(
                        "too many rules: the data plane walks at most {MAX_COMPILED_RULES} (a rule \
                         with several port ranges counts once per pair of source and \
                         destination ranges), and the rules up to here make {compiled}"
                    ),
                );
            }
            // A rule whose policy falls back to the next rule lets later
            // rules match what it matches.
            let shadow = out.iter().find(|earlier| {
                let passes_on = match &earlier.action {
                    RuleAction::Policy(p) => policies
                        .iter()
                        .any(|q| &q.name == p && q.fallback == Fallback::Next),
                    RuleAction::Kernel => false,
                };
                !passes_on && earlier.covers(&config)
            });
            if let Some(earlier) = shadow {
                warnings.push(Problem {
                    file: self.file.to_owned(),
                    line: Some(line),
                    column: None,
                    section: Some(section.clone()),
                    key: None,
                    message: format!(
                        "can never match: the rule on line {} matches everything it does, and \
                         comes first",
                        earlier.line
                    ),
                });
            }
            out.push(config);
        }
        for (side, of) in [
            (
                "src",
                (|r: &RuleConfig| &r.src) as fn(&RuleConfig) -> &AddressMatch,
            ),
            ("dst", |r: &RuleConfig| &r.dst),
        ] {
            let mut files = std::collections::BTreeMap::new();
            let mut inline = 0;
            for m in out.iter().map(of) {
                inline += m.inline.len();
                for f in &m.files {
                    files.insert(&f.path, f.prefixes.len());
                }
            }
            let total = inline + files.values().sum::<usize>();
            if total > MAX_SIDE_PREFIXES {
                self.report(
                    raw.first().map(|r| r.span()).as_ref(),
                    "rule",
                    Some(side),
                    format!(
                        "the rules name {total} {side} prefixes (inline and in files); at most \
                         {MAX_SIDE_PREFIXES} fit in the data plane: shorten the files, or \
                         merge prefixes into shorter ones"
                    ),
                );
            }
        }
        out
    }

    /// One side of a rule: `KEY` (a prefix or a list) and `KEY_file`.
    fn addresses(
        &mut self,
        inline: &Field,
        file: &Field,
        section: &str,
        key: &str,
    ) -> AddressMatch {
        let inline = self
            .field(inline, section, key, |v| one_or_many(v, parse_any_prefix))
            .unwrap_or_default();
        let file_key = format!("{key}_file");
        let base = Path::new(self.file)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let files = self
            .field(file, section, &file_key, |v| {
                one_or_many(v, |v| {
                    let path = base.join(as_str(v)?);
                    let prefixes = read_prefix_file(&path)?;
                    Ok(PrefixFile {
                        path,
                        prefixes: Arc::new(prefixes),
                    })
                })
            })
            .unwrap_or_default();
        AddressMatch { inline, files }
    }
}

/// A value or a list of them.
fn one_or_many<T>(v: &Value, one: impl Fn(&Value) -> Result<T, String>) -> Result<Vec<T>, String> {
    match v {
        Value::Array(list) if list.is_empty() => {
            Err("an empty list matches nothing; leave the key out to match any".into())
        }
        Value::Array(list) => list.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// `uplinks = ["isp1", { name = "lte", tier = 1, weight = 2 }]`
fn policy_uplinks(v: &Value, uplinks: &[String]) -> Result<Vec<PolicyUplink>, String> {
    let list = v
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or("must be a non-empty list of uplink names or { name, weight, tier } tables")?;
    let mut out: Vec<PolicyUplink> = Vec::new();
    for item in list {
        let member = match item {
            Value::String(name) => PolicyUplink {
                name: name.clone(),
                weight: 1,
                tier: 0,
            },
            Value::Table(t) => {
                if let Some(k) = t
                    .keys()
                    .find(|k| !["name", "weight", "tier"].contains(&k.as_str()))
                {
                    return Err(format!(
                        "unknown key {k:?} in an uplink of a policy; it has name, weight and tier"
                    ));
                }
                let name = t
                    .get("name")
                    .ok_or("an uplink of a policy needs a name")
                    .and_then(|n| as_str(n).map_err(|_| "name must be a string"))?;
                PolicyUplink {
                    name: name.to_owned(),
                    weight: t
                        .get("weight")
                        .map_or(Ok(1), |w| as_int(w, 1, MAX_WEIGHT))?,
                    tier: t.get("tier").map_or(Ok(0), |w| as_int(w, 0, MAX_TIER))?,
                }
            }
            other => {
                return Err(format!(
                    "expected an uplink name or a {{ name, weight, tier }} table, got {}",
                    describe(other)
                ))
            }
        };
        if !uplinks.contains(&member.name) {
            return Err(format!(
                "unknown uplink {:?}; the uplinks are {uplinks:?}",
                member.name
            ));
        }
        if out.iter().any(|o| o.name == member.name) {
            return Err(format!(
                "uplink {:?} is named twice in this policy",
                member.name
            ));
        }
        out.push(member);
    }
    Ok(out)
}

/// `sticky = { by = "src" | "src-dst-net", timeout = "10m" }`
fn parse_sticky(v: &Value) -> Result<Sticky, String> {
    let t = v
        .as_table()
        .ok_or("expected a table like { by = \"src\", timeout = \"10m\" }")?;
    if let Some(k) = t.keys().find(|k| !["by", "timeout"].contains(&k.as_str())) {
        return Err(format!("unknown key {k:?}; sticky has by and timeout"));
    }
    let by = match t.get("by").map(as_str).transpose()? {
        Some("src") | None => StickyBy::Src,
        Some("src-dst-net") => StickyBy::SrcDstNet,
        Some(other) => {
            return Err(format!(
                "by: expected \"src\" or \"src-dst-net\", got {other:?}"
            ))
        }
    };
    let timeout = match t.get("timeout") {
        Some(d) => parse_duration(as_str(d)?).map_err(|e| format!("timeout: {e}"))?,
        None => return Err("timeout is required, e.g. timeout = \"10m\"".into()),
    };
    Ok(Sticky { by, timeout })
}

/// A prefix `A.B.C.D/N` or `2001:db8::/N` (no host bits), or an address
/// (a /32 or a /128).
fn parse_any_prefix(v: &Value) -> Result<Prefix, String> {
    prefix_of(as_str(v)?)
}

fn prefix_of(text: &str) -> Result<Prefix, String> {
    let bad = || {
        format!(
            "expected a prefix like \"192.0.2.0/24\" or \"2001:db8::/32\", or an address, got \
             {text:?}"
        )
    };
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let most = if addr.is_ipv6() { 128 } else { 32 };
    let len = len.unwrap_or(most);
    if len > most {
        return Err(format!("{text:?}: the length is at most {most}"));
    }
    let network = network(addr, len);
    if network != addr {
        return Err(format!(
            "{text:?} has host bits set; the prefix is {network}/{len}"
        ));
    }
    Ok((addr, len))
}

/// Read a prefix file: one prefix (or address) a line; blank lines and
/// `#` comments are skipped. The error names the file and line.
pub fn read_prefix_file(path: &Path) -> Result<Vec<Prefix>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read prefix file {}: {e}", path.display()))?;
    let mut out = Vec::with_capacity(text.len() / 16);
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        out.push(prefix_of(content).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?);
    }
    if out.is_empty() {
        return Err(format!(
            "prefix file {} has no prefix: it would match nothing",
            path.display()
        ));
    }
    Ok(out)
}

/// `addr` with the bits past `len` cleared, in its family.
fn network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(prefix_bits(a, len).into()),
        IpAddr::V6(a) => IpAddr::V6(super::mask6(a, len)),
    }
}

/// `"tcp"`, `"udp"`, `"icmp"` (ICMP for IPv4, and ICMPv6 too),
/// `"icmpv6"` or a protocol number 1..=255.
fn parse_proto(v: &Value) -> Result<u8, String> {
    match v {
        Value::String(s) => match s.as_str() {
            "tcp" => Ok(6),
            "udp" => Ok(17),
            "icmp" => Ok(lb_common::policy::IPPROTO_ICMP),
            "icmpv6" => Ok(lb_common::policy::IPPROTO_ICMPV6),
            other => Err(format!(
                "expected \"tcp\", \"udp\", \"icmp\", \"icmpv6\" or a protocol number, got \
                 {other:?}"
            )),
        },
        other => as_int(other, 1, 255),
    }
}

/// A port, `"LO-HI"`, or a list of those; no range backwards, none
/// overlapping another.
fn parse_ports(v: &Value) -> Result<Vec<(u16, u16)>, String> {
    let ranges = one_or_many(v, |v| match v {
        Value::String(s) => {
            let bad = || format!("expected a port or a range like \"10000-20000\", got {s:?}");
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (s.trim(), s.trim()),
            };
            let lo: u16 = lo.parse().map_err(|_| bad())?;
            let hi: u16 = hi.parse().map_err(|_| bad())?;
            if lo > hi {
                return Err(format!(
                    "the range {s:?} is written backwards; write \"{hi}-{lo}\""
                ));
            }
            Ok((lo, hi))
        }
        other => as_int(other, 0, u16::MAX).map(|p| (p, p)),
    })?;
    for (i, a) in ranges.iter().enumerate() {
        if let Some(b) = ranges[..i].iter().find(|b| a.0 <= b.1 && b.0 <= a.1) {
            return Err(format!(
                "the ranges {}-{} and {}-{} overlap; merge them",
                b.0, b.1, a.0, a.1
            ));
        }
    }
    Ok(ranges)
}

/// DSCP 0..=63, or a name: `"EF"`, `"CS0"`..`"CS7"`, `"AF11"`..`"AF43"`.
fn parse_dscp(v: &Value) -> Result<u8, String> {
    match v {
        Value::String(s) => {
            let upper = s.to_ascii_uppercase();
            let named = match upper.as_str() {
                "EF" => Some(46),
                "VA" => Some(44),
                _ => None,
            };
            let cs = upper
                .strip_prefix("CS")
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|&n| n <= 7)
                .map(|n| n << 3);
            let af = upper.strip_prefix("AF").and_then(|n| {
                let b = n.as_bytes();
                let (class, drop) = (b.first()?.checked_sub(b'0')?, b.get(1)?.checked_sub(b'0')?);
                ((1..=4).contains(&class) && (1..=3).contains(&drop) && b.len() == 2)
                    .then_some(class << 3 | drop << 1)
            });
            named.or(cs).or(af).ok_or_else(|| {
                format!("expected a DSCP number 0-63 or a name like \"EF\", \"AF41\" or \"CS1\", got {s:?}")
            })
        }
        other => as_int(other, 0, 63),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, ConfigError};

    const BASE: &str = r#"
[[lan]]
interface = "br-lan"

[[uplink]]
name = "isp1"
interface = "wan1"

[[uplink]]
name = "isp2"
interface = "wan2"
"#;

    fn problems(extra: &str) -> Vec<String> {
        match parse(&format!("{BASE}{extra}"), "lbd.toml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn a_policy_and_rules_parse() {
        let c = parse(
            &format!(
                "{BASE}
[[policy]]
name = \"voip\"
uplinks = [\"isp1\", {{ name = \"isp2\", tier = 1 }}]
fallback = \"drop\"
sticky = {{ by = \"src-dst-net\", timeout = \"10m\" }}

[[rule]]
proto = \"udp\"
dst_port = [5060, \"10000-20000\"]
dscp = \"EF\"
policy = \"voip\"

[[rule]]
src = \"10.0.9.0/24\"
policy = \"kernel\"
"
            ),
            "lbd.toml",
        )
        .expect("valid");
        assert_eq!(c.policies[0].uplinks[1].tier, 1);
        assert_eq!(c.policies[0].fallback, Fallback::Drop);
        assert_eq!(
            c.policies[0].sticky.map(|s| (s.by, s.timeout)),
            Some((StickyBy::SrcDstNet, Duration::from_secs(600)))
        );
        assert_eq!(c.rules[0].dst_port, [(5060, 5060), (10000, 20000)]);
        assert_eq!(c.rules[0].dscp, Some(46));
        assert_eq!(c.rules[0].compiled_len(), 2);
        assert_eq!(c.rules[1].action, RuleAction::Kernel);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn bad_policies_and_rules_are_refused_with_line_and_key() {
        let p = problems(
            "
[[policy]]
name = \"guests\"
uplinks = [\"isp2\", \"isp2\"]

[[rule]]
dst_port = \"20000-10000\"
policy = \"nowhere\"
",
        );
        assert!(
            p.iter().any(
                |m| m.starts_with("lbd.toml:15: policy \"guests\" key uplinks:")
                    && m.contains("named twice")
            ),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("lbd.toml:18: rule #1 key dst_port:")
                    && m.contains("backwards")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("lbd.toml:19: rule #1 key policy:")
                    && m.contains("unknown policy \"nowhere\"")),
            "{p:?}"
        );
        let p = problems("[[rule]]\ndst_port = [\"80-90\", 85]\npolicy = \"default\"\n");
        assert!(p.iter().any(|m| m.contains("overlap")), "{p:?}");
        let p = problems("[[policy]]\nname = \"x\"\nuplinks = [\"isp9\"]\n");
        assert!(
            p.iter().any(|m| m.contains("unknown uplink \"isp9\"")),
            "{p:?}"
        );
    }

    #[test]
    fn rules_take_ipv6_prefixes_and_refuse_one_that_mixes_families_apart() {
        let c = parse(
            &format!(
                "{BASE}[[rule]]\nsrc = [\"10.0.0.0/8\", \"2001:db8:1::/48\"]\ndst = \
                 \"2001:db8:ff::1\"\nproto = \"icmpv6\"\npolicy = \"kernel\"\n"
            ),
            "lbd.toml",
        )
        .expect("valid");
        let rule = &c.rules[0];
        assert_eq!(
            rule.src.inline[1],
            ("2001:db8:1::".parse().expect("v6"), 48)
        );
        assert_eq!(
            rule.dst.inline[0],
            ("2001:db8:ff::1".parse().expect("v6"), 128)
        );
        assert_eq!(rule.proto, Some(58));
        assert!(rule.src.admits(true) && rule.src.admits(false));
        assert!(rule.dst.admits(true) && !rule.dst.admits(false));
        let p = problems(
            "[[rule]]\nsrc = \"2001:db8::/32\"\ndst = \"192.0.2.0/24\"\npolicy = \"default\"\n",
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("lbd.toml:14: rule #1 key dst:")
                    && m.contains("only IPv6")
                    && m.contains("never match")),
            "{p:?}"
        );
        let p = problems("[[rule]]\ndst = \"2001:db8::1/64\"\npolicy = \"default\"\n");
        assert!(
            p.iter()
                .any(|m| m.contains("host bits set; the prefix is 2001:db8::/64")),
            "{p:?}"
        );
        let p = problems("[[rule]]\ndst = \"2001:db8::/129\"\npolicy = \"default\"\n");
        assert!(p.iter().any(|m| m.contains("at most 128")), "{p:?}");
    }

    #[test]
    fn a_bad_prefix_file_names_its_line() {
        let dir = std::env::temp_dir().join(format!("lb-config-prefixes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("valid");
        let file = dir.join("partners.txt");
        std::fs::write(&file, "# partners\n192.0.2.0/24\n\nfoo\n").expect("valid");
        let config = dir.join("lbd.toml");
        let text = format!("{BASE}[[rule]]\ndst_file = \"partners.txt\"\npolicy = \"default\"\n");
        let err = parse(&text, &config.display().to_string())
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("rule #1 key dst_file:")
                && err.contains("partners.txt:4:")
                && err.contains("\"foo\""),
            "{err}"
        );
        std::fs::write(&file, "192.0.2.0/24\n198.51.100.7\n").expect("valid");
        let c = parse(&text, &config.display().to_string()).expect("valid");
        assert_eq!(
            *c.rules[0].dst.files[0].prefixes,
            vec![
                (std::net::Ipv4Addr::new(192, 0, 2, 0).into(), 24),
                (std::net::Ipv4Addr::new(198, 51, 100, 7).into(), 32)
            ]
        );
        let missing = format!("{BASE}[[rule]]\nsrc_file = \"absent.txt\"\npolicy = \"default\"\n");
        let err = parse(&missing, &config.display().to_string())
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("cannot read prefix file") && err.contains("absent.txt"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_shadowed_rule_is_a_warning() {
        let c = parse(
            &format!(
                "{BASE}
[[policy]]
name = \"one\"
uplinks = [\"isp1\"]

[[rule]]
proto = \"udp\"
policy = \"one\"

[[rule]]
proto = \"udp\"
dst_port = 5060
policy = \"default\"

[[rule]]
proto = \"tcp\"
policy = \"default\"
"
            ),
            "lbd.toml",
        )
        .expect("valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let said = c.warnings[0].to_string();
        assert!(
            said.starts_with("lbd.toml:21: rule #2: can never match: the rule on line 17"),
            "{said}"
        );
    }
}
