//! Independent witnesses of where traffic went, with nftables.
//!
//! Owns one `netdev` table per watched interface, `lb_watch_IFNAME`, hooked
//! at ingress of that device: a dynamic set of the (L4 protocol, source
//! port) of every TCP and UDP packet that arrives, and a packet counter.
//! Placed on the ISP side of each uplink, it tells which uplink carried which
//! flow without asking the data plane under test. Never drops, rewrites or
//! delays a packet (the chain's policy is accept and it has no verdicts), and
//! never touches tables it did not create. [`watch_echo_ids`] does the same
//! for the identifiers of ICMP echo requests (`lb_echo_IFNAME`).

use std::collections::BTreeSet;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::lab::Lab;
use crate::netns;

/// A watch installed by [`watch_flows`]. Removed with its namespace.
#[derive(Debug, Clone)]
pub struct FlowWatch {
    ns: String,
    host: String,
    ifname: String,
    table: String,
}

/// The nftables table a watch of `kind` on `ifname` uses: one per
/// interface, so watches on different interfaces never meet.
fn table_name(kind: &str, ifname: &str) -> Result<String> {
    ensure!(
        !ifname.is_empty()
            && ifname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "cannot watch interface `{ifname}`: only letters, digits, `-`, `_` and `.` are supported"
    );
    Ok(format!("{kind}_{}", ifname.replace(['-', '.'], "_")))
}

/// Starts recording the flows that arrive on `host:ifname`.
pub fn watch_flows(lab: &Lab, host: &str, ifname: &str) -> Result<FlowWatch> {
    let table = table_name("lb_watch", ifname)?;
    install(
        lab,
        host,
        ifname,
        table,
        r#"meta l4proto { tcp, udp } counter name "arrived" add @flows { meta l4proto . th sport }"#,
    )
}

/// Starts counting the packets of any protocol that arrive on
/// `host:ifname` with a source address in `prefix`, IPv4 or IPv6 (e.g. a LAN's, which
/// must never reach an ISP). `label` tells several such watches on one
/// interface apart. [`FlowWatch::packets`] is the count.
pub fn watch_sources(
    lab: &Lab,
    host: &str,
    ifname: &str,
    label: &str,
    prefix: &str,
) -> Result<FlowWatch> {
    watch_prefix(
        lab,
        host,
        ifname,
        &format!("lb_src_{label}"),
        "saddr",
        prefix,
    )
}

/// As [`watch_sources`], by destination: the packets that arrive on
/// `host:ifname` for an address in `prefix` (e.g. a branch office's
/// network, which only an IPsec tunnel may carry).
pub fn watch_destinations(
    lab: &Lab,
    host: &str,
    ifname: &str,
    label: &str,
    prefix: &str,
) -> Result<FlowWatch> {
    watch_prefix(
        lab,
        host,
        ifname,
        &format!("lb_dst_{label}"),
        "daddr",
        prefix,
    )
}

