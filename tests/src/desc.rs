//! Lab description files: the TOML format, parsing, and validation.
//!
//! Owns turning a file into a checked [`LabDesc`], and knowing where the
//! shipped lab files live. Never touches the system: bringing a lab up is
//! `lab`'s job. Everything that can be checked without the kernel is checked
//! here, so that a typo fails before any namespace exists.
//!
//! The format, by example (see `labs/default.toml` for a whole lab):
//!
//! ```toml
//! [host.router]
//! sysctl = { "net.ipv4.ip_forward" = 1 }
//! route = ["default via 100.64.1.1"]
//!
//! [[host.inet.iface]]          # a local interface that is no link end
//! name = "srv0"
//! kind = "ifb"
//! address = ["198.51.100.10/24"]
//!
//! [[link]]                     # a veth pair
//! tbf = { rate = "100mbit" }   # optional, on both ends' egress
//! [link.a]
//! host = "client"
//! ifname = "eth0"
//! address = "10.10.0.2/24"     # or several: ["10.10.0.2/24", "2001:db8::2/64"]
//! mtu = 1500                   # optional
//! offload = { tso = false, gro = true }   # optional, `ethtool -K` features
//! queues = 2                   # optional: transmit and receive queues
//! master = "br-lan"            # optional: a port of this host's bridge
//!                              # (an iface with kind = "bridge")
//! [link.b]
//! host = "router"
//! ifname = "lan0"
//! address = "10.10.0.1/24"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Deserializer};

/// A whole lab: hosts (network namespaces) and the veth links between them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabDesc {
    /// Hosts by name; the namespace of host `h` is `{prefix}h`.
    #[serde(rename = "host")]
    pub hosts: BTreeMap<String, Host>,
    #[serde(rename = "link", default)]
    pub links: Vec<Link>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// `sysctl -w key=value`, applied before any interface exists so that
    /// `conf.default.*` reaches every interface.
    #[serde(default, deserialize_with = "sysctl_map")]
    pub sysctl: BTreeMap<String, String>,
    /// Local interfaces that are not link ends (e.g. a server address).
    #[serde(rename = "iface", default)]
    pub ifaces: Vec<Iface>,
    /// `ip route add` arguments, e.g. `default via 10.10.0.1`.
    #[serde(rename = "route", default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Iface {
    pub name: String,
    pub kind: IfaceKind,
    #[serde(rename = "address", default)]
    pub addresses: Vec<Cidr>,
}

/// Device types for a standalone interface. `ifb` stands in for `dummy` on
/// kernels built without `CONFIG_DUMMY` (such as the lab machines): up, it
/// holds addresses and drops whatever is sent through it, like a dummy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfaceKind {
    Dummy,
    Ifb,
    /// A Linux bridge; link ends join it with `master`.
    Bridge,
}

impl IfaceKind {
    /// The `ip link add ... type KIND` name.
    pub fn as_str(self) -> &'static str {
        match self {
            IfaceKind::Dummy => "dummy",
            IfaceKind::Ifb => "ifb",
            IfaceKind::Bridge => "bridge",
        }
    }
}

/// A veth pair between two hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub a: End,
    pub b: End,
    /// Token-bucket shaping on the egress of both ends.
    pub tbf: Option<Tbf>,
}

impl Link {
    pub fn ends(&self) -> [&End; 2] {
        [&self.a, &self.b]
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} -- {}:{}",
            self.a.host, self.a.ifname, self.b.host, self.b.ifname
        )
    }
}

/// One end of a veth pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct End {
    pub host: String,
    pub ifname: String,
    /// `address = "CIDR"` or `address = ["CIDR", ...]`: a dual-stack end
    /// has one of each family.
    #[serde(rename = "address", default, deserialize_with = "one_or_many")]
    pub addresses: Vec<Cidr>,
    pub mtu: Option<u32>,
    /// A bridge of the same host (a `kind = "bridge"` iface) this end is a
    /// port of.
    pub master: Option<String>,
    /// `ethtool -K` features: `tso = false` becomes `tso off`.
    #[serde(default)]
    pub offload: BTreeMap<String, bool>,
    /// Transmit and receive queues; one of each if unsaid.
    pub queues: Option<u32>,
}

/// `tc qdisc ... tbf rate RATE burst BURST latency LATENCY`, in tc's units.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tbf {
    pub rate: String,
    #[serde(default = "Tbf::default_burst")]
    pub burst: String,
    #[serde(default = "Tbf::default_latency")]
    pub latency: String,
}

impl Tbf {
    fn default_burst() -> String {
        "64kb".to_owned()
    }
    fn default_latency() -> String {
        "50ms".to_owned()
    }
}

