//! lb's nftables table, `ip lb`: the kernel's side of "nothing leaks".
//!
//! What the fast path hands to the kernel and the kernel then forwards out
//! of an uplink (ESP, GRE, fragments, ICMP other than echo: anything XDP
//! does not translate) is masqueraded there to that uplink's address; and a
//! guard drops, and counts, any packet that would still leave an uplink
//! with a LAN source address, whatever path it took.
//!
//! Owns exactly that table: built whole from the LAN prefixes and the
//! uplinks' interfaces, replaced in one nftables transaction when they
//! change, deleted when lbd stops. Goes through libnftables' JSON interface
//! with the `nftables` crate (its typed schema, and `nft -j -f -`). Never
//! touches another table: a firewall beside it keeps working, and sees
//! whatever the fast path hands to the kernel.
//!
//! The masquerade uses the router's own ephemeral port range: the fast path
//! never takes a port there (see `lb_common::nat`), so a connection the
//! kernel translates can never share a mapping with one XDP translates.

use std::{borrow::Cow, net::Ipv4Addr};

use anyhow::{Context, Result};
use nftables::{
    batch::Batch,
    expr::{
        Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range, SetItem,
    },
    helper,
    schema::{self, Chain, NfListObject, Rule, Table},
    stmt::{self, Match, Operator, Statement, NAT},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

/// The table's name (family `ip`).
pub const TABLE: &str = "lb";
/// The guard's counter of dropped packets.
const LEAKED: &str = "leaked";
/// After source NAT (`srcnat`, 100), so that the guard sees the address a
/// packet really leaves with.
const GUARD_PRIORITY: i32 = 110;
const NAT_PRIORITY: i32 = 100;

/// What the table is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The LANs' prefixes: what must never leave an uplink as a source.
    pub lans: Vec<(Ipv4Addr, u8)>,
    /// The uplinks' interface names.
    pub uplinks: Vec<String>,
    /// The router's own ephemeral ports (`ip_local_port_range`).
    pub ports: (u16, u16),
}

impl Wanted {
    /// The whole table, as one transaction that replaces any earlier one.
    pub fn ruleset(&self) -> schema::Nftables<'static> {
        // Gone (whether or not it existed), then built anew: one
        // transaction, so no packet sees the table half made.
        let mut batch = without_table();
        batch.add(NfListObject::Table(table()));
        batch.add(NfListObject::Counter(schema::Counter {
            family: NfFamily::IP,
            table: TABLE.into(),
            name: LEAKED.into(),
            handle: None,
            packets: None,
            bytes: None,
        }));
        for (name, kind, priority) in [
            ("nat", NfChainType::NAT, NAT_PRIORITY),
            ("guard", NfChainType::Filter, GUARD_PRIORITY),
        ] {
            batch.add(NfListObject::Chain(Chain {
                family: NfFamily::IP,
                table: TABLE.into(),
                name: name.into(),
                _type: Some(kind),
                hook: Some(NfHook::Postrouting),
                prio: Some(priority),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
        }
        if self.lans.is_empty() || self.uplinks.is_empty() {
            return batch.to_nftables();
        }
        for uplink in &self.uplinks {
            // Ports of TCP and UDP into the router's own range; other
            // protocols (ESP, GRE, ICMP) have none to choose.
            batch.add(rule(
                "nat",
                vec![
                    out_of(std::slice::from_ref(uplink)),
                    self.lan_source(),
                    tcp_or_udp(),
                    Statement::Masquerade(Some(NAT {
                        addr: None,
                        family: None,
                        port: Some(Expression::Range(Box::new(Range {
                            range: [
                                Expression::Number(u32::from(self.ports.0)),
                                Expression::Number(u32::from(self.ports.1)),
                            ],
                        }))),
                        flags: None,
                    })),
                ],
            ));
            batch.add(rule(
                "nat",
                vec![
                    out_of(std::slice::from_ref(uplink)),
                    self.lan_source(),
                    Statement::Masquerade(None),
                ],
            ));
        }
        batch.add(rule(
            "guard",
            vec![
                out_of(&self.uplinks),
                self.lan_source(),
                Statement::Counter(stmt::Counter::Named(LEAKED.into())),
                Statement::Drop(None),
            ],
        ));
        batch.to_nftables()
    }

    /// `ip saddr { LAN prefixes }`.
    fn lan_source(&self) -> Statement<'static> {
        let prefixes = self
            .lans
            .iter()
            .map(|(addr, len)| {
                SetItem::Element(Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String(Cow::Owned(addr.to_string()))),
                    len: u32::from(*len),
                })))
            })
            .collect();
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                PayloadField {
                    protocol: "ip".into(),
                    field: "saddr".into(),
                },
            ))),
            right: Expression::Named(NamedExpression::Set(prefixes)),
            op: Operator::EQ,
        })
    }
}

/// `meta l4proto { tcp, udp }`.
fn tcp_or_udp() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        })),
        right: Expression::Named(NamedExpression::Set(vec![
            SetItem::Element(Expression::String("tcp".into())),
            SetItem::Element(Expression::String("udp".into())),
        ])),
        op: Operator::EQ,
    })
}

/// `oifname { names }`.
fn out_of(names: &[String]) -> Statement<'static> {
    let names = names
        .iter()
        .map(|n| SetItem::Element(Expression::String(Cow::Owned(n.clone()))))
        .collect();
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::Oifname,
        })),
        right: Expression::Named(NamedExpression::Set(names)),
        op: Operator::EQ,
    })
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        ..Rule::default()
    })
}

/// Put the table in place (blocking: runs `nft`).
pub fn apply(wanted: &Wanted) -> Result<()> {
    helper::apply_ruleset(&wanted.ruleset()).context(
        "installing lbd's nftables table `ip lb` (is nftables installed, and the kernel's nf_nat?)",
    )
}

/// Packets the guard dropped so far (since the table was last replaced).
pub fn leaked() -> Result<u64> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "counter", "ip", TABLE, LEAKED])
        .output()
        .context("running nft")?;
    anyhow::ensure!(
        out.status.success(),
        "nft list counter ip {TABLE} {LEAKED}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing nft's answer")?;
    let packets = doc["nftables"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find_map(|i| i.get("counter").and_then(|c| c["packets"].as_u64()))
        })
        .context("no counter in nft's answer")?;
    Ok(packets)
}

/// Remove the table (`lbd --teardown`).
pub fn remove() -> Result<()> {
    helper::apply_ruleset(&without_table().to_nftables())
        .context("removing lbd's nftables table `ip lb`")
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        ..Table::default()
    }
}

/// A batch that removes the table whether or not it exists: declaring it
/// first makes the delete never fail.
fn without_table() -> Batch<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_masquerades_per_uplink_and_guards_all() {
        let wanted = Wanted {
            lans: vec![(Ipv4Addr::new(10, 10, 0, 0), 24)],
            uplinks: vec!["wan1".into(), "wan2".into()],
            ports: (32768, 60999),
        };
        let json = serde_json::to_string(&wanted.ruleset()).expect("serialises");
        assert_eq!(json.matches("\"masquerade\"").count(), 4, "{json}");
        assert_eq!(json.matches("\"drop\"").count(), 1, "{json}");
        assert!(json.contains("\"10.10.0.0\""), "{json}");
        assert!(json.contains("32768") && json.contains("60999"), "{json}");
        // Nothing to guard: chains without rules.
        let empty = serde_json::to_string(&Wanted::default().ruleset()).expect("serialises");
        assert!(!empty.contains("\"drop\""), "{empty}");
    }
}