/// A count of the packets arriving on `host:ifname` whose address `field`
/// (`saddr`, `daddr`) is in `prefix`, in the table `name`.
fn watch_prefix(
    lab: &Lab,
    host: &str,
    ifname: &str,
    name: &str,
    field: &str,
    prefix: &str,
) -> Result<FlowWatch> {
    let family = if prefix.contains(':') { "ip6" } else { "ip" };
    ensure!(
        prefix
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/')),
        "not an IP prefix: {prefix}"
    );
    let table = table_name(name, ifname)?;
    let rule = format!(r#"{family} {field} {prefix} counter name "arrived""#);
    install(lab, host, ifname, table, &rule)
}

/// One `netdev` table on `host:ifname` with a counter `arrived`, a set
/// `flows`, and an ingress chain holding `rule`.
fn install(lab: &Lab, host: &str, ifname: &str, table: String, rule: &str) -> Result<FlowWatch> {
    // Declaring then deleting the table first makes a second watch start
    // afresh. Priority -500: before anything else at ingress, so that it
    // sees packets another ingress hook would drop.
    let ruleset = format!(
        r#"table netdev {table} {{}}
           delete table netdev {table}
           table netdev {table} {{
             counter arrived {{}}
             set flows {{ type inet_proto . inet_service; flags dynamic; size 65536; }}
             chain ingress {{
               type filter hook ingress device "{ifname}" priority -500; policy accept;
               {rule}
             }}
           }}"#
    );
    let ns = lab.ns(host)?;
    netns::exec(ns, &["nft", &ruleset])
        .with_context(|| format!("installing the watch {table} on {host}:{ifname}"))?;
    Ok(FlowWatch {
        ns: ns.to_owned(),
        host: host.to_owned(),
        ifname: ifname.to_owned(),
        table,
    })
}

impl FlowWatch {
    /// Every distinct (IP protocol number, source port) seen so far.
    pub fn seen_flows(&self) -> Result<BTreeSet<(u8, u16)>> {
        let json = self.nft(&["-j", "list", "set", "netdev", &self.table, "flows"])?;
        let set = self.object(&json, "set")?;
        let Some(elems) = set.get("elem").and_then(Value::as_array) else {
            return Ok(BTreeSet::new()); // An empty set has no `elem`.
        };
        elems
            .iter()
            .map(parse_flow)
            .collect::<Result<_>>()
            .with_context(|| self.context("reading flows"))
    }

    /// TCP and UDP packets that arrived so far (ARP and the like are not
    /// counted: they are the kernel's business, not the data plane's).
    pub fn packets(&self) -> Result<u64> {
        let json = self.nft(&["-j", "list", "counter", "netdev", &self.table, "arrived"])?;
        let counter = self.object(&json, "counter")?;
        counter
            .get("packets")
            .and_then(Value::as_u64)
            .with_context(|| {
                self.context("reading the packet counter: no `packets` number in nft's answer")
            })
    }

    /// Forgets the flows and packets seen so far.
    pub fn clear(&self) -> Result<()> {
        self.nft(&["flush", "set", "netdev", &self.table, "flows"])?;
        self.nft(&["reset", "counter", "netdev", &self.table, "arrived"])?;
        Ok(())
    }

    fn nft(&self, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["nft"];
        cmd.extend(args);
        netns::exec(&self.ns, &cmd).with_context(|| self.context("querying"))
    }

    /// The first `{kind: {...}}` object of an `nft -j` answer.
    fn object(&self, json: &str, kind: &str) -> Result<Value> {
        let mut doc: Value =
            serde_json::from_str(json).with_context(|| self.context("parsing `nft -j` output"))?;
        let found = doc
            .get_mut("nftables")
            .and_then(Value::as_array_mut)
            .and_then(|items| {
                items
                    .iter_mut()
                    .find_map(|item| item.get_mut(kind).map(Value::take))
            });
        found.with_context(|| self.context(&format!("no `{kind}` in `nft -j` output: {json}")))
    }

    fn context(&self, what: &str) -> String {
        format!("flow watch on {}:{}: {what}", self.host, self.ifname)
    }
}

/// Counters, on each ISP's side of its uplink (every host named `isp*`, on
/// its link to the router), of packets with a source address in the LANs
/// (10.10.0.0/16): lb must never let one reach an ISP. Install it before
/// traffic starts; [`LanLeaks::check`] at the end.
pub struct LanLeaks(Vec<(String, FlowWatch)>);

impl LanLeaks {
    pub fn install(lab: &Lab) -> Result<LanLeaks> {
        let mut watches = Vec::new();
        for link in &lab.desc().links {
            let [a, b] = link.ends();
            for (isp, other) in [(a, b), (b, a)] {
                if isp.host.starts_with("isp") && other.host == "router" {
                    let w = watch_sources(lab, &isp.host, &isp.ifname, "lan", "10.10.0.0/16")?;
                    watches.push((isp.host.clone(), w));
                }
            }
        }
        ensure!(
            !watches.is_empty(),
            "the lab has no ISP linked to the router"
        );
        Ok(LanLeaks(watches))
    }

    /// Fails if any packet with a LAN source reached an ISP.
    pub fn check(&self) -> Result<()> {
        for (isp, watch) in &self.0 {
            let leaked = watch.packets()?;
            ensure!(
                leaked == 0,
                "{leaked} packets with a LAN source address reached {isp}"
            );
        }
        Ok(())
    }
}

/// Counters, on each ISP's side of its uplink, of IPv6 packets whose
/// source is none of what that ISP gave the router (`allowed(isp)`: its
/// address space, usually) nor link-local or unspecified: a LAN prefix
/// leaving by another ISP than its own, a ULA, an address lb forgot to
/// translate. Install it before traffic starts; [`Leaks6::check`] at the
/// end.
pub struct Leaks6(Vec<(String, FlowWatch)>);

impl Leaks6 {
    pub fn install(lab: &Lab, allowed: impl Fn(&str) -> Result<Vec<String>>) -> Result<Leaks6> {
        let mut watches = Vec::new();
        for link in &lab.desc().links {
            let [a, b] = link.ends();
            for (isp, other) in [(a, b), (b, a)] {
                if !(isp.host.starts_with("isp") && other.host == "router") {
                    continue;
                }
                let mut own = allowed(&isp.host)?;
                own.extend(["fe80::/10".to_string(), "::/128".to_string()]);
                for prefix in &own {
                    ensure!(
                        prefix
                            .chars()
                            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '/'),
                        "not an IPv6 prefix: {prefix}"
                    );
                }
                let table = table_name("lb_src6", &isp.ifname)?;
                let rule = format!(
                    r#"ip6 saddr != {{ {} }} counter name "arrived""#,
                    own.join(", ")
                );
                let w = install(lab, &isp.host, &isp.ifname, table, &rule)?;
                watches.push((isp.host.clone(), w));
            }
        }
        ensure!(
            !watches.is_empty(),
            "the lab has no ISP linked to the router"
        );
        Ok(Leaks6(watches))
    }

    /// Fails if any IPv6 packet with a foreign source reached an ISP.
    pub fn check(&self) -> Result<()> {
        for (isp, watch) in &self.0 {
            let leaked = watch.packets()?;
            ensure!(
                leaked == 0,
                "{leaked} IPv6 packets with a source {isp} did not give reached {isp}"
            );
        }
        Ok(())
    }
}