/// An address with its prefix length, `10.10.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` lies in this address's subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(n.to_bits()), u128::from(i.to_bits()), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix_len);
        net.checked_shr(host_bits).unwrap_or(0) == ip.checked_shr(host_bits).unwrap_or(0)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("`{s}` is not ADDRESS/PREFIX_LEN (e.g. 10.10.0.1/24)"))?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("`{addr}` in `{s}` is not an IP address"))?;
        let prefix_len: u8 = len
            .parse()
            .with_context(|| format!("`{len}` in `{s}` is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        ensure!(
            prefix_len <= max,
            "prefix length {prefix_len} in `{s}` is over {max}"
        );
        Ok(Cidr { addr, prefix_len })
    }
}

impl TryFrom<String> for Cidr {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// `default via GW` or `NET/LEN via GW`, optionally followed by
/// `metric N` (a second default route through a backup uplink needs one).
/// Displays as `ip route` arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Route {
    /// `None` is the default route.
    pub dest: Option<Cidr>,
    pub via: IpAddr,
    pub metric: Option<u32>,
}

impl FromStr for Route {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let (dest, via, metric) = match words[..] {
            [dest, "via", via] => (dest, via, None),
            [dest, "via", via, "metric", m] => (
                dest,
                via,
                Some(
                    m.parse()
                        .with_context(|| format!("metric `{m}` in route `{s}`"))?,
                ),
            ),
            _ => bail!(
                "route `{s}` is not `DEST via GATEWAY [metric N]` (DEST is `default` or NET/LEN)"
            ),
        };
        let dest = match dest {
            "default" => None,
            net => Some(net.parse().with_context(|| format!("in route `{s}`"))?),
        };
        let via = via
            .parse()
            .with_context(|| format!("gateway `{via}` in route `{s}` is not an IP address"))?;
        Ok(Route { dest, via, metric })
    }
}

impl TryFrom<String> for Route {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dest {
            None => write!(f, "default via {}", self.via)?,
            Some(net) => write!(f, "{net} via {}", self.via)?,
        }
        match self.metric {
            Some(m) => write!(f, " metric {m}"),
            None => Ok(()),
        }
    }
}

/// A link end's addresses may be written as one string or a list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Addresses {
        One(String),
        Many(Vec<String>),
    }
    let texts = match Addresses::deserialize(d)? {
        Addresses::One(s) => vec![s],
        Addresses::Many(list) => list,
    };
    texts
        .into_iter()
        .map(|s| {
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("{e:#}")))
        })
        .collect()
}

/// Sysctl values may be written as TOML integers or strings.
fn sysctl_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Int(i64),
        Text(String),
    }
    let raw = BTreeMap::<String, Value>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(key, value)| match value {
            Value::Int(i) => (key, i.to_string()),
            Value::Text(s) => (key, s),
        })
        .collect())
}