/// A watch installed by [`watch_echo_ids`]. Removed with its namespace.
#[derive(Debug, Clone)]
pub struct EchoWatch {
    ns: String,
    host: String,
    ifname: String,
    table: String,
}

/// Starts recording the identifiers of the ICMP echo requests that arrive
/// on `host:ifname`: behind NAT, which identifier each ping went out with.
/// Same rules as [`watch_flows`]: a table of its own
/// (`lb_echo_IFNAME`), ingress priority -500, never a verdict.
pub fn watch_echo_ids(lab: &Lab, host: &str, ifname: &str) -> Result<EchoWatch> {
    let table = table_name("lb_echo", ifname)?;
    let ruleset = format!(
        r#"table netdev {table} {{}}
           delete table netdev {table}
           table netdev {table} {{
             set ids {{ typeof icmp id; flags dynamic; size 65536; }}
             chain ingress {{
               type filter hook ingress device "{ifname}" priority -500; policy accept;
               icmp type echo-request add @ids {{ icmp id }}
             }}
           }}"#
    );
    let ns = lab.ns(host)?;
    netns::exec(ns, &["nft", &ruleset])
        .with_context(|| format!("installing the echo watch on {host}:{ifname}"))?;
    Ok(EchoWatch {
        ns: ns.to_owned(),
        host: host.to_owned(),
        ifname: ifname.to_owned(),
        table,
    })
}

impl EchoWatch {
    /// Every distinct echo identifier seen so far.
    pub fn seen_ids(&self) -> Result<BTreeSet<u16>> {
        let context = || format!("echo watch on {}:{}", self.host, self.ifname);
        let json = netns::exec(
            &self.ns,
            &["nft", "-j", "list", "set", "netdev", &self.table, "ids"],
        )
        .with_context(context)?;
        let doc: Value = serde_json::from_str(&json).with_context(context)?;
        let set = doc
            .get("nftables")
            .and_then(Value::as_array)
            .and_then(|items| items.iter().find_map(|item| item.get("set")))
            .with_context(|| format!("{}: no `set` in `nft -j` output: {json}", context()))?;
        let Some(elems) = set.get("elem").and_then(Value::as_array) else {
            return Ok(BTreeSet::new()); // An empty set has no `elem`.
        };
        elems
            .iter()
            .map(|elem| {
                let value = elem.get("elem").and_then(|e| e.get("val")).unwrap_or(elem);
                value
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .with_context(|| {
                        format!("{}: set element {elem} is not an identifier", context())
                    })
            })
            .collect()
    }
}

/// One set element: `{"concat": ["tcp", 40000]}`, possibly wrapped as
/// `{"elem": {"val": ...}}`; the protocol may be a name or a number.
fn parse_flow(elem: &Value) -> Result<(u8, u16)> {
    let elem = elem.get("elem").and_then(|e| e.get("val")).unwrap_or(elem);
    let parts = elem
        .get("concat")
        .and_then(Value::as_array)
        .map(Vec::as_slice);
    let Some([proto, port]) = parts else {
        bail!("set element {elem} is not a (protocol . port) pair");
    };
    let proto = match proto {
        Value::String(name) if name == "tcp" => 6,
        Value::String(name) if name == "udp" => 17,
        other => other
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .with_context(|| format!("protocol {other} in set element {elem}"))?,
    };
    let port = port
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .with_context(|| format!("port {port} in set element {elem}"))?;
    Ok((proto, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_elements() -> Result<()> {
        let plain: Value = serde_json::from_str(r#"{"concat": ["udp", 56922]}"#)?;
        let wrapped: Value =
            serde_json::from_str(r#"{"elem": {"val": {"concat": [6, 80]}, "expires": 1}}"#)?;
        assert_eq!(parse_flow(&plain)?, (17, 56922));
        assert_eq!(parse_flow(&wrapped)?, (6, 80));
        let bad: Value = serde_json::from_str(r#"{"concat": ["tcp", 70000]}"#)?;
        assert!(
            format!("{:#}", parse_flow(&bad).err().context("expected an error")?)
                .contains("port 70000")
        );
        Ok(())
    }
}