impl LabDesc {
    /// Reads, parses and validates a lab file.
    pub fn load(path: &Path) -> Result<LabDesc> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading lab file {}", path.display()))?;
        LabDesc::parse(&text).with_context(|| format!("in lab file {}", path.display()))
    }

    /// Loads one of the lab files shipped in `tests/labs/`, by stem (`"default"`).
    pub fn shipped(name: &str) -> Result<LabDesc> {
        LabDesc::load(&shipped_path(name))
    }

    /// Parses and validates a lab description.
    pub fn parse(text: &str) -> Result<LabDesc> {
        let desc: LabDesc = toml::from_str(text).context("not a valid lab description")?;
        desc.validate()?;
        Ok(desc)
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.hosts.is_empty(), "the lab has no [host.NAME] table");
        // Interface names already used, per host (`lo` always exists).
        let mut taken: BTreeMap<&str, BTreeSet<&str>> = self
            .hosts
            .keys()
            .map(|h| (h.as_str(), BTreeSet::from(["lo"])))
            .collect();

        for (name, host) in &self.hosts {
            check_name("host name", name, 15)?;
            for key in host.sysctl.keys() {
                ensure!(
                    !key.is_empty() && !key.contains(['/', ' ', '=']),
                    "host {name}: `{key}` is not a sysctl key (write it like net.ipv4.ip_forward)"
                );
            }
            for iface in &host.ifaces {
                check_ifname(name, &iface.name, &mut taken)?;
            }
        }
        for (i, link) in self.links.iter().enumerate() {
            for end in link.ends() {
                let what = || format!("link {} ({link})", i + 1);
                ensure!(
                    self.hosts.contains_key(&end.host),
                    "{}: host `{}` is not defined; hosts are: {}",
                    what(),
                    end.host,
                    self.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                check_ifname(&end.host, &end.ifname, &mut taken).with_context(what)?;
                if let Some(master) = &end.master {
                    let is_bridge = self.hosts[&end.host]
                        .ifaces
                        .iter()
                        .any(|i| &i.name == master && i.kind == IfaceKind::Bridge);
                    ensure!(
                        is_bridge,
                        "{}: master `{master}` is not a bridge of host {} (an iface with kind = \"bridge\")",
                        what(),
                        end.host
                    );
                }
                if let Some(mtu) = end.mtu {
                    ensure!(
                        (68..=65535).contains(&mtu),
                        "{}: mtu {mtu} is outside 68..=65535",
                        what()
                    );
                }
                for feature in end.offload.keys() {
                    check_name("offload feature", feature, 64).with_context(what)?;
                }
                if let Some(queues) = end.queues {
                    ensure!(
                        (1..=64).contains(&queues),
                        "{}: queues {queues} is outside 1..=64",
                        what()
                    );
                }
            }
            if let Some(tbf) = &link.tbf {
                for (field, value) in [
                    ("rate", &tbf.rate),
                    ("burst", &tbf.burst),
                    ("latency", &tbf.latency),
                ] {
                    ensure!(
                        !value.is_empty() && !value.contains(char::is_whitespace),
                        "link {} ({link}): tbf {field} `{value}` must be one word in tc's units (e.g. 100mbit, 64kb, 50ms)",
                        i + 1
                    );
                }
            }
        }
        Ok(())
    }

    /// The other end of the veth whose one end is `host:ifname`, if any.
    pub fn peer(&self, host: &str, ifname: &str) -> Option<&End> {
        self.links.iter().find_map(|l| match l.ends() {
            [a, b] if a.host == host && a.ifname == ifname => Some(b),
            [a, b] if b.host == host && b.ifname == ifname => Some(a),
            _ => None,
        })
    }

    /// Every address configured on `host`'s interface `ifname`.
    pub fn addresses(&self, host: &str, ifname: &str) -> Vec<Cidr> {
        let on_links = self
            .links
            .iter()
            .flat_map(|l| l.ends())
            .filter(|e| e.host == host && e.ifname == ifname)
            .flat_map(|e| e.addresses.iter().copied());
        let on_ifaces = self
            .hosts
            .get(host)
            .into_iter()
            .flat_map(|h| &h.ifaces)
            .filter(|i| i.name == ifname)
            .flat_map(|i| i.addresses.iter().copied());
        on_links.chain(on_ifaces).collect()
    }
}

/// Path of a lab file shipped in `tests/labs/`, by stem (`"routed"`).
pub fn shipped_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("labs")
        .join(format!("{name}.toml"))
}

fn check_name(what: &str, name: &str, max: usize) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= max
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "{what} `{name}` must be 1 to {max} characters of letters, digits, `-`, `_` or `.`"
    );
    Ok(())
}

fn check_ifname<'a>(
    host: &'a str,
    ifname: &'a str,
    taken: &mut BTreeMap<&'a str, BTreeSet<&'a str>>,
) -> Result<()> {
    // IFNAMSIZ is 16 with the terminating NUL.
    check_name("interface name", ifname, 15).with_context(|| format!("on host {host}"))?;
    let names = taken.entry(host).or_default();
    ensure!(
        names.insert(ifname),
        "host {host} has two interfaces named `{ifname}`"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        [host.a]
        sysctl = { "net.ipv4.ip_forward" = 1, "net.ipv4.conf.all.rp_filter" = "0" }
        route = ["default via 10.0.0.2"]
        [[host.a.iface]]
        name = "srv0"
        kind = "ifb"
        address = ["192.0.2.1/24"]
        [host.b]
        [[link]]
        tbf = { rate = "10mbit" }
        [link.a]
        host = "a"
        ifname = "eth0"
        address = "10.0.0.1/30"
        offload = { tso = false, gro = true }
        [link.b]
        host = "b"
        ifname = "eth0"
        address = "10.0.0.2/30"
        mtu = 1400
    "#;

    fn error_of(text: &str) -> String {
        match LabDesc::parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn parses_a_valid_lab() -> Result<()> {
        let desc = LabDesc::parse(SMALL)?;
        let a = &desc.hosts["a"];
        assert_eq!(a.sysctl["net.ipv4.ip_forward"], "1");
        assert_eq!(a.sysctl["net.ipv4.conf.all.rp_filter"], "0");
        assert_eq!(a.routes, vec!["default via 10.0.0.2".parse::<Route>()?]);
        assert_eq!(a.ifaces[0].kind, IfaceKind::Ifb);
        let link = &desc.links[0];
        assert_eq!(link.a.offload.get("tso"), Some(&false));
        assert_eq!(link.b.mtu, Some(1400));
        assert_eq!(desc.peer("a", "eth0").map(|e| e.host.as_str()), Some("b"));
        assert!(desc.peer("a", "srv0").is_none());
        assert_eq!(link.tbf.as_ref().map(|t| t.burst.as_str()), Some("64kb"));
        assert_eq!(
            desc.addresses("a", "eth0"),
            vec!["10.0.0.1/30".parse::<Cidr>()?]
        );
        assert_eq!(
            desc.addresses("a", "srv0"),
            vec!["192.0.2.1/24".parse::<Cidr>()?]
        );
        Ok(())
    }

    #[test]
    fn a_link_end_takes_a_list_of_addresses() -> Result<()> {
        let dual = SMALL.replace(
            r#"address = "10.0.0.1/30""#,
            r#"address = ["10.0.0.1/30", "2001:db8::1/64"]"#,
        );
        let desc = LabDesc::parse(&dual)?;
        assert_eq!(
            desc.addresses("a", "eth0"),
            vec!["10.0.0.1/30".parse::<Cidr>()?, "2001:db8::1/64".parse()?]
        );
        let error = error_of(&SMALL.replace(
            r#"address = "10.0.0.1/30""#,
            r#"address = ["10.0.0.1/30", "2001:db8::1/129"]"#,
        ));
        assert!(error.contains("prefix length 129"), "{error}");
        Ok(())
    }

    #[test]
    fn shipped_labs_parse() -> Result<()> {
        // `default` has a second LAN (client2) and a VPN provider (vpn)
        // that `routed` lacks.
        for (name, hosts) in [("default", 7), ("routed", 5)] {
            let desc = LabDesc::shipped(name)?;
            assert_eq!(desc.hosts.len(), hosts, "{name}");
            assert_eq!(desc.links.len(), hosts, "{name}");
        }
        let lan_route: Route = "10.10.0.0/24 via 100.64.1.2".parse()?;
        assert!(!LabDesc::shipped("default")?.hosts["isp1"]
            .routes
            .contains(&lan_route));
        assert!(LabDesc::shipped("routed")?.hosts["isp1"]
            .routes
            .contains(&lan_route));
        // The DHCP lab is dual-stack: each ISP's end of its uplink has both.
        let dhcp = LabDesc::shipped("dhcp")?;
        for n in 1..=3 {
            let isp = format!("isp{n}");
            assert_eq!(
                dhcp.addresses(&isp, "down0"),
                vec![
                    format!("100.64.{n}.1/29").parse::<Cidr>()?,
                    format!("2001:db8:{n}:ffff::1/64").parse()?
                ],
                "{isp}"
            );
        }
        Ok(())
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                SMALL.replace(r#"host = "b""#, r#"host = "c""#),
                "host `c` is not defined",
            ),
            (
                SMALL.replace("10.0.0.1/30", "10.0.0.1/33"),
                "prefix length 33",
            ),
            (
                SMALL.replace("10.0.0.1/30", "10.0.0.300/30"),
                "`10.0.0.300` in `10.0.0.300/30`",
            ),
            (
                SMALL.replace("default via", "default dev"),
                "is not `DEST via GATEWAY",
            ),
            (SMALL.replace("mtu = 1400", "mtu = 14"), "mtu 14"),
            (
                SMALL.replace("mtu = 1400", "mut = 1400"),
                "unknown field `mut`",
            ),
            (
                SMALL.replace(
                    r#"ifname = "eth0"
        address = "10.0.0.2/30""#,
                    r#"ifname = "a-very-long-ifname"
        address = "10.0.0.2/30""#,
                ),
                "a-very-long-ifname",
            ),
            (
                SMALL.replace(r#"name = "srv0""#, r#"name = "lo""#),
                "two interfaces named `lo`",
            ),
            (
                SMALL.replace(r#"kind = "ifb""#, r#"kind = "bond""#),
                "unknown variant `bond`",
            ),
            (String::new(), "missing field `host`"),
        ];
        for (text, expected) in cases {
            let error = error_of(&text);
            assert!(
                error.contains(expected),
                "expected `{expected}` in: {error}"
            );
        }
    }

    #[test]
    fn cidr_contains() -> Result<()> {
        let net: Cidr = "100.64.1.2/30".parse()?;
        assert!(net.contains("100.64.1.1".parse()?));
        assert!(!net.contains("100.64.1.5".parse()?));
        assert!("0.0.0.0/0".parse::<Cidr>()?.contains("8.8.8.8".parse()?));
        assert!(!net.contains("::1".parse()?));
        Ok(())
    }
}
