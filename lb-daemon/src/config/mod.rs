//! lbd's configuration: parse the TOML file, validate it as a whole, and hand
//! back a plain, typed [`Config`] in which every value is already checked.
//!
//! This module owns the file format (keys, defaults, limits) and its error
//! messages: every problem names the file, the line and the key, and all the
//! problems of a file are reported together, so that an operator fixes them
//! in one pass. Parsing happens in two steps: serde reads the file into `Raw*`
//! structs whose leaves are `Spanned<toml::Value>` (so a wrong type is a
//! collected problem with a line, not an abort), and a checker turns those
//! into the output types, collecting problems as it goes.
//!
//! It never touches the kernel: no maps, no netlink, no sockets, no sysctl
//! writes. The only files it reads are the configuration file ([`load`]) and,
//! when asked, the `ip_local_port_range` sysctl ([`read_local_port_range`]).
//! The daemon validates the whole configuration before it binds or attaches
//! anything.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Spanned, Value};

mod policy;

pub use policy::{
    read_prefix_file, AddressMatch, Fallback, PolicyConfig, PolicyUplink, Prefix, PrefixFile,
    RuleAction, RuleConfig, Sticky, StickyBy,
};

/// Most uplinks the data plane can steer to.
///
/// Must match `lb_common`'s `MAX_UPLINKS` (the size of the kernel's uplink
/// arrays); it is defined here until the two are wired together.
pub const MAX_UPLINKS: usize = 16;

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lbd.sock";
/// Smallest flow table.
pub const MIN_FLOWS: u32 = 1024;
/// Largest flow table (16 Mi entries).
pub const MAX_FLOWS: u32 = 16 * 1024 * 1024;
/// Default flow table size.
pub const DEFAULT_FLOWS: u32 = 65536;
/// Largest uplink weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Highest (least preferred) tier.
pub const MAX_TIER: u8 = 7;
/// Largest `rise` and `fall` count.
pub const MAX_RISE_FALL: u32 = 1000;
/// The shortest time between probe rounds: shorter floods the targets.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// The shortest probe timeout: no path across the internet answers sooner.
pub const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(10);
/// A probe's timeout may be at most this many intervals.
pub const MAX_TIMEOUT_INTERVALS: u32 = 10;
/// Lowest port the NAT range may use: below are the well-known ports.
pub const MIN_NAT_PORT: u16 = 1024;
/// Default NAT port range; clear of the kernel's default
/// `ip_local_port_range` (32768-60999).
pub const DEFAULT_NAT_PORTS: (u16, u16) = (20000, 29999);
/// Where the kernel publishes the port range of the host's own sockets.
pub const LOCAL_PORT_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Longest Linux interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Longest uplink name (the same as an interface name, so names fit anywhere
/// an interface name fits).
const MAX_UPLINK_NAME_LEN: usize = 15;
/// Longest path in a `sockaddr_un` (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH_LEN: usize = 107;
/// How long a hook may run by default.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Output types: plain, validated.

/// The daemon's whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub balance: BalanceConfig,
    pub flows: FlowConfig,
    pub nat: NatConfig,
    pub routing: RoutingConfig,
    /// `[metrics] listen`: where Prometheus scrapes lbd; `None`: off.
    pub metrics: Option<std::net::SocketAddr>,
    /// `[passive]`: failure detection from the traffic lb forwards.
    pub passive: PassiveConfig,
    /// At least one.
    pub lans: Vec<LanConfig>,
    /// 1..=[`MAX_UPLINKS`], in file order; names and interfaces are unique.
    pub uplinks: Vec<UplinkConfig>,
    /// `[[policy]]`, in file order; names unique.
    pub policies: Vec<PolicyConfig>,
    /// `[[rule]]`, in file order: the first that matches wins.
    pub rules: Vec<RuleConfig>,
    /// What is allowed but surely not meant (a rule that can never
    /// match): lbd logs them at start and reload.
    pub warnings: Vec<Problem>,
    /// The file it was read from, as given: what checks against the
    /// machine (a LAN's prefixes) name in their messages.
    pub file: String,
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Control socket path: absolute, at most 107 bytes.
    pub socket: PathBuf,
    /// Commands run on every uplink state change (argv, no shell).
    pub hooks: Vec<Vec<String>>,
    /// How long a hook may run before it is killed.
    pub hook_timeout: Duration,
    /// Where the data plane is pinned (a bpffs directory): it outlives lbd
    /// there, and a starting lbd adopts it.
    pub bpffs: PathBuf,
    /// Where lbd keeps what must outlive it besides the data plane: the
    /// quotas' usage. Written only when an uplink has a quota.
    pub state_dir: PathBuf,
}

/// Default state directory (systemd's `StateDirectory=lb`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

/// Default pin directory of the data plane.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            hooks: Vec::new(),
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// `[balance]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalanceConfig {
    pub mode: ClassifierMode,
}

/// Which fields of a new connection pick its uplink (as MikroTik's PCC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ClassifierMode {
    /// Protocol, addresses and ports: connections spread independently.
    #[default]
    #[serde(rename = "5-tuple")]
    FiveTuple,
    /// Source and destination address: one client's connections to one
    /// server share an uplink.
    #[serde(rename = "src-dst-address")]
    SrcDstAddress,
    /// Source address: all of a client's connections share an uplink.
    #[serde(rename = "src-address")]
    SrcAddress,
}

impl ClassifierMode {
    /// The data plane's number for it (`lb_common::hash::mode`).
    pub fn number(self) -> u32 {
        match self {
            ClassifierMode::FiveTuple => lb_common::hash::mode::FIVE_TUPLE,
            ClassifierMode::SrcDstAddress => lb_common::hash::mode::SRC_DST_ADDRESS,
            ClassifierMode::SrcAddress => lb_common::hash::mode::SRC_ADDRESS,
        }
    }
}

impl ClassifierMode {
    /// Every mode, in the order the documentation lists them.
    pub const ALL: [ClassifierMode; 3] = [Self::FiveTuple, Self::SrcDstAddress, Self::SrcAddress];

    /// The spelling used in the TOML file, in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FiveTuple => "5-tuple",
            Self::SrcDstAddress => "src-dst-address",
            Self::SrcAddress => "src-address",
        }
    }
}

impl fmt::Display for ClassifierMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[flows]`: the data plane's flow table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowConfig {
    /// Entries, [`MIN_FLOWS`]..=[`MAX_FLOWS`].
    pub max: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_transitory_timeout: Duration,
    pub udp_timeout: Duration,
    pub icmp_timeout: Duration,
}

impl Default for FlowConfig {
    /// Idle timeouts after RFC 5382 (TCP), RFC 4787 (UDP) and RFC 5508 (ICMP).
    fn default() -> Self {
        Self {
            max: DEFAULT_FLOWS,
            tcp_established_timeout: Duration::from_secs(2 * 3600),
            tcp_transitory_timeout: Duration::from_secs(4 * 60),
            udp_timeout: Duration::from_secs(5 * 60),
            icmp_timeout: Duration::from_secs(60),
        }
    }
}

/// `[nat]`: the source ports NAT may pick, `port_min..=port_max`, within
/// [`MIN_NAT_PORT`]..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    pub port_min: u16,
    pub port_max: u16,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            port_min: DEFAULT_NAT_PORTS.0,
            port_max: DEFAULT_NAT_PORTS.1,
        }
    }
}

/// An uplink's next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway {
    /// The next hop of the kernel's default route through the uplink's
    /// interface, in any table (what a DHCP or PPPoE client installs),
    /// followed as it changes. The default.
    Auto,
    /// A unicast IPv4 address.
    Fixed(Ipv4Addr),
}

impl std::fmt::Display for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gateway::Auto => f.write_str("auto"),
            Gateway::Fixed(ip) => write!(f, "{ip}"),
        }
    }
}

/// `[routing]`: the kernel routing state lbd owns, per uplink: a table
/// with a default route through the uplink's gateway, and a rule that sends
/// traffic from the uplink's address to that table (so that the probes and
/// the router's own sockets bound to an uplink leave through it, whatever
/// the main table says); and for the slow path, two rules that send what
/// the LAN's clients send through the kernel to the internet by an uplink
/// in service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Uplink N (from 0, in file order) uses table `first_table + N`.
    pub first_table: u32,
    /// Uplink N's rule has priority `first_priority + N`.
    pub first_priority: u32,
    /// More tables whose routes, like the main table's, send a destination
    /// to the kernel instead of balancing it (mwan3's `rt_table_lookup`).
    pub lookup_tables: Vec<u32>,
}

/// Default first routing table of lbd's (mwan3 numbers from 1, and
/// distributions use 1..=252 for their own; 4000 is clear of both).
pub const DEFAULT_FIRST_TABLE: u32 = 4000;
/// Default priority of lbd's first rule: before the main table's (32766)
/// and the default one's, after the local table's (0); clear of mwan3's
/// 1000..=3000 and of `ip rule add` without a priority (just below 32766).
pub const DEFAULT_FIRST_PRIORITY: u32 = 4000;
/// Tables a routing config must never take: unspec, compat, default, main,
/// local.
const RESERVED_TABLES: [u32; 5] = [0, 252, 253, 254, 255];

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            first_table: DEFAULT_FIRST_TABLE,
            first_priority: DEFAULT_FIRST_PRIORITY,
            lookup_tables: Vec::new(),
        }
    }
}

impl RoutingConfig {
    /// Uplink `index`'s table.
    pub fn table(&self, index: usize) -> u32 {
        self.first_table + index as u32
    }

    /// Uplink `index`'s rule priority.
    pub fn priority(&self, index: usize) -> u32 {
        self.first_priority + index as u32
    }

    /// The priorities of lbd's rules after every uplink's own, in order:
    /// the main table without its default routes; the tunnels' own
    /// packets, to an uplink that is no tunnel (before anything that could
    /// send them into one); the replies of inbound connections, by their
    /// mark, to their uplink's table, and the policies' slow path; the
    /// slow path (the LAN's traffic that the kernel forwards, and the
    /// router's own) to the table of the uplink the slow path uses.
    pub fn later_priorities(&self) -> LaterPriorities {
        let first = self.first_priority + MAX_UPLINKS as u32;
        LaterPriorities {
            main: first,
            transport: first + 1,
            inbound: first + 2,
            slow_path: first + 3,
        }
    }
}

/// See [`RoutingConfig::later_priorities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaterPriorities {
    pub main: u32,
    pub transport: u32,
    pub inbound: u32,
    pub slow_path: u32,
}

impl LaterPriorities {
    pub fn all(self) -> [u32; 4] {
        [self.main, self.transport, self.inbound, self.slow_path]
    }
}

/// `[[lan]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    /// A valid interface name, unique among LANs and uplinks.
    pub interface: String,
    /// `prefix6`: the IPv6 prefix the LAN carries, when it is not one the
    /// router's addresses show (/64 or shorter). `None`: found on the
    /// interface.
    pub prefix6: Option<(Ipv6Addr, u8)>,
}

/// `[[uplink]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// `[a-z0-9_-]`, 1..=15 characters, unique.
    pub name: String,
    /// A valid interface name, unique, not a LAN interface.
    pub interface: String,
    /// Where this uplink's traffic goes next.
    pub gateway: Gateway,
    /// 1..=[`MAX_WEIGHT`].
    pub weight: u32,
    /// 0..=[`MAX_TIER`]; lower is preferred, higher tiers are backups.
    pub tier: u8,
    pub health: HealthConfig,
    /// Zero or more, no two the same; with none, the uplink's health follows
    /// its link state only. Its IPv6 probes (of IPv6 targets) judge its
    /// IPv6 apart; without any, its IPv6 follows its IPv4's health.
    pub probes: Vec<ProbeConfig>,
    /// A volume cap and what reaching it does.
    pub quota: Option<QuotaConfig>,
    /// `[uplink.shape]`: rates lbd shapes this uplink's traffic to.
    pub shape: Shape,
    /// `routed`: prefixes routed to the router through this uplink (a
    /// public subnet for a DMZ): they leave it untranslated, and the
    /// guard lets them. No two uplinks' overlap.
    pub routed: Vec<Routed>,
    /// `prefix6`: the IPv6 prefix the ISP delegates through it, when it is
    /// static or lbd cannot tell which delegation is this uplink's (/64
    /// or shorter; no two uplinks' overlap). `None`: followed from the
    /// router's DHCPv6 client.
    pub prefix6: Option<(Ipv6Addr, u8)>,
    /// `clamp_mss`: lower the MSS of TCP SYNs leaving by it to what its
    /// MTU carries (only when it is smaller than the SYN's).
    pub clamp_mss: bool,
}

impl UplinkConfig {
    /// Its probes of one family: IPv6 (`ipv6`) or IPv4.
    pub fn probes_of(&self, ipv6: bool) -> Vec<ProbeConfig> {
        self.probes
            .iter()
            .filter(|p| p.kind.is_ipv6() == ipv6)
            .cloned()
            .collect()
    }
}

/// A prefix of `[[uplink]] routed`, and where the file gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub addr: Ipv4Addr,
    pub len: u8,
    /// The line of the `routed` key, for messages about it.
    pub line: usize,
}

impl Routed {
    /// Whether `self` and the prefix `addr/len` share an address.
    pub fn overlaps(&self, addr: Ipv4Addr, len: u8) -> bool {
        let shorter = self.len.min(len);
        prefix_bits(self.addr, shorter) == prefix_bits(addr, shorter)
    }
}

impl fmt::Display for Routed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The first `len` bits of `addr`.
fn prefix_bits(addr: Ipv4Addr, len: u8) -> u32 {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask
}

// ---------------------------------------------------------------------------
// The configuration types that other parts act on (the passive listener,
// quotas, shapers): their values, as the file gives them.

/// `[passive]`: how the traffic is listened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Listen at all.
    pub enabled: bool,
    /// The shortest silence that raises suspicion.
    pub floor: Duration,
    /// The silence that raises suspicion, in round trips of the uplink's
    /// probes (when they have measured one).
    pub rtt_factor: u32,
    /// Probes per target in a burst.
    pub burst: u32,
    /// How long a burst's probes may take to answer.
    pub burst_timeout: Duration,
    /// After passive evidence took an uplink down, it stays down at least
    /// this long (whatever its probes say), so that flows are not moved
    /// back and forth.
    pub hold_down: Duration,
    /// A SYN sent again without an answer moves to another uplink.
    pub resteer_syn: bool,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            floor: Duration::from_millis(60),
            rtt_factor: 4,
            burst: 3,
            burst_timeout: Duration::from_millis(50),
            hold_down: Duration::from_secs(10),
            resteer_syn: true,
        }
    }
}

impl PassiveConfig {
    /// The silence that makes an uplink with round trip `rtt` suspect.
    pub fn silence(&self, rtt: Option<Duration>) -> Duration {
        rtt.map_or(self.floor, |rtt| (rtt * self.rtt_factor).max(self.floor))
    }
}

/// How long one quota lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    /// Starts on `reset_day` (1 = Monday .. 7 = Sunday).
    Week,
    /// Starts on day `reset_day` (1..=28) of the month.
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// What reaching the quota does to the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// No new flows; existing ones finish.
    Drain,
    /// Its flows move to other uplinks.
    Disable,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Drain => "drain",
            Action::Disable => "disable",
        }
    }
}

/// `quota = { bytes = "500GB", period = "month", reset_day = 1, action = "drain" }`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaConfig {
    pub bytes: u64,
    pub period: Period,
    pub reset_day: u8,
    pub action: Action,
}

/// Parse a volume: a number with a unit, decimal (`KB`, `MB`, `GB`, `TB`,
/// as ISPs count) or binary (`KiB` .. `TiB`), or plain bytes (`B`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_size: u64 = match unit.trim() {
        "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "" => {
            return Err(format!(
                "{text:?} has no unit: write e.g. \"500GB\" or \"2TiB\""
            ))
        }
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a number and a unit like \"500GB\", got {text:?}"))?;
    let bytes = value * unit_size as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is out of range (at least 1 byte)"));
    }
    Ok(bytes as u64)
}

pub const MIN_RATE: u64 = 64_000;
pub const MAX_RATE: u64 = 100_000_000_000;

/// `[uplink.shape]`: rates in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

/// A rate as tc writes it: `20mbit`, `500kbit`, `1gbit`, `64000bit`
/// (powers of 1000, as tc's; bytes units are refused, they are a classic
/// slip).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a rate such as \"20mbit\", got {text:?}"))?;
    let scale = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        "" => return Err(format!("{text:?} has no unit: write \"{number}mbit\" or \"{number}kbit\"")),
        "kbps" | "mbps" | "gbps" | "bps" => {
            return Err(format!(
                "{text:?}: tc's bps units are bytes per second; write bits, as ISPs sell them: \"{}{}bit\" is the same rate",
                number.saturating_mul(8),
                &unit[..unit.len() - 3]
            ))
        }
        other => return Err(format!("unknown unit {other:?} in {text:?} (bit, kbit, mbit, gbit)")),
    };
    let rate = number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(format!("{text:?} is outside 64kbit..=100gbit"));
    }
    Ok(rate)
}

/// `[uplink.health]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two probes of each target; non-zero.
    pub interval: Duration,
    /// Non-zero, at most [`MAX_TIMEOUT_INTERVALS`] intervals.
    pub timeout: Duration,
    /// Consecutive good rounds to go up, 1..=[`MAX_RISE_FALL`].
    pub rise: u32,
    /// Consecutive bad rounds to go down, 1..=[`MAX_RISE_FALL`].
    pub fall: u32,
    /// A round is good when at least this many probes answer; 1..=the number
    /// of probes (1 when there are none: it is then unused).
    pub quorum: u32,
    /// Degraded while loss is above this, 0..=100.
    pub max_loss_percent: Option<u8>,
    /// Degraded while the round-trip time is above this; non-zero.
    pub max_rtt: Option<Duration>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            // One probe a second per target: what a metered backup line can
            // afford (about 230 MB of IP a month), and what public targets
            // tolerate. The traffic itself finds failures faster (see
            // `passive`): probes confirm, and watch idle uplinks.
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            // 5 s of good rounds: longer than a line that bounces every few
            // seconds stays up, so flapping gives no failback storm.
            rise: 5,
            fall: 3,
            quorum: 1,
            max_loss_percent: None,
            max_rtt: None,
        }
    }
}

/// `[[uplink.probe]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub kind: ProbeKind,
}

/// What a probe sends, and where. Addresses are IP literals: probes never
/// resolve names, so that a DNS failure cannot look like an uplink failure.
/// A probe of an IPv6 address judges the uplink's IPv6 alone, one of an
/// IPv4 address its IPv4 (health is kept per family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// ICMP echo.
    Icmp { target: IpAddr },
    /// TCP connect (a SYN answered by SYN-ACK or RST counts as an answer).
    Tcp { target: SocketAddr },
    /// HTTP/1.1 GET `path` with `Host: host`; answered when the status is
    /// `expect_status`.
    Http {
        target: SocketAddr,
        host: String,
        path: String,
        expect_status: u16,
    },
    /// DNS query for the A record of `query`.
    Dns { server: SocketAddr, query: String },
}

impl ProbeKind {
    /// Whether it probes over IPv6 (and so judges the uplink's IPv6).
    pub fn is_ipv6(&self) -> bool {
        match self {
            Self::Icmp { target } => target.is_ipv6(),
            Self::Tcp { target } | Self::Http { target, .. } => target.is_ipv6(),
            Self::Dns { server, .. } => server.is_ipv6(),
        }
    }

    /// The `kind` key's spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Icmp { .. } => "icmp",
            Self::Tcp { .. } => "tcp",
            Self::Http { .. } => "http",
            Self::Dns { .. } => "dns",
        }
    }
}

impl fmt::Display for ProbeKind {
    /// One line for logs and the CLI, e.g. `http http://198.51.100.10/ (expect 200)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Icmp { target } => write!(f, "icmp {target}"),
            Self::Tcp { target } => write!(f, "tcp {target}"),
            Self::Http {
                host,
                path,
                expect_status,
                ..
            } => write!(f, "http http://{host}{path} (expect {expect_status})"),
            Self::Dns { server, query } => write!(f, "dns {server} A {query}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read; the OS error is the source.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not TOML, or its shape is wrong (an unknown key, a table
    /// where an array of tables belongs). Nothing else was checked.
    #[error("{0}")]
    Parse(Box<Problem>),
    /// The file is well formed but breaks these rules (all of them, in line
    /// order; never empty).
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found in the file (none for [`ConfigError::Read`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Parse(problem) => std::slice::from_ref(problem.as_ref()),
            Self::Invalid(problems) => problems,
        }
    }
}

/// One thing wrong with a configuration file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file name as given to [`parse`] (the path for [`load`]).
    pub file: String,
    /// 1-based; `None` for problems of the file as a whole.
    pub line: Option<usize>,
    /// 1-based; only for syntax errors.
    pub column: Option<usize>,
    /// Where in the file, e.g. `flows`, `uplink "isp1" health`, `lan #2`, or
    /// a dotted key path for parse errors.
    pub section: Option<String>,
    /// The key within the section.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    /// `lbd.toml:14: uplink "isp2" key weight: must be between 1 and 1000, got 0`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        match (&self.section, &self.key) {
            (Some(section), Some(key)) => write!(f, "{section} key {key}: ")?,
            (Some(section), None) => write!(f, "{section}: ")?,
            (None, Some(key)) => write!(f, "key {key}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// Displays problems one per line.
struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("expected a duration like \"50ms\", \"2s\", \"5m\" or \"2h\", got an empty string")]
    Empty,
    #[error("must not be negative, got \"{0}\"")]
    Negative(String),
    #[error("expected a whole number and a unit (ms, s, m, h), like \"50ms\", got \"{0}\"")]
    BadNumber(String),
    #[error("\"{0}\" has no unit; add one of ms, s, m, h (like \"{0}s\")")]
    MissingUnit(String),
    #[error("unknown unit \"{unit}\" in \"{text}\"; use ms, s, m or h")]
    UnknownUnit { text: String, unit: String },
    #[error("must be greater than zero, got \"{0}\"")]
    Zero(String),
    #[error("\"{0}\" is too long (at most about 584 years)")]
    Overflow(String),
}

// ---------------------------------------------------------------------------
// Entry points.

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates a configuration; `file_name` is used in messages.
pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
    let deserializer = toml::de::Deserializer::parse(text)
        .map_err(|err| ConfigError::Parse(Box::new(parse_problem(&err, text, file_name, true))))?;
    let raw = RawConfig::deserialize(deserializer)
        .map_err(|err| ConfigError::Parse(Box::new(parse_problem(&err, text, file_name, false))))?;
    let mut checker = Checker {
        text,
        file: file_name,
        problems: Vec::new(),
    };
    let config = checker.config(&raw);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        // Stable: problems on one line keep the order they were found in;
        // problems of the whole file come first.
        checker.problems.sort_by_key(|p| p.line);
        Err(ConfigError::Invalid(checker.problems))
    }
}

/// Parses a duration: a whole number and one of the units `ms`, `s`, `m`,
/// `h`, e.g. `"50ms"`. Zero, negative, fractional, unit-less and durations
/// that do not fit in 64-bit nanoseconds are refused.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.starts_with('-') {
        return Err(DurationError::Negative(text.to_owned()));
    }
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(unit_at);
    if digits.is_empty() {
        return Err(DurationError::BadNumber(text.to_owned()));
    }
    let nanos_per_unit: u64 = match unit {
        "" => return Err(DurationError::MissingUnit(text.to_owned())),
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3600 * 1_000_000_000,
        _ if unit.starts_with(|c: char| c == '.' || c == ',' || c.is_whitespace()) => {
            return Err(DurationError::BadNumber(text.to_owned()))
        }
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    // Only digits are left, so the one way to fail is a number too large.
    let count: u64 = digits
        .parse()
        .map_err(|_| DurationError::Overflow(text.to_owned()))?;
    let nanos = count
        .checked_mul(nanos_per_unit)
        .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    if nanos == 0 {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(Duration::from_nanos(nanos))
}

/// Checks the NAT port range against the kernel's `ip_local_port_range`
/// (`local`, as `(low, high)`): the two must not overlap, or the router's own
/// connections could take a port that NAT hands out. Returns a message that
/// names both ranges and what to change, or `None` when they are disjoint.
pub fn nat_range_conflict(nat: &NatConfig, local: (u16, u16)) -> Option<String> {
    let (lo, hi) = (local.0.min(local.1), local.0.max(local.1));
    if nat.port_max < lo || nat.port_min > hi {
        return None;
    }
    // The larger free stretch of 1024..=65535 outside the kernel's range.
    let below = (lo > MIN_NAT_PORT).then(|| (MIN_NAT_PORT, lo - 1));
    let above = (hi < u16::MAX).then(|| (hi + 1, u16::MAX));
    let size = |r: Option<(u16, u16)>| r.map_or(0, |(a, b)| u32::from(b) - u32::from(a) + 1);
    let room = if size(below) >= size(above) {
        below
    } else {
        above
    };
    let fix = match room {
        Some((a, b)) => format!(
            "move [nat] port_range outside it (for example \"{a}-{b}\"), or narrow the kernel's \
             range with sysctl net.ipv4.ip_local_port_range"
        ),
        None => "narrow the kernel's range with sysctl net.ipv4.ip_local_port_range to make \
                 room for [nat] port_range"
            .to_owned(),
    };
    Some(format!(
        "NAT port range {}-{} overlaps the kernel's ip_local_port_range {lo}-{hi}, so the \
         router's own connections could collide with NAT; {fix}",
        nat.port_min, nat.port_max
    ))
}

/// Reads the kernel's `ip_local_port_range` (of the caller's network
/// namespace) from [`LOCAL_PORT_RANGE_PATH`].
pub fn read_local_port_range() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string(LOCAL_PORT_RANGE_PATH)
        .map_err(|e| io::Error::new(e.kind(), format!("{LOCAL_PORT_RANGE_PATH}: {e}")))?;
    parse_local_port_range(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{LOCAL_PORT_RANGE_PATH}: expected two port numbers, got {text:?}"),
        )
    })
}

/// Parses the contents of `ip_local_port_range` ("32768\t60999\n").
pub fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next(), ports.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) => Some((lo, hi)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The file as serde reads it: every leaf is a spanned TOML value, so that a
// wrong type becomes a collected problem with a line number. Unknown keys are
// refused here, by serde, with the key's position.

type Field = Option<Spanned<Value>>;

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    balance: Option<RawBalance>,
    flows: Option<RawFlows>,
    nat: Option<RawNat>,
    routing: Option<RawRouting>,
    metrics: Option<RawMetrics>,
    passive: Option<RawPassive>,
    #[serde(default)]
    lan: Vec<Spanned<RawLan>>,
    #[serde(default)]
    uplink: Vec<Spanned<RawUplink>>,
    #[serde(default)]
    policy: Vec<Spanned<policy::RawPolicy>>,
    #[serde(default)]
    rule: Vec<Spanned<policy::RawRule>>,
}

// `expecting` is what serde says when a key holds something else
// ("invalid type: integer `4`, expected a table").
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawDaemon {
    socket: Field,
    hooks: Field,
    hook_timeout: Field,
    bpffs: Field,
    state_dir: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawBalance {
    mode: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawFlows {
    max: Field,
    tcp_established_timeout: Field,
    tcp_transitory_timeout: Field,
    udp_timeout: Field,
    icmp_timeout: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawNat {
    port_range: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawPassive {
    enabled: Field,
    floor: Field,
    rtt_factor: Field,
    burst: Field,
    burst_timeout: Field,
    hold_down: Field,
    resteer_syn: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawMetrics {
    listen: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawRouting {
    first_table: Field,
    first_priority: Field,
    lookup_tables: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawLan {
    interface: Field,
    prefix6: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawUplink {
    name: Field,
    interface: Field,
    gateway: Field,
    weight: Field,
    tier: Field,
    quota: Field,
    shape: Field,
    routed: Field,
    prefix6: Field,
    clamp_mss: Field,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    probe: Vec<Spanned<RawProbe>>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawHealth {
    interval: Field,
    timeout: Field,
    rise: Field,
    fall: Field,
    quorum: Field,
    max_loss_percent: Field,
    max_rtt: Field,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a table", deny_unknown_fields)]
struct RawProbe {
    kind: Field,
    target: Field,
    expect_status: Field,
    query: Field,
}

/// A parse or shape error from the toml crate, as a [`Problem`].
fn parse_problem(err: &toml::de::Error, text: &str, file: &str, syntax: bool) -> Problem {
    let (line, column) = match err.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            (Some(line), syntax.then_some(column))
        }
        None => (None, None),
    };
    let section = key_path(err).filter(|p| !p.is_empty());
    let mut message = if syntax {
        format!("syntax error: {}", err.message())
    } else {
        err.message().to_owned()
    };
    if let Some(section) = &section {
        if ["lan", "uplink", "uplink.probe"].contains(&section.as_str())
            && message.contains("expected a sequence")
        {
            message.push_str(&format!(
                "; write [[{section}]] (an array of tables), not [{section}]"
            ));
        }
    }
    Problem {
        file: file.to_owned(),
        line,
        column,
        section,
        key: None,
        message,
    }
}

/// The dotted key path of a shape error ("uplink.health").
///
/// toml 0.9's error keeps the path private and shows it, as a last line
/// "in `a.b`", only when it has no input to quote; so ask for that form.
fn key_path(err: &toml::de::Error) -> Option<String> {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let last = shown.lines().last()?;
    let path = last.strip_prefix("in `")?.strip_suffix('`')?;
    Some(path.to_owned())
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(before.get(line_start..).unwrap_or_default())
        .chars()
        .count()
        + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// Validation.

/// Walks the raw file, builds the output and collects problems. Where a value
/// is wrong it records a problem and carries on with a placeholder, so that
/// every problem is found; the output is only returned when there were none.
struct Checker<'a> {
    text: &'a str,
    file: &'a str,
    problems: Vec<Problem>,
}

/// Where a valid uplink name or interface was found, for cross-checks.
struct Seen {
    value: String,
    line: usize,
    span: Range<usize>,
}

impl Checker<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    fn report(
        &mut self,
        span: Option<&Range<usize>>,
        section: &str,
        key: Option<&str>,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.line(s));
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            column: None,
            section: Some(section.to_owned()),
            key: key.map(str::to_owned),
            message: message.into(),
        });
    }

    /// Converts an optional key with `convert`; `None` when it is absent or
    /// wrong (then a problem is recorded at the key's line).
    fn field<T>(
        &mut self,
        field: &Field,
        section: &str,
        key: &str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let spanned = field.as_ref()?;
        match convert(spanned.get_ref()) {
            Ok(value) => Some(value),
            Err(message) => {
                self.report(Some(&spanned.span()), section, Some(key), message);
                None
            }
        }
    }

    /// As [`Checker::field`], and a missing key is a problem at the line of
    /// its table's header (`table`).
    fn required<T>(
        &mut self,
        field: &Field,
        table: &Range<usize>,
        section: &str,
        key: &str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        if field.is_none() {
            self.report(Some(table), section, Some(key), "missing (required)");
            return None;
        }
        self.field(field, section, key, convert)
    }

    fn duration(&mut self, field: &Field, section: &str, key: &str) -> Option<Duration> {
        self.field(field, section, key, |v| {
            parse_duration(as_str(v)?).map_err(|e| e.to_string())
        })
    }

    /// A duration of at least `least`: shorter is taken for a typo (`1ms`
    /// for `1s`) that would take every uplink down or flood its targets.
    fn at_least(
        &mut self,
        field: &Field,
        section: &str,
        key: &str,
        least: Duration,
    ) -> Option<Duration> {
        self.field(field, section, key, |v| {
            let d = parse_duration(as_str(v)?).map_err(|e| e.to_string())?;
            if d < least {
                return Err(format!(
                    "{d:?} is shorter than {least:?}, the least lb takes"
                ));
            }
            Ok(d)
        })
    }

    /// A flow timeout: at least a second. The collector looks once a
    /// second, and a reply refreshes its flow's entry at most every 268 ms
    /// (`lb_common::maps::REPLY_TICK_SHIFT`): a shorter timeout would
    /// collect flows that are not idle.
    fn flow_timeout(&mut self, field: &Field, section: &str, key: &str) -> Option<Duration> {
        self.field(field, section, key, |v| {
            let d = parse_duration(as_str(v)?).map_err(|e| e.to_string())?;
            if d < Duration::from_secs(1) {
                return Err(format!(
                    "{d:?} is shorter than a second, the shortest flow timeout lb keeps"
                ));
            }
            Ok(d)
        })
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let daemon = raw
            .daemon
            .as_ref()
            .map_or_else(DaemonConfig::default, |d| self.daemon(d));
        let balance = raw
            .balance
            .as_ref()
            .map_or_else(BalanceConfig::default, |b| self.balance(b));
        let flows = raw
            .flows
            .as_ref()
            .map_or_else(FlowConfig::default, |f| self.flows(f));
        let nat = raw
            .nat
            .as_ref()
            .map_or_else(NatConfig::default, |n| self.nat(n));

        let routing = raw
            .routing
            .as_ref()
            .map_or_else(RoutingConfig::default, |r| self.routing(r));
        let metrics = raw.metrics.as_ref().and_then(|m| {
            self.field(&m.listen, "metrics", "listen", |v| {
                let text = as_str(v)?;
                let expected = || {
                    format!(
                        "expected ADDRESS:PORT with a port other than 0, like \"127.0.0.1:9725\", \
                         got {text:?}"
                    )
                };
                match text.parse::<std::net::SocketAddr>() {
                    // Port 0 is one the kernel picks: no scraper could find it.
                    Ok(addr) if addr.port() != 0 => Ok(addr),
                    _ => Err(expected()),
                }
            })
        });

        let passive = raw
            .passive
            .as_ref()
            .map_or_else(PassiveConfig::default, |p| self.passive(p));

        let mut lan_seen = Vec::new();
        let mut lans = Vec::new();
        for (i, lan) in raw.lan.iter().enumerate() {
            let (config, seen) = self.lan(i, lan);
            // lb translates one LAN prefix (NPTv6): a second would be
            // ignored, so it is refused.
            if config.prefix6.is_some() && lans.iter().any(|l: &LanConfig| l.prefix6.is_some()) {
                let span = lan.get_ref().prefix6.as_ref().map(Spanned::span);
                self.report(
                    span.as_ref(),
                    &format!("lan #{}", i + 1),
                    Some("prefix6"),
                    "a LAN before this one names its IPv6 prefix already; lb balances one \
                     LAN prefix: name it on one [[lan]] only",
                );
            }
            lans.push(config);
            lan_seen.extend(seen);
        }
        if raw.lan.is_empty() {
            self.report(
                None,
                "lan",
                None,
                "no [[lan]] section: at least one LAN interface is required",
            );
        }

        let mut names = Vec::new();
        let mut interfaces = Vec::new();
        let mut uplinks = Vec::new();
        for (i, uplink) in raw.uplink.iter().enumerate() {
            let (config, name, interface) = self.uplink(i, uplink);
            uplinks.push(config);
            names.extend(name);
            interfaces.extend(interface.map(|seen| (uplink_label(i, uplink.get_ref()), seen)));
        }
        if raw.uplink.is_empty() {
            self.report(
                None,
                "uplink",
                None,
                "no [[uplink]] section: at least one uplink is required",
            );
        }
        if let Some(extra) = raw.uplink.get(MAX_UPLINKS) {
            let section = uplink_label(MAX_UPLINKS, extra.get_ref());
            self.report(
                Some(&extra.span()),
                &section,
                None,
                format!(
                    "too many uplinks: at most {MAX_UPLINKS} are supported, this file has {}",
                    raw.uplink.len()
                ),
            );
        }

        self.cross_check(&lan_seen, &names, &interfaces);
        self.routed_apart(raw, &uplinks);
        self.prefixes6_apart(raw, &uplinks);
        let uplink_names: Vec<String> = uplinks.iter().map(|u| u.name.clone()).collect();
        let policies = self.policies(&raw.policy, &uplink_names);
        let mut warnings = Vec::new();
        let rules = self.rules(&raw.rule, &policies, &mut warnings);

        Config {
            daemon,
            balance,
            flows,
            nat,
            routing,
            metrics,
            passive,
            lans,
            uplinks,
            policies,
            rules,
            warnings,
            file: self.file.to_owned(),
        }
    }

    fn passive(&mut self, raw: &RawPassive) -> PassiveConfig {
        let d = PassiveConfig::default();
        let s = "passive";
        let boolean = |v: &Value| match v {
            Value::Boolean(b) => Ok(*b),
            other => Err(format!("expected true or false, got {}", describe(other))),
        };
        let bounded = |this: &mut Self, field: &Field, key: &str, lo: Duration, hi: Duration| {
            this.field(field, s, key, |v| {
                let d = parse_duration(as_str(v)?).map_err(|e| e.to_string())?;
                if (lo..=hi).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!("{d:?} is outside {lo:?}..={hi:?}"))
                }
            })
        };
        let ms = Duration::from_millis;
        PassiveConfig {
            enabled: self
                .field(&raw.enabled, s, "enabled", boolean)
                .unwrap_or(d.enabled),
            floor: bounded(self, &raw.floor, "floor", ms(10), ms(10_000)).unwrap_or(d.floor),
            rtt_factor: self
                .field(&raw.rtt_factor, s, "rtt_factor", |v| as_int(v, 1, 100))
                .unwrap_or(d.rtt_factor),
            burst: self
                .field(&raw.burst, s, "burst", |v| as_int(v, 1, 10))
                .unwrap_or(d.burst),
            burst_timeout: bounded(self, &raw.burst_timeout, "burst_timeout", ms(10), ms(5_000))
                .unwrap_or(d.burst_timeout),
            hold_down: bounded(self, &raw.hold_down, "hold_down", ms(1), ms(3_600_000))
                .unwrap_or(d.hold_down),
            resteer_syn: self
                .field(&raw.resteer_syn, s, "resteer_syn", boolean)
                .unwrap_or(d.resteer_syn),
        }
    }

    /// No IPv6 prefix delegated through two uplinks: a reply would not
    /// know whose it is.
    fn prefixes6_apart(&mut self, raw: &RawConfig, uplinks: &[UplinkConfig]) {
        for (i, u) in uplinks.iter().enumerate() {
            let Some((p, len)) = u.prefix6 else { continue };
            let earlier = uplinks[..i].iter().enumerate().find(|(_, o)| {
                o.prefix6.is_some_and(|(q, qlen)| {
                    let shorter = len.min(qlen);
                    mask6(p, shorter) == mask6(q, shorter)
                })
            });
            if let Some((j, other)) = earlier {
                let at = |k: usize| raw.uplink[k].get_ref().prefix6.as_ref().map(Spanned::span);
                let line = at(j).map_or(0, |s| self.line(&s));
                let (q, qlen) = other.prefix6.unwrap_or((p, len));
                let message = format!(
                    "{p}/{len} overlaps {q}/{qlen}, the prefix of uplink {:?} (line {line}); \
                     an IPv6 prefix is delegated through one uplink",
                    other.name
                );
                let section = uplink_label(i, raw.uplink[i].get_ref());
                self.report(at(i).as_ref(), &section, Some("prefix6"), message);
            }
        }
    }

    /// No prefix routed through two uplinks: the guard and the NAT of
    /// each would disagree on whose it is.
    fn routed_apart(&mut self, raw: &RawConfig, uplinks: &[UplinkConfig]) {
        for (i, u) in uplinks.iter().enumerate() {
            for r in &u.routed {
                let earlier = uplinks[..i].iter().find_map(|other| {
                    other
                        .routed
                        .iter()
                        .find(|o| o.overlaps(r.addr, r.len))
                        .map(|o| (other, o))
                });
                if let Some((other, o)) = earlier {
                    let span = raw.uplink[i].get_ref().routed.as_ref().map(Spanned::span);
                    let message = format!(
                        "{r} overlaps {o}, routed through uplink {:?} (line {}); a prefix is \
                         routed through one uplink",
                        other.name, o.line
                    );
                    let section = uplink_label(i, raw.uplink[i].get_ref());
                    self.report(span.as_ref(), &section, Some("routed"), message);
                }
            }
        }
    }

    /// Uniqueness across sections: LAN interfaces, uplink names, uplink
    /// interfaces, and no interface both LAN and uplink.
    fn cross_check(&mut self, lans: &[(String, Seen)], names: &[Seen], uplinks: &[(String, Seen)]) {
        for (i, (section, seen)) in lans.iter().enumerate() {
            if let Some((_, first)) = lans[..i].iter().find(|(_, s)| s.value == seen.value) {
                let message = format!(
                    "interface {:?} is already a LAN interface (line {})",
                    seen.value, first.line
                );
                self.report(Some(&seen.span), section, Some("interface"), message);
            }
        }
        for (i, seen) in names.iter().enumerate() {
            if let Some(first) = names[..i].iter().find(|s| s.value == seen.value) {
                let section = format!("uplink {:?}", seen.value);
                let message = format!(
                    "duplicate uplink name {:?} (first used on line {})",
                    seen.value, first.line
                );
                self.report(Some(&seen.span), &section, Some("name"), message);
            }
        }
        for (i, (section, seen)) in uplinks.iter().enumerate() {
            if let Some((_, lan)) = lans.iter().find(|(_, s)| s.value == seen.value) {
                let message = format!(
                    "interface {:?} is a LAN interface (line {}); an interface is either LAN or \
                     uplink",
                    seen.value, lan.line
                );
                self.report(Some(&seen.span), section, Some("interface"), message);
            } else if let Some((other, first)) =
                uplinks[..i].iter().find(|(_, s)| s.value == seen.value)
            {
                let message = format!(
                    "interface {:?} is already used by {other} (line {})",
                    seen.value, first.line
                );
                self.report(Some(&seen.span), section, Some("interface"), message);
            }
        }
    }

    fn daemon(&mut self, raw: &RawDaemon) -> DaemonConfig {
        let socket = self
            .field(&raw.socket, "daemon", "socket", |v| {
                let path = as_str(v)?;
                check_socket_path(path)?;
                Ok(PathBuf::from(path))
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        let hooks = self
            .field(&raw.hooks, "daemon", "hooks", |v| {
                let list = v.as_array().ok_or("must be a list of commands, each a list of strings")?;
                list.iter()
                    .map(|cmd| {
                        let argv: Vec<String> = cmd
                            .as_array()
                            .ok_or("each hook must be a list of strings: [\"/path/to/program\", \"arg\", ...]")?
                            .iter()
                            .map(|a| a.as_str().map(str::to_string).ok_or("hook arguments must be strings"))
                            .collect::<Result<_, _>>()?;
                        match argv.first() {
                            Some(program) if program.starts_with('/') => Ok(argv),
                            _ => Err("a hook starts with the program's absolute path (hooks run without a shell)"),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(str::to_string)
            })
            .unwrap_or_default();
        let hook_timeout = self
            .duration(&raw.hook_timeout, "daemon", "hook_timeout")
            .unwrap_or(DEFAULT_HOOK_TIMEOUT);
        let bpffs = self
            .field(&raw.bpffs, "daemon", "bpffs", |v| {
                let path = as_str(v)?;
                if !path.starts_with('/') {
                    return Err(format!("must be an absolute path on a bpffs, got {path:?}"));
                }
                Ok(PathBuf::from(path))
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS));
        let state_dir = self
            .field(&raw.state_dir, "daemon", "state_dir", |v| {
                let path = as_str(v)?;
                if !path.starts_with('/') {
                    return Err(format!("must be an absolute path, got {path:?}"));
                }
                Ok(PathBuf::from(path))
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        DaemonConfig {
            socket,
            hooks,
            hook_timeout,
            bpffs,
            state_dir,
        }
    }

    fn balance(&mut self, raw: &RawBalance) -> BalanceConfig {
        let mode = self
            .field(&raw.mode, "balance", "mode", |v| {
                let text = as_str(v)?;
                ClassifierMode::ALL
                    .into_iter()
                    .find(|m| m.as_str() == text)
                    .ok_or_else(|| {
                        format!(
                            "must be one of \"5-tuple\", \"src-dst-address\", \"src-address\"; \
                             got {text:?}"
                        )
                    })
            })
            .unwrap_or_default();
        BalanceConfig { mode }
    }

    fn flows(&mut self, raw: &RawFlows) -> FlowConfig {
        let default = FlowConfig::default();
        let s = "flows";
        FlowConfig {
            max: self
                .field(&raw.max, s, "max", |v| as_int(v, MIN_FLOWS, MAX_FLOWS))
                .unwrap_or(default.max),
            tcp_established_timeout: self
                .flow_timeout(&raw.tcp_established_timeout, s, "tcp_established_timeout")
                .unwrap_or(default.tcp_established_timeout),
            tcp_transitory_timeout: self
                .flow_timeout(&raw.tcp_transitory_timeout, s, "tcp_transitory_timeout")
                .unwrap_or(default.tcp_transitory_timeout),
            udp_timeout: self
                .flow_timeout(&raw.udp_timeout, s, "udp_timeout")
                .unwrap_or(default.udp_timeout),
            icmp_timeout: self
                .flow_timeout(&raw.icmp_timeout, s, "icmp_timeout")
                .unwrap_or(default.icmp_timeout),
        }
    }

    fn nat(&mut self, raw: &RawNat) -> NatConfig {
        self.field(&raw.port_range, "nat", "port_range", |v| {
            parse_port_range(as_str(v)?)
        })
        .map_or_else(NatConfig::default, |(port_min, port_max)| NatConfig {
            port_min,
            port_max,
        })
    }

    fn routing(&mut self, raw: &RawRouting) -> RoutingConfig {
        let default = RoutingConfig::default();
        let s = "routing";
        // Room for every uplink's table after the first, below the
        // reserved ones at the top of the 32-bit range.
        let span = MAX_UPLINKS as u32;
        let first_table = self
            .field(&raw.first_table, s, "first_table", |v| {
                let t: u32 = as_int(v, 1, u32::MAX - span)?;
                match RESERVED_TABLES
                    .iter()
                    .find(|&&r| (t..t + span).contains(&r))
                {
                    Some(r) => Err(format!(
                        "tables {t}..{} would take reserved table {r} (main is 254, local 255, \
                         default 253); pick one clear of 252..=255, e.g. {DEFAULT_FIRST_TABLE}",
                        t + span - 1
                    )),
                    None => Ok(t),
                }
            })
            .unwrap_or(default.first_table);
        let first_priority = self
            .field(&raw.first_priority, s, "first_priority", |v| {
                // Rules at 32766 and up are the main and default tables';
                // lbd's take one per uplink and four after them.
                as_int(v, 1, 32766 - span - 4)
            })
            .unwrap_or(default.first_priority);
        let lookup_tables = self
            .field(&raw.lookup_tables, s, "lookup_tables", |v| {
                let list = v
                    .as_array()
                    .ok_or("must be a list of table numbers, e.g. [100, 200]")?;
                list.iter()
                    .map(|t| as_int::<u32>(t, 1, u32::MAX))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_default();
        RoutingConfig {
            first_table,
            first_priority,
            lookup_tables,
        }
    }

    fn lan(&mut self, index: usize, raw: &Spanned<RawLan>) -> (LanConfig, Option<(String, Seen)>) {
        let section = format!("lan #{}", index + 1);
        let interface = self.required(
            &raw.get_ref().interface,
            &raw.span(),
            &section,
            "interface",
            |v| {
                let name = as_str(v)?;
                check_ifname(name)?;
                Ok(name.to_owned())
            },
        );
        let prefix6 = self.field(&raw.get_ref().prefix6, &section, "prefix6", |v| {
            parse_prefix6(as_str(v)?)
        });
        let seen = match (&interface, &raw.get_ref().interface) {
            (Some(name), Some(field)) => Some((section, self.seen(name, field))),
            _ => None,
        };
        (
            LanConfig {
                interface: interface.unwrap_or_default(),
                prefix6,
            },
            seen,
        )
    }

    fn seen(&self, value: &str, field: &Spanned<Value>) -> Seen {
        let span = field.span();
        Seen {
            value: value.to_owned(),
            line: self.line(&span),
            span,
        }
    }

    /// One uplink, and where its valid name and interface were found.
    fn uplink(
        &mut self,
        index: usize,
        raw: &Spanned<RawUplink>,
    ) -> (UplinkConfig, Option<Seen>, Option<Seen>) {
        let table = raw.span();
        let u = raw.get_ref();
        let section = uplink_label(index, u);
        let s = section.as_str();

        let name = self.required(&u.name, &table, s, "name", |v| {
            let name = as_str(v)?;
            check_uplink_name(name)?;
            Ok(name.to_owned())
        });
        let interface = self.required(&u.interface, &table, s, "interface", |v| {
            let name = as_str(v)?;
            check_ifname(name)?;
            Ok(name.to_owned())
        });
        let gateway = self
            .field(&u.gateway, s, "gateway", |v| {
                let text = as_str(v)?;
                if text == "auto" {
                    return Ok(Gateway::Auto);
                }
                let ip = text
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("expected an IPv4 address or \"auto\", got {text:?}"))?;
                check_unicast(ip)?;
                Ok(Gateway::Fixed(ip))
            })
            .unwrap_or(Gateway::Auto);
        let weight = self
            .field(&u.weight, s, "weight", |v| as_int(v, 1, MAX_WEIGHT))
            .unwrap_or(1);
        let tier = self
            .field(&u.tier, s, "tier", |v| as_int(v, 0, MAX_TIER))
            .unwrap_or(0);
        let clamp_mss = self
            .field(&u.clamp_mss, s, "clamp_mss", |v| match v {
                Value::Boolean(b) => Ok(*b),
                other => Err(format!("expected true or false, got {}", describe(other))),
            })
            .unwrap_or(true);
        let quota = self.field(&u.quota, s, "quota", parse_quota);
        let shape = self
            .field(&u.shape, s, "shape", parse_shape)
            .unwrap_or_default();
        let routed_line = u.routed.as_ref().map_or(0, |f| self.line(&f.span()));
        let routed = self
            .field(&u.routed, s, "routed", |v| {
                let list = v
                    .as_array()
                    .ok_or("must be a list of prefixes, e.g. [\"203.0.113.8/29\"]")?;
                list.iter()
                    .map(|p| {
                        let (addr, len) = parse_prefix(as_str(p)?)?;
                        Ok(Routed {
                            addr,
                            len,
                            line: routed_line,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .unwrap_or_default();

        let prefix6 = self.field(&u.prefix6, s, "prefix6", |v| parse_prefix6(as_str(v)?));

        // Valid probes with their place in the file.
        let mut probes: Vec<(usize, ProbeConfig)> = Vec::new();
        for (i, probe) in u.probe.iter().enumerate() {
            let probe_section = format!("{section} probe #{}", i + 1);
            let Some(config) = self.probe(&probe_section, probe) else {
                continue;
            };
            if let Some((first, _)) = probes.iter().find(|(_, p)| *p == config) {
                let target = probe.get_ref().target.as_ref().map(Spanned::span);
                self.report(
                    target.as_ref(),
                    &probe_section,
                    Some("target"),
                    format!("the same probe as probe #{}", first + 1),
                );
            }
            probes.push((i, config));
        }

        let health = match &u.health {
            Some(h) => {
                let ipv6 = probes.iter().filter(|(_, p)| p.kind.is_ipv6()).count();
                let families = (probes.len() - ipv6, ipv6);
                self.health(&section, h.get_ref(), u.probe.len(), families)
            }
            None => HealthConfig::default(),
        };

        let name_seen = match (&name, &u.name) {
            (Some(n), Some(field)) => Some(self.seen(n, field)),
            _ => None,
        };
        let interface_seen = match (&interface, &u.interface) {
            (Some(n), Some(field)) => Some(self.seen(n, field)),
            _ => None,
        };
        let config = UplinkConfig {
            name: name.unwrap_or_default(),
            interface: interface.unwrap_or_default(),
            gateway,
            weight,
            tier,
            health,
            probes: probes.into_iter().map(|(_, p)| p).collect(),
            quota,
            shape,
            routed,
            prefix6,
            clamp_mss,
        };
        (config, name_seen, interface_seen)
    }

    /// `probes` counts the uplink's probes as written, `families` those
    /// that parsed, IPv4's and IPv6's: each family's are judged apart.
    fn health(
        &mut self,
        uplink: &str,
        raw: &RawHealth,
        probes: usize,
        families: (usize, usize),
    ) -> HealthConfig {
        let section = format!("{uplink} health");
        let s = section.as_str();
        let default = HealthConfig::default();
        let interval = self.at_least(&raw.interval, s, "interval", MIN_PROBE_INTERVAL);
        let timeout = self.at_least(&raw.timeout, s, "timeout", MIN_PROBE_TIMEOUT);
        let rise = self.field(&raw.rise, s, "rise", |v| as_int(v, 1, MAX_RISE_FALL));
        let fall = self.field(&raw.fall, s, "fall", |v| as_int(v, 1, MAX_RISE_FALL));
        // With no probes the quorum is unused, but only its default makes
        // sense. Each family's probes make their own rounds, so the
        // quorum is met by one family's alone (probes that did not parse
        // are reported already, and counted so as not to add to that).
        let (ipv4, ipv6) = families;
        let unparsed = probes.saturating_sub(ipv4 + ipv6);
        let most = u32::try_from((ipv4.max(ipv6) + unparsed).max(1)).unwrap_or(u32::MAX);
        let quorum = self.field(&raw.quorum, s, "quorum", |v| {
            let n = as_int::<i64>(v, i64::MIN, i64::MAX)?;
            match u32::try_from(n) {
                Ok(q) if (1..=most).contains(&q) => Ok(q),
                _ if probes == 0 => Err(format!(
                    "must be 1 when the uplink has no probes (health then follows the link \
                     state), got {n}"
                )),
                _ if ipv4 > 0 && ipv6 > 0 => Err(format!(
                    "must be between 1 and {most}, the probes of its larger family ({ipv4} \
                     IPv4, {ipv6} IPv6: each family's rounds count its own), got {n}"
                )),
                _ => Err(format!(
                    "must be between 1 and the number of probes ({most}), got {n}"
                )),
            }
        });
        // 100 % lost could never be exceeded.
        let max_loss_percent = self.field(&raw.max_loss_percent, s, "max_loss_percent", |v| {
            as_int(v, 0u8, 99)
        });
        let max_rtt = self.duration(&raw.max_rtt, s, "max_rtt");
        // An answer slower than the timeout counts as lost, so no round
        // trip time can reach a limit at or above it.
        let limit_timeout = timeout
            .filter(|_| raw.timeout.is_some())
            .unwrap_or(default.timeout);
        if let (Some(rtt), Some(field)) = (max_rtt, &raw.max_rtt) {
            if rtt >= limit_timeout {
                self.report(
                    Some(&field.span()),
                    s,
                    Some("max_rtt"),
                    format!(
                        "{rtt:?} is not below the probes' timeout ({limit_timeout:?}): an answer \
                         that slow counts as lost, so this limit could never be reached; lower \
                         it or raise timeout"
                    ),
                );
            }
        }

        let health = HealthConfig {
            interval: interval.unwrap_or(default.interval),
            timeout: timeout.unwrap_or(default.timeout),
            rise: rise.unwrap_or(default.rise),
            fall: fall.unwrap_or(default.fall),
            quorum: quorum.unwrap_or(default.quorum),
            max_loss_percent,
            max_rtt,
        };
        let limit = health.interval.saturating_mul(MAX_TIMEOUT_INTERVALS);
        // Only when both are valid (or defaulted), and on the key that was set.
        let both_ok = raw.interval.is_none() == interval.is_none()
            && raw.timeout.is_none() == timeout.is_none();
        if both_ok && health.timeout > limit {
            let (key, field) = match (&raw.timeout, &raw.interval) {
                (Some(t), _) => ("timeout", t),
                (None, Some(i)) => ("interval", i),
                // Both defaulted: the defaults satisfy the rule.
                (None, None) => return health,
            };
            let message = format!(
                "timeout {:?}{} must be at most {MAX_TIMEOUT_INTERVALS} x interval ({:?})",
                health.timeout,
                if raw.timeout.is_none() {
                    " (the default; set timeout too)"
                } else {
                    ""
                },
                health.interval,
            );
            self.report(Some(&field.span()), s, Some(key), message);
        }
        health
    }

    fn probe(&mut self, section: &str, raw: &Spanned<RawProbe>) -> Option<ProbeConfig> {
        let table = raw.span();
        let p = raw.get_ref();
        let kind = self.required(&p.kind, &table, section, "kind", |v| {
            let text = as_str(v)?;
            match text {
                "icmp" | "tcp" | "http" | "dns" => Ok(text.to_owned()),
                _ => Err(format!(
                    "must be one of \"icmp\", \"tcp\", \"http\", \"dns\"; got {text:?}"
                )),
            }
        });
        let kind = kind.as_deref();
        let is_http = kind == Some("http");
        let is_dns = kind == Some("dns");

        // Keys that belong to one kind only (when the kind is known).
        if let (Some(kind), Some(field)) = (kind, &p.expect_status) {
            if !is_http {
                let message = format!("only for kind = \"http\", not {kind:?}");
                self.report(Some(&field.span()), section, Some("expect_status"), message);
            }
        }
        if let (Some(kind), Some(field)) = (kind, &p.query) {
            if !is_dns {
                let message = format!("only for kind = \"dns\", not {kind:?}");
                self.report(Some(&field.span()), section, Some("query"), message);
            }
        }
        let expect_status = if is_http {
            self.field(&p.expect_status, section, "expect_status", |v| {
                as_int(v, 100u16, 599)
            })
        } else {
            None
        };
        let query = if is_dns {
            self.required(&p.query, &table, section, "query", |v| {
                let name = as_str(v)?;
                check_dns_name(name)?;
                Ok(name.to_owned())
            })
        } else {
            None
        };

        let kind = match kind {
            Some(kind) => kind,
            None => {
                // Without a kind the target cannot be checked; still require it.
                if p.target.is_none() {
                    self.report(Some(&table), section, Some("target"), "missing (required)");
                }
                return None;
            }
        };
        let target = self.required(&p.target, &table, section, "target", |v| {
            let text = as_str(v)?;
            match kind {
                "icmp" => parse_icmp_target(text).map(|target| ProbeKind::Icmp { target }),
                "tcp" => parse_tcp_target(text).map(|target| ProbeKind::Tcp { target }),
                "http" => parse_http_target(text).map(|(target, host, path)| ProbeKind::Http {
                    target,
                    host,
                    path,
                    expect_status: 200,
                }),
                _ => parse_dns_target(text).map(|server| ProbeKind::Dns {
                    server,
                    query: String::new(),
                }),
            }
        })?;
        let kind = match target {
            ProbeKind::Http {
                target, host, path, ..
            } => ProbeKind::Http {
                target,
                host,
                path,
                expect_status: expect_status.unwrap_or(200),
            },
            ProbeKind::Dns { server, .. } => ProbeKind::Dns {
                server,
                query: query?,
            },
            other => other,
        };
        Some(ProbeConfig { kind })
    }
}

/// How messages name uplink `index`: by its name when it has a string one.
fn uplink_label(index: usize, raw: &RawUplink) -> String {
    match raw.name.as_ref().map(Spanned::get_ref) {
        Some(Value::String(name)) => format!("uplink {name:?}"),
        _ => format!("uplink #{}", index + 1),
    }
}

// ---------------------------------------------------------------------------
// Value checks: pure, each returns the message of a problem.

fn describe(value: &Value) -> String {
    match value {
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
        _ => format!("{} {value}", value.type_str()),
    }
}

/// `quota = { bytes = "500GB", period = "month", reset_day = 1, action = "drain" }`:
/// `bytes` required; a month from day 1, a week from Monday (1); drain.
fn parse_quota(value: &Value) -> Result<QuotaConfig, String> {
    const SHAPE: &str =
        "write quota = { bytes = \"500GB\", period = \"month\", reset_day = 1, action = \"drain\" }";
    let Value::Table(table) = value else {
        return Err(format!(
            "expected a table, got {}; {SHAPE}",
            describe(value)
        ));
    };
    if let Some(key) = table
        .keys()
        .find(|k| !["bytes", "period", "reset_day", "action"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown key {key:?} (bytes, period, reset_day, action)"
        ));
    }
    let bytes = table
        .get("bytes")
        .ok_or_else(|| format!("the volume is missing; {SHAPE}"))
        .and_then(|v| as_str(v).map_err(|e| format!("bytes: {e}")))
        .and_then(|t| parse_bytes(t).map_err(|e| format!("bytes: {e}")))?;
    let period = match table.get("period").map(as_str).transpose()? {
        None | Some("month") => Period::Month,
        Some("week") => Period::Week,
        Some("day") => Period::Day,
        Some(other) => {
            return Err(format!(
                "period: expected \"day\", \"week\" or \"month\", got {other:?}"
            ))
        }
    };
    let most = match period {
        Period::Month => 28,
        Period::Week => 7,
        Period::Day => 1,
    };
    let reset_day = match table.get("reset_day") {
        None => 1,
        Some(v) => as_int(v, 1, most).map_err(|e| {
            format!(
                "reset_day: {e} (a month's day 1..=28, a week's 1 = Monday..=7; a day has none)"
            )
        })?,
    };
    let action = match table.get("action").map(as_str).transpose()? {
        None | Some("drain") => Action::Drain,
        Some("disable") => Action::Disable,
        Some(other) => {
            return Err(format!(
                "action: expected \"drain\" or \"disable\", got {other:?}"
            ))
        }
    };
    Ok(QuotaConfig {
        bytes,
        period,
        reset_day,
        action,
    })
}

/// `[uplink.shape]` with `upload` and/or `download` rates (`"20mbit"`).
fn parse_shape(value: &Value) -> Result<Shape, String> {
    let Value::Table(table) = value else {
        return Err(format!(
            "expected a table, got {}; write [uplink.shape] with upload = \"20mbit\" and/or download = \"20mbit\"",
            describe(value)
        ));
    };
    if let Some(key) = table
        .keys()
        .find(|k| !["upload", "download"].contains(&k.as_str()))
    {
        return Err(format!("unknown key {key:?} (upload, download)"));
    }
    let rate = |key: &str| -> Result<Option<u64>, String> {
        table
            .get(key)
            .map(|v| {
                as_str(v)
                    .and_then(parse_rate)
                    .map_err(|e| format!("{key}: {e}"))
            })
            .transpose()
    };
    let shape = Shape {
        upload: rate("upload")?,
        download: rate("download")?,
    };
    if shape == Shape::default() {
        return Err("neither upload nor download is set".into());
    }
    Ok(shape)
}

fn as_str(value: &Value) -> Result<&str, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(format!("expected a string, got {}", describe(other))),
    }
}

/// An integer in `lo..=hi`.
fn as_int<T>(value: &Value, lo: T, hi: T) -> Result<T, String>
where
    T: Copy + Into<i64> + TryFrom<i64> + fmt::Display,
{
    let Value::Integer(n) = value else {
        return Err(format!("expected an integer, got {}", describe(value)));
    };
    let n = *n;
    if n < lo.into() || n > hi.into() {
        return Err(format!("must be between {lo} and {hi}, got {n}"));
    }
    T::try_from(n).map_err(|_| format!("must be between {lo} and {hi}, got {n}"))
}

/// `"MIN-MAX"` within [`MIN_NAT_PORT`]..=65535, `MIN <= MAX`.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let shape = || format!("expected \"MIN-MAX\" like \"20000-29999\", got {text:?}");
    let (lo, hi) = text.split_once('-').ok_or_else(shape)?;
    let port = |s: &str| -> Result<u16, String> {
        let n: u32 = s.trim().parse().map_err(|_| shape())?;
        u16::try_from(n)
            .ok()
            .filter(|&p| p >= MIN_NAT_PORT)
            .ok_or_else(|| format!("ports must be between {MIN_NAT_PORT} and 65535, got {n}"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!(
            "the first port must not be above the second, got {lo}-{hi}"
        ));
    }
    Ok((lo, hi))
}

/// The kernel's rule for interface names (`dev_valid_name`): 1..=15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace; and no control characters.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(format!(
            "an interface name has 1 to {MAX_IFNAME_LEN} bytes, got {name:?} ({} bytes)",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "an interface name cannot contain {c:?}, got {name:?}"
        ));
    }
    Ok(())
}

fn check_uplink_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > MAX_UPLINK_NAME_LEN || !valid_chars {
        return Err(format!(
            "must be 1 to {MAX_UPLINK_NAME_LEN} characters of a-z, 0-9, '_' and '-', got {name:?}"
        ));
    }
    Ok(())
}

fn check_socket_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("must be an absolute path, got {path:?}"));
    }
    if path.len() > MAX_SOCKET_PATH_LEN || path.contains('\0') {
        return Err(format!(
            "a Unix socket path has at most {MAX_SOCKET_PATH_LEN} bytes and no NUL, got {} bytes",
            path.len()
        ));
    }
    Ok(())
}

/// `ADDRESS/LENGTH` of IPv6, length 1..=64 (NPTv6 translates prefixes of
/// a /64 or shorter: the interface identifier is the host's), no host bits
/// set.
fn parse_prefix6(text: &str) -> Result<(Ipv6Addr, u8), String> {
    let bad = || format!("expected an IPv6 prefix like \"2001:db8:1::/56\", got {text:?}");
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(1..=64).contains(&len) {
        return Err(format!(
            "{text:?}: the length must be between 1 and 64 (a network's prefix: hosts keep the \
             other 64 bits)"
        ));
    }
    let network = mask6(addr, len);
    if network != addr {
        return Err(format!(
            "{text:?} has host bits set; the prefix is {network}/{len}"
        ));
    }
    Ok((addr, len))
}

/// `addr` with the bits past `len` cleared.
pub(crate) fn mask6(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    Ipv6Addr::from(u128::from(addr) & mask)
}

/// A gateway or probe target must be a unicast address.
/// `ADDRESS/LENGTH`, length 1..=32, no host bits set.
fn parse_prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("expected a prefix like \"203.0.113.8/29\", got {text:?}");
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&len) {
        return Err(format!(
            "{text:?}: the length must be between 1 and 32 (a routed prefix is never the \
             whole internet)"
        ));
    }
    let network = Ipv4Addr::from(prefix_bits(addr, len));
    if network != addr {
        return Err(format!(
            "{text:?} has host bits set; the prefix is {network}/{len}"
        ));
    }
    Ok((addr, len))
}

fn check_unicast(ip: Ipv4Addr) -> Result<(), String> {
    let what = if ip.is_unspecified() {
        "the unspecified address"
    } else if ip.is_broadcast() {
        "the broadcast address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else {
        return Ok(());
    };
    Err(format!("{ip} is {what}; expected a unicast address"))
}

/// A name to ask for: 1..=253 bytes, labels of 1..=63 letters, digits, '-'
/// or '_', an optional final dot.
fn check_dns_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "expected a domain name like \"example.com\", got {name:?}"
        ))
    }
}

/// A probe target must be a unicast address; an IPv6 one also global or
/// unique-local, since a link-local one would need an interface to mean
/// anything.
fn check_unicast_ip(ip: IpAddr) -> Result<(), String> {
    let ip = match ip {
        IpAddr::V4(v4) => return check_unicast(v4),
        IpAddr::V6(v6) => v6,
    };
    let what = if ip.is_unspecified() {
        "the unspecified address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_loopback() {
        "the loopback address"
    } else if ip.is_unicast_link_local() {
        "link-local (it names no path beyond the uplink's link)"
    } else if ip.to_ipv4_mapped().is_some() {
        "an IPv4-mapped address (write the IPv4 address itself)"
    } else {
        return Ok(());
    };
    Err(format!("{ip} is {what}; expected a unicast address"))
}

fn parse_ip(text: &str, shape: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("expected {shape}, got {text:?}"))?;
    check_unicast_ip(ip)?;
    Ok(ip)
}

/// `IPv4:port` or `[IPv6]:port`, or the bare address with `default_port`
/// when there is one.
fn parse_socket(text: &str, shape: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    let bad = || format!("expected {shape}, got {text:?}");
    let bare = |t: &str| -> Option<IpAddr> {
        let inner = t.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
        inner.unwrap_or(t).parse().ok()
    };
    let addr = match (text.parse::<SocketAddr>(), default_port) {
        (Ok(addr), _) => addr,
        (Err(_), Some(port)) => SocketAddr::new(bare(text).ok_or_else(bad)?, port),
        (Err(_), None) => return Err(bad()),
    };
    if addr.port() == 0 {
        return Err(format!("port 0 is not a valid target port, in {text:?}"));
    }
    check_unicast_ip(addr.ip())?;
    Ok(addr)
}

fn parse_icmp_target(text: &str) -> Result<IpAddr, String> {
    parse_ip(
        text,
        "an IP address like \"198.51.100.10\" or \"2001:db8::10\"",
    )
}

fn parse_tcp_target(text: &str) -> Result<SocketAddr, String> {
    parse_socket(
        text,
        "IPv4:port like \"198.51.100.10:443\" or [IPv6]:port like \"[2001:db8::10]:443\"",
        None,
    )
}

fn parse_dns_target(text: &str) -> Result<SocketAddr, String> {
    parse_socket(
        text,
        "the resolver as an IP address with an optional port, like \"198.51.100.10\", \
         \"198.51.100.10:53\" or \"[2001:db8::53]:53\"",
        Some(53),
    )
}

/// `http://IPv4[:port][/path]` or `http://[IPv6][:port][/path]` into
/// (address, Host header, path); the path defaults to `/`.
fn parse_http_target(text: &str) -> Result<(SocketAddr, String, String), String> {
    let shape = "http://IP[:port]/path like \"http://198.51.100.10/health\" or \
                 \"http://[2001:db8::10]/health\"";
    let Some(rest) = text.strip_prefix("http://") else {
        return Err(if text.starts_with("https://") {
            format!("https is not supported, use http://; got {text:?}")
        } else {
            format!("expected {shape}, got {text:?}")
        });
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(host, _)| host),
        None => authority
            .split_once(':')
            .map_or(authority, |(host, _)| host),
    };
    let target = parse_socket(authority, shape, Some(80)).map_err(|e| {
        // A name, not a mangled address: letters beyond hex digits.
        let named = host
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && !b.is_ascii_hexdigit());
        if named && !host.contains('@') {
            format!("the host must be an IP address (probes do not resolve names), got {host:?}")
        } else {
            e
        }
    })?;
    if let Some(c) = path.chars().find(|&c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the path cannot contain {c:?}, in {text:?}"));
    }
    Ok((target, authority.to_owned(), path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/lbd.toml");

    const MINIMAL: &str = r#"
[[lan]]
interface = "lan0"

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"
"#;

    /// One LAN and two uplinks; tests append to it or replace in it.
    const TWO: &str = r#"[[lan]]
interface = "lan0"

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"

[[uplink]]
name = "isp2"
interface = "wan2"
gateway = "100.64.2.1"
"#;

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, "t.toml") {
            Ok(config) => panic!("expected problems, got {config:#?}"),
            Err(err) => err.problems().to_vec(),
        }
    }

    /// The 1-based line of the `nth` (0-based) line that contains `needle`.
    fn line_of_nth(text: &str, needle: &str, nth: usize) -> usize {
        text.lines()
            .enumerate()
            .filter(|(_, line)| line.contains(needle))
            .nth(nth)
            .map(|(i, _)| i + 1)
            .unwrap_or_else(|| panic!("{needle:?} not in the text"))
    }

    fn line_of(text: &str, needle: &str) -> usize {
        line_of_nth(text, needle, 0)
    }

    /// Asserts that `text` has exactly one problem, on `line`, naming `key`
    /// (as "key KEY:") and saying `says`; returns the rendered message.
    fn assert_one(text: &str, line: usize, key: &str, says: &str) -> String {
        let found = problems(text);
        let rendered: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 1, "{rendered:#?}");
        let message = &rendered[0];
        assert!(
            message.starts_with(&format!("t.toml:{line}: ")),
            "line {line}: {message}"
        );
        assert!(
            message.contains(&format!("key {key}: ")),
            "key {key}: {message}"
        );
        assert!(message.contains(says), "{says:?}: {message}");
        assert_eq!(found[0].line, Some(line));
        assert_eq!(found[0].key.as_deref(), Some(key));
        message.clone()
    }

    fn ok(text: &str) -> Config {
        parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn example_parses() {
        let config = ok(EXAMPLE);
        assert_eq!(config.daemon.socket, PathBuf::from("/run/lb/lbd.sock"));
        assert_eq!(config.balance.mode, ClassifierMode::FiveTuple);
        assert_eq!(config.flows, FlowConfig::default());
        assert_eq!(config.nat, NatConfig::default());
        assert_eq!(
            config.lans,
            [LanConfig {
                interface: "br-lan".into(),
                prefix6: None,
            }]
        );
        assert_eq!(config.routing, RoutingConfig::default());
        assert_eq!(config.uplinks.len(), 3);
        let icmp = ProbeConfig {
            kind: ProbeKind::Icmp {
                target: Ipv4Addr::new(198, 51, 100, 10).into(),
            },
        };
        for (uplink, (name, interface)) in
            config
                .uplinks
                .iter()
                .zip([("isp1", "wan1"), ("isp2", "wan2"), ("isp3", "wan3")])
        {
            assert_eq!(uplink.name, name);
            assert_eq!(uplink.interface, interface);
            assert_eq!(uplink.gateway, Gateway::Auto);
            assert_eq!((uplink.weight, uplink.tier), (1, 0));
            assert_eq!(uplink.health, HealthConfig::default());
            assert_eq!(uplink.probes, std::slice::from_ref(&icmp));
        }
    }

    #[test]
    fn example_probe_kinds_in_comments_parse() {
        // The commented-out keys of the example are valid too.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|line| {
                let Some(rest) = line.strip_prefix("# ") else {
                    return line;
                };
                let is_key = rest.split_once(" = ").is_some_and(|(key, _)| {
                    key.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                });
                if is_key
                    || rest.starts_with("[[uplink.probe]]")
                    || rest.starts_with("[uplink.shape]")
                    || rest.starts_with("[[policy]]")
                    || rest.starts_with("[[rule]]")
                {
                    rest
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = ok(&uncommented);
        assert_eq!(config.policies.len(), 3);
        assert_eq!(config.rules.len(), 5);
        assert_eq!(config.uplinks[0].shape.upload, Some(20_000_000));
        assert_eq!(config.uplinks[0].shape.download, Some(100_000_000));
        let isp2 = &config.uplinks[1];
        assert_eq!(isp2.probes.len(), 5);
        assert!(isp2.probes[4].kind.is_ipv6());
        assert!(config.uplinks[0].prefix6.is_some());
        assert!(config.lans[0].prefix6.is_some());
        assert_eq!(
            isp2.probes[2].kind,
            ProbeKind::Http {
                target: "198.51.100.10:8080".parse().expect("address"),
                host: "198.51.100.10:8080".into(),
                path: "/health".into(),
                expect_status: 200,
            }
        );
        assert_eq!(
            isp2.probes[3].kind,
            ProbeKind::Dns {
                server: "198.51.100.10:53".parse().expect("address"),
                query: "example.com".into(),
            }
        );
        assert_eq!(config.uplinks[0].health.max_loss_percent, Some(20));
        assert_eq!(
            config.uplinks[0].health.max_rtt,
            Some(Duration::from_millis(200))
        );
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let config = ok(MINIMAL);
        assert_eq!(config.daemon, DaemonConfig::default());
        assert_eq!(config.daemon.socket, PathBuf::from("/run/lb/lbd.sock"));
        assert_eq!(config.balance.mode, ClassifierMode::FiveTuple);
        assert_eq!(
            config.flows,
            FlowConfig {
                max: 65536,
                tcp_established_timeout: Duration::from_secs(7200),
                tcp_transitory_timeout: Duration::from_secs(240),
                udp_timeout: Duration::from_secs(300),
                icmp_timeout: Duration::from_secs(60),
            }
        );
        assert_eq!(
            config.nat,
            NatConfig {
                port_min: 20000,
                port_max: 29999
            }
        );
        assert_eq!(
            config.uplinks,
            [UplinkConfig {
                name: "isp1".into(),
                interface: "wan1".into(),
                gateway: Gateway::Fixed(Ipv4Addr::new(100, 64, 1, 1)),
                weight: 1,
                tier: 0,
                health: HealthConfig {
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    rise: 5,
                    fall: 3,
                    quorum: 1,
                    max_loss_percent: None,
                    max_rtt: None,
                },
                probes: vec![],
                quota: None,
                shape: Shape::default(),
                routed: vec![],
                prefix6: None,
                clamp_mss: true,
            }]
        );
    }

    #[test]
    fn mss_clamping_is_on_unless_turned_off() {
        let config = ok(&format!("{TWO}clamp_mss = false\n"));
        assert!(config.uplinks[0].clamp_mss);
        assert!(!config.uplinks[1].clamp_mss);
        let text = format!("{TWO}clamp_mss = 1\n");
        assert_one(
            &text,
            line_of(&text, "clamp_mss"),
            "clamp_mss",
            "expected true or false",
        );
    }

    #[test]
    fn ipv6_prefixes_are_networks_of_a_64_or_shorter_on_one_uplink() {
        let text = format!("{TWO}prefix6 = \"2001:db8:2::/48\"\n");
        let config = ok(&text);
        assert_eq!(
            config.uplinks[1].prefix6,
            Some(("2001:db8:2::".parse().expect("address"), 48))
        );
        assert_eq!(config.uplinks[0].prefix6, None);
        let long = format!("{TWO}prefix6 = \"2001:db8:2::/80\"\n");
        assert_one(
            &long,
            line_of(&long, "prefix6"),
            "prefix6",
            "between 1 and 64",
        );
        let host = format!("{TWO}prefix6 = \"2001:db8:2::1/64\"\n");
        assert_one(
            &host,
            line_of(&host, "prefix6"),
            "prefix6",
            "2001:db8:2::/64",
        );
        let lan = "[[lan]]\ninterface = \"br-lan\"\nprefix6 = \"2001:db8:1:100::/72\"\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\n";
        assert_one(lan, line_of(lan, "prefix6"), "prefix6", "between 1 and 64");
        let twice = format!(
            "{TWO}prefix6 = \"2001:db8:2::/48\"\n[[uplink]]\nname = \"isp3\"\ninterface = \"wan3\"\nprefix6 = \"2001:db8:2:100::/56\"\n"
        );
        assert_one(
            &twice,
            line_of_nth(&twice, "prefix6", 1),
            "prefix6",
            "the prefix of uplink \"isp2\"",
        );
    }

    #[test]
    fn routed_prefixes_are_read_and_must_be_networks_on_one_uplink() {
        let text = format!("{TWO}routed = [\"203.0.113.8/29\", \"198.18.0.0/24\"]\n");
        let config = ok(&text);
        let routed: Vec<String> = config.uplinks[1]
            .routed
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(routed, ["203.0.113.8/29", "198.18.0.0/24"]);
        assert_eq!(config.uplinks[1].routed[0].line, line_of(&text, "routed"));
        assert!(config.uplinks[0].routed.is_empty());

        let host_bits = format!("{TWO}routed = [\"203.0.113.9/29\"]\n");
        assert_one(
            &host_bits,
            line_of(&host_bits, "routed"),
            "routed",
            "the prefix is 203.0.113.8/29",
        );
        let everything = format!("{TWO}routed = [\"0.0.0.0/0\"]\n");
        assert_one(
            &everything,
            line_of(&everything, "routed"),
            "routed",
            "between 1 and 32",
        );
        let not_a_list = format!("{TWO}routed = \"203.0.113.8/29\"\n");
        assert_one(
            &not_a_list,
            line_of(&not_a_list, "routed"),
            "routed",
            "list of prefixes",
        );
    }

    #[test]
    fn a_prefix_routed_through_two_uplinks_is_refused_where_it_comes_again() {
        let text = TWO
            .replace(
                "gateway = \"100.64.1.1\"\n",
                "gateway = \"100.64.1.1\"\nrouted = [\"203.0.113.0/28\"]\n",
            )
            .replace(
                "gateway = \"100.64.2.1\"\n",
                "gateway = \"100.64.2.1\"\nrouted = [\"203.0.113.8/29\"]\n",
            );
        let message = assert_one(
            &text,
            line_of_nth(&text, "routed", 1),
            "routed",
            "overlaps 203.0.113.0/28",
        );
        assert!(message.contains("uplink \"isp1\""), "{message}");
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
[daemon]
socket = "/tmp/x.sock"
[balance]
mode = "src-address"
[flows]
max = 1024
tcp_established_timeout = "3h"
tcp_transitory_timeout = "30s"
udp_timeout = "90s"
icmp_timeout = "2s"
[nat]
port_range = "1024-65535"
[[lan]]
interface = "br-lan"
[[lan]]
interface = "lan1.10"
[[uplink]]
name = "lte_0-b"
interface = "wwan0"
gateway = "10.0.0.1"
weight = 1000
tier = 7
[uplink.health]
interval = "1s"
timeout = "10s"
rise = 1000
fall = 1
quorum = 2
max_loss_percent = 0
max_rtt = "1s"
[[uplink.probe]]
kind = "tcp"
target = "198.51.100.10:443"
[[uplink.probe]]
kind = "http"
target = "http://198.51.100.10"
expect_status = 204
"#;
        let config = ok(text);
        assert_eq!(config.daemon.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(config.balance.mode, ClassifierMode::SrcAddress);
        assert_eq!(config.flows.max, 1024);
        assert_eq!(
            config.flows.tcp_established_timeout,
            Duration::from_secs(3 * 3600)
        );
        assert_eq!(config.flows.tcp_transitory_timeout, Duration::from_secs(30));
        assert_eq!(config.flows.udp_timeout, Duration::from_secs(90));
        assert_eq!(config.flows.icmp_timeout, Duration::from_secs(2));
        assert_eq!((config.nat.port_min, config.nat.port_max), (1024, 65535));
        assert_eq!(config.lans.len(), 2);
        let uplink = &config.uplinks[0];
        assert_eq!((uplink.weight, uplink.tier), (1000, 7));
        assert_eq!(
            uplink.health,
            HealthConfig {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(10),
                rise: 1000,
                fall: 1,
                quorum: 2,
                max_loss_percent: Some(0),
                max_rtt: Some(Duration::from_secs(1)),
            }
        );
        assert_eq!(
            uplink.probes[1].kind,
            ProbeKind::Http {
                target: SocketAddr::from((Ipv4Addr::new(198, 51, 100, 10), 80)),
                host: "198.51.100.10".into(),
                path: "/".into(),
                expect_status: 204,
            }
        );
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let text = format!("{TWO}weight = \n");
        let err = parse(&text, "t.toml").expect_err("syntax error");
        assert!(matches!(err, ConfigError::Parse(_)), "{err:?}");
        let line = line_of(&text, "weight =");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("t.toml:{line}:10: syntax error: ")),
            "{message}"
        );

        let text = "[[lan]]\ninterface = \"lan0\"\n[[uplink]\n";
        let message = parse(text, "t.toml").expect_err("syntax error").to_string();
        assert!(message.starts_with("t.toml:3:"), "{message}");
        assert!(message.contains("syntax error"), "{message}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = TWO.replace(
            "gateway = \"100.64.2.1\"",
            "gateway = \"100.64.2.1\"\nwieght = 2",
        );
        let err = parse(&text, "t.toml").expect_err("unknown key");
        let message = err.to_string();
        let line = line_of(&text, "wieght");
        assert!(message.starts_with(&format!("t.toml:{line}:")), "{message}");
        assert!(
            message.contains("uplink: unknown field `wieght`"),
            "{message}"
        );
        assert_eq!(err.problems()[0].section.as_deref(), Some("uplink"));

        let text = format!("{TWO}[uplink.health]\nintervl = \"1s\"\n");
        let message = parse(&text, "t.toml").expect_err("unknown").to_string();
        let line = line_of(&text, "intervl");
        assert!(message.starts_with(&format!("t.toml:{line}:")), "{message}");
        assert!(
            message.contains("uplink.health: unknown field `intervl`"),
            "{message}"
        );

        let text = format!("[flows]\nudp = \"1m\"\n{TWO}");
        let message = parse(&text, "t.toml").expect_err("unknown").to_string();
        assert!(message.starts_with("t.toml:2:"), "{message}");
        assert!(message.contains("flows: unknown field `udp`"), "{message}");

        let text = format!("{TWO}[demon]\n");
        let message = parse(&text, "t.toml").expect_err("unknown").to_string();
        assert!(message.contains("unknown field `demon`"), "{message}");
        assert!(message.starts_with(&format!("t.toml:{}:", line_of(&text, "[demon]"))));
    }

    #[test]
    fn single_bracket_array_table_gets_a_hint() {
        let text = "[lan]\ninterface = \"lan0\"\n";
        let message = parse(text, "t.toml").expect_err("shape").to_string();
        assert!(message.starts_with("t.toml:1:"), "{message}");
        assert!(message.contains("write [[lan]]"), "{message}");

        let text = "daemon = 4\n";
        let message = parse(text, "t.toml").expect_err("shape").to_string();
        assert!(
            message.contains("daemon: invalid type: integer `4`, expected a table"),
            "{message}"
        );
    }

    #[test]
    fn bad_weight_names_uplink_line_and_key() {
        let text = TWO.replace(
            "gateway = \"100.64.2.1\"",
            "gateway = \"100.64.2.1\"\nweight = 0",
        );
        let line = line_of(&text, "weight = 0");
        let message = assert_one(&text, line, "weight", "got 0");
        assert_eq!(
            message,
            format!("t.toml:{line}: uplink \"isp2\" key weight: must be between 1 and 1000, got 0")
        );
        let text = TWO.replace(
            "gateway = \"100.64.2.1\"",
            "gateway = \"100.64.2.1\"\nweight = 1001",
        );
        assert_one(&text, line, "weight", "got 1001");
    }

    #[test]
    fn quotas_parse_and_bad_ones_are_named() {
        let with = |quota: &str| {
            TWO.replace(
                "gateway = \"100.64.2.1\"",
                &format!("gateway = \"100.64.2.1\"\nquota = {quota}"),
            )
        };
        let text =
            with("{ bytes = \"500GB\", period = \"week\", reset_day = 7, action = \"disable\" }");
        let config = parse(&text, "lbd.toml").expect("valid");
        assert_eq!(
            config.uplinks[1].quota,
            Some(QuotaConfig {
                bytes: 500_000_000_000,
                period: Period::Week,
                reset_day: 7,
                action: Action::Disable,
            })
        );
        assert_eq!(config.uplinks[0].quota, None);
        for (quota, says) in [
            ("\"500GB\"", "expected a table"),
            ("{ period = \"month\" }", "the volume is missing"),
            ("{ bytes = \"500\" }", "has no unit"),
            ("{ bytes = \"5GB\", reset_day = 31 }", "reset_day"),
            ("{ bytes = \"5GB\", period = \"year\" }", "period"),
            ("{ bytes = \"5GB\", action = \"stop\" }", "action"),
            ("{ bytes = \"5GB\", byte = 1 }", "unknown key \"byte\""),
        ] {
            let text = with(quota);
            assert_one(&text, line_of(&text, "quota ="), "quota", says);
        }
    }

    #[test]
    fn passive_detection_parses_and_bad_values_are_named() {
        assert_eq!(ok(EXAMPLE).passive, PassiveConfig::default());
        let text = format!(
            "{TWO}\n[passive]\nenabled = false\nfloor = \"100ms\"\nrtt_factor = 6\nburst = 2\nburst_timeout = \"80ms\"\nhold_down = \"30s\"\nresteer_syn = false\n"
        );
        let p = ok(&text).passive;
        assert_eq!(
            p,
            PassiveConfig {
                enabled: false,
                floor: Duration::from_millis(100),
                rtt_factor: 6,
                burst: 2,
                burst_timeout: Duration::from_millis(80),
                hold_down: Duration::from_secs(30),
                resteer_syn: false,
            }
        );
        for (line, says) in [
            ("floor = \"1ms\"", "outside"),
            ("burst = 0", "burst"),
            ("enabled = \"yes\"", "expected true or false"),
            ("rtt_factor = 1000", "rtt_factor"),
        ] {
            let text = format!("{TWO}\n[passive]\n{line}\n");
            let e = parse(&text, "lbd.toml").expect_err(line).to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn shapes_parse_and_bad_ones_are_named() {
        let with = |shape: &str| {
            TWO.replace(
                "gateway = \"100.64.2.1\"",
                &format!("gateway = \"100.64.2.1\"\n[uplink.shape]\n{shape}"),
            )
        };
        let text = with("upload = \"20mbit\"\ndownload = \"100mbit\"");
        let config = parse(&text, "lbd.toml").expect("valid");
        assert_eq!(
            config.uplinks[1].shape,
            Shape {
                upload: Some(20_000_000),
                download: Some(100_000_000),
            }
        );
        assert_eq!(config.uplinks[0].shape, Shape::default());
        for (shape, says) in [
            (
                "upload = \"20mbps\"",
                "upload: \"20mbps\": tc's bps units are bytes",
            ),
            ("download = 20", "download: expected a string"),
            ("uplaod = \"20mbit\"", "unknown key \"uplaod\""),
        ] {
            let text = with(shape);
            let e = parse(&text, "lbd.toml").expect_err("invalid").to_string();
            assert!(e.contains(says), "{shape}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_a_collected_problem() {
        let text = TWO.replace(
            "gateway = \"100.64.2.1\"",
            "gateway = \"100.64.2.1\"\nweight = \"2\"",
        );
        let line = line_of(&text, "weight =");
        assert_one(
            &text,
            line,
            "weight",
            "expected an integer, got string \"2\"",
        );
        let text = TWO.replace("name = \"isp1\"", "name = 1");
        assert_one(
            &text,
            line_of(&text, "name = 1"),
            "name",
            "expected a string, got integer 1",
        );
    }

    #[test]
    fn bad_tier() {
        let text = TWO.replace("name = \"isp2\"", "name = \"isp2\"\ntier = 8");
        assert_one(
            &text,
            line_of(&text, "tier"),
            "tier",
            "between 0 and 7, got 8",
        );
    }

    #[test]
    fn duplicate_uplink_name() {
        let text = TWO.replace("name = \"isp2\"", "name = \"isp1\"");
        let message = assert_one(
            &text,
            line_of_nth(&text, "name = \"isp1\"", 1),
            "name",
            "duplicate uplink name \"isp1\"",
        );
        assert!(
            message.contains(&format!("first used on line {}", line_of(&text, "isp1"))),
            "{message}"
        );
    }

    #[test]
    fn duplicate_uplink_interface() {
        let text = TWO.replace("\"wan2\"", "\"wan1\"");
        let message = assert_one(
            &text,
            line_of_nth(&text, "wan1", 1),
            "interface",
            "interface \"wan1\" is already used by uplink \"isp1\"",
        );
        assert!(
            message.contains("uplink \"isp2\" key interface"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_lan_interface() {
        let text = format!("{TWO}[[lan]]\ninterface = \"lan0\"\n");
        assert_one(
            &text,
            line_of_nth(&text, "lan0", 1),
            "interface",
            "\"lan0\" is already a LAN interface (line 2)",
        );
    }

    #[test]
    fn lan_interface_cannot_be_an_uplink() {
        let text = TWO.replace("\"wan2\"", "\"lan0\"");
        let message = assert_one(
            &text,
            line_of_nth(&text, "lan0", 1),
            "interface",
            "\"lan0\" is a LAN interface (line 2)",
        );
        assert!(message.contains("uplink \"isp2\""), "{message}");
    }

    #[test]
    fn bad_interface_names() {
        for name in ["", "wan/1", "wan 1", "wan:1", "..", "a23456789012345x"] {
            let text = TWO.replace("\"wan2\"", &format!("{name:?}"));
            assert_one(
                &text,
                line_of_nth(&text, "interface =", 2),
                "interface",
                "interface name",
            );
        }
        ok(&TWO.replace("\"wan2\"", "\"a23456789012345\""));
    }

    #[test]
    fn bad_uplink_names() {
        for name in ["", "ISP2", "isp 2", "isp.2", "a234567890123456"] {
            let text = TWO.replace("\"isp2\"", &format!("{name:?}"));
            assert_one(&text, line_of_nth(&text, "name =", 1), "name", "a-z, 0-9");
        }
    }

    #[test]
    fn bad_gateway() {
        for (gateway, says) in [
            (
                "100.64.2",
                "expected an IPv4 address or \"auto\", got \"100.64.2\"",
            ),
            ("fe80::1", "expected an IPv4 address"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
        ] {
            let text = TWO.replace("100.64.2.1", gateway);
            assert_one(&text, line_of(&text, gateway), "gateway", says);
        }
    }

    #[test]
    fn gateway_is_auto_when_absent_or_said() {
        for text in [
            TWO.replace("gateway = \"100.64.2.1\"\n", ""),
            TWO.replace("\"100.64.2.1\"", "\"auto\""),
        ] {
            let config = parse(&text, "lbd.toml").expect("valid");
            assert_eq!(config.uplinks[1].gateway, Gateway::Auto);
            assert_eq!(
                config.uplinks[0].gateway,
                Gateway::Fixed(Ipv4Addr::new(100, 64, 1, 1))
            );
        }
    }

    #[test]
    fn metrics_are_off_unless_asked_for() {
        assert_eq!(parse(TWO, "lbd.toml").expect("valid").metrics, None);
        let text = format!("{TWO}\n[metrics]\nlisten = \"127.0.0.1:9725\"\n");
        assert_eq!(
            parse(&text, "lbd.toml").expect("valid").metrics,
            Some("127.0.0.1:9725".parse().expect("address"))
        );
        let text = format!("{TWO}\n[metrics]\nlisten = \"localhost\"\n");
        assert_one(&text, line_of(&text, "localhost"), "listen", "ADDRESS:PORT");
    }

    #[test]
    fn settings_that_could_never_work_are_refused() {
        // A port the kernel picks: no scraper finds it.
        let text = format!("{TWO}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        assert_one(&text, line_of(&text, "listen"), "listen", "other than 0");
        // Probe rounds that flood their targets, timeouts no path meets.
        let text = format!("{TWO}[uplink.health]\ninterval = \"1ms\"\n");
        assert_one(
            &text,
            line_of(&text, "interval"),
            "interval",
            "shorter than 50ms",
        );
        let text = format!("{TWO}[uplink.health]\ntimeout = \"1ms\"\n");
        assert_one(
            &text,
            line_of(&text, "timeout"),
            "timeout",
            "shorter than 10ms",
        );
        // Limits that could never be crossed.
        let text = format!("{TWO}[uplink.health]\ntimeout = \"500ms\"\nmax_rtt = \"500ms\"\n");
        assert_one(
            &text,
            line_of(&text, "max_rtt"),
            "max_rtt",
            "never be reached",
        );
        let text = format!("{TWO}[uplink.health]\nmax_rtt = \"2s\"\n");
        assert_one(&text, line_of(&text, "max_rtt"), "max_rtt", "timeout (1s)");
        let text = format!("{TWO}[uplink.health]\nmax_loss_percent = 100\n");
        assert_one(&text, line_of(&text, "max_loss"), "max_loss_percent", "99");
        // And what is fine stays fine.
        let text = format!("{TWO}[uplink.health]\ninterval = \"50ms\"\ntimeout = \"150ms\"\nmax_rtt = \"100ms\"\nmax_loss_percent = 99\n");
        parse(&text, "t.toml").expect("valid health settings");
    }

    #[test]
    fn a_quorum_is_met_by_one_familys_probes() {
        let probes = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"\n\
                      [[uplink.probe]]\nkind = \"icmp\"\ntarget = \"2001:db8:ff::10\"\n";
        let text = format!("{TWO}[uplink.health]\nquorum = 2\n{probes}");
        assert_one(&text, line_of(&text, "quorum"), "quorum", "1 IPv4, 1 IPv6");
        let text = format!("{TWO}[uplink.health]\nquorum = 1\n{probes}");
        parse(&text, "t.toml").expect("a quorum each family meets");
    }

    #[test]
    fn only_one_lan_names_its_ipv6_prefix() {
        let text = format!(
            "[[lan]]\ninterface = \"guest0\"\nprefix6 = \"fd00:1::/64\"\n{}",
            TWO.replacen(
                "interface = \"lan0\"",
                "interface = \"lan0\"\nprefix6 = \"fd00:2::/64\"",
                1
            )
        );
        assert_one(
            &text,
            line_of_nth(&text, "prefix6", 1),
            "prefix6",
            "one [[lan]] only",
        );
    }

    #[test]
    fn routing_tables_and_priorities() {
        let config = parse(TWO, "lbd.toml").expect("valid");
        assert_eq!(config.routing, RoutingConfig::default());
        assert_eq!(config.routing.table(1), DEFAULT_FIRST_TABLE + 1);
        let text = format!(
            "{TWO}\n[routing]\nfirst_table = 100\nfirst_priority = 900\nlookup_tables = [7, 8]\n"
        );
        let config = parse(&text, "lbd.toml").expect("valid");
        assert_eq!(
            config.routing,
            RoutingConfig {
                first_table: 100,
                first_priority: 900,
                lookup_tables: vec![7, 8],
            }
        );
        for (line, says) in [
            ("first_table = 250", "reserved table 252"),
            ("first_table = 0", "between 1 and"),
            ("first_priority = 32760", "between 1 and"),
            ("lookup_tables = 5", "list of table numbers"),
        ] {
            let text = format!("{TWO}\n[routing]\n{line}\n");
            assert_one(
                &text,
                line_of(&text, line),
                line.split(' ').next().unwrap_or(""),
                says,
            );
        }
    }

    #[test]
    fn bad_durations() {
        for (value, says) in [
            ("\"0\"", "has no unit"),
            ("\"0s\"", "greater than zero"),
            ("\"-5m\"", "negative"),
            ("\"5 m\"", "whole number"),
            ("\"1.5s\"", "whole number"),
            ("\"5d\"", "unknown unit \"d\""),
            ("\"99999999999999999999h\"", "too long"),
            ("\"6000000h\"", "too long"),
            ("300", "expected a string, got integer 300"),
        ] {
            let text = format!("[flows]\nudp_timeout = {value}\n{TWO}");
            assert_one(&text, 2, "udp_timeout", says);
            let text = format!("[flows]\nicmp_timeout = \"500ms\"\n{TWO}");
            assert_one(&text, 2, "icmp_timeout", "shorter than a second");
            let text = format!("{TWO}[uplink.health]\nmax_rtt = {value}\n");
            let message = assert_one(&text, line_of(&text, "max_rtt"), "max_rtt", says);
            assert!(
                message.contains("uplink \"isp2\" health key max_rtt"),
                "{message}"
            );
        }
    }

    #[test]
    fn bad_port_ranges() {
        for (range, says) in [
            ("\"80-100\"", "between 1024 and 65535, got 80"),
            (
                "\"30000-20000\"",
                "not be above the second, got 30000-20000",
            ),
            ("\"20000\"", "expected \"MIN-MAX\""),
            ("\"20000-70000\"", "between 1024 and 65535, got 70000"),
            ("\"a-b\"", "expected \"MIN-MAX\""),
            ("20000", "expected a string"),
        ] {
            let text = format!("{TWO}[nat]\nport_range = {range}\n");
            assert_one(&text, line_of(&text, "port_range"), "port_range", says);
        }
        assert_eq!(parse_port_range("1024-1024"), Ok((1024, 1024)));
    }

    #[test]
    fn bad_flow_table_size_and_mode() {
        let text = format!("[flows]\nmax = 1023\n[balance]\nmode = \"round-robin\"\n{TWO}");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(
            found[0].to_string(),
            "t.toml:2: flows key max: must be between 1024 and 16777216, got 1023"
        );
        assert!(found[1]
            .to_string()
            .starts_with("t.toml:4: balance key mode: must be one of"));
    }

    #[test]
    fn bad_socket_paths() {
        let long = format!("/{}", "x".repeat(107));
        for (path, says) in [("run/lbd.sock", "absolute"), (long.as_str(), "at most 107")] {
            let text = format!("[daemon]\nsocket = {path:?}\n{TWO}");
            assert_one(&text, 2, "socket", says);
        }
    }

    #[test]
    fn too_many_uplinks() {
        let mut text = String::from("[[lan]]\ninterface = \"lan0\"\n");
        for i in 1..=MAX_UPLINKS + 1 {
            text.push_str(&format!(
                "[[uplink]]\nname = \"isp{i}\"\ninterface = \"wan{i}\"\ngateway = \"100.64.{i}.1\"\n"
            ));
        }
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        let message = found[0].to_string();
        let line = line_of_nth(&text, "[[uplink]]", MAX_UPLINKS);
        assert_eq!(
            message,
            format!(
                "t.toml:{line}: uplink \"isp17\": too many uplinks: at most 16 are supported, this \
                 file has 17"
            )
        );
        // Sixteen are fine.
        let cut = text
            .find("[[uplink]]\nname = \"isp17\"")
            .expect("17th uplink");
        assert_eq!(ok(&text[..cut]).uplinks.len(), MAX_UPLINKS);
    }

    #[test]
    fn a_lan_and_an_uplink_are_required() {
        let found = problems("");
        let rendered: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "t.toml: lan: no [[lan]] section: at least one LAN interface is required",
                "t.toml: uplink: no [[uplink]] section: at least one uplink is required",
            ]
        );
        let text = "[[lan]]\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n";
        assert_one(text, 1, "interface", "missing (required)");
    }

    #[test]
    fn quorum_cannot_exceed_probes() {
        let probe = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"\n";
        let text = format!("{TWO}[uplink.health]\nquorum = 2\n{probe}");
        let message = assert_one(
            &text,
            line_of(&text, "quorum"),
            "quorum",
            "between 1 and the number of probes (1), got 2",
        );
        assert!(
            message.contains("uplink \"isp2\" health key quorum"),
            "{message}"
        );

        let text = format!("{TWO}[uplink.health]\nquorum = 2\n");
        assert_one(
            &text,
            line_of(&text, "quorum"),
            "quorum",
            "must be 1 when the uplink has no probes",
        );

        let text = format!("{TWO}[uplink.health]\nquorum = 0\n{probe}");
        assert_one(&text, line_of(&text, "quorum"), "quorum", "got 0");

        let second = probe.replace("198.51.100.10", "198.51.100.11");
        let config = ok(&format!(
            "{TWO}[uplink.health]\nquorum = 2\n{probe}{second}"
        ));
        assert_eq!(config.uplinks[1].health.quorum, 2);
    }

    #[test]
    fn health_counts_and_thresholds() {
        for (line, key, says) in [
            ("rise = 0", "rise", "between 1 and 1000, got 0"),
            ("fall = 1001", "fall", "between 1 and 1000, got 1001"),
            (
                "max_loss_percent = 101",
                "max_loss_percent",
                "between 0 and 99, got 101",
            ),
            ("max_loss_percent = -1", "max_loss_percent", "got -1"),
        ] {
            let text = format!("{TWO}[uplink.health]\n{line}\n");
            assert_one(&text, line_of(&text, line), key, says);
        }
    }

    #[test]
    fn timeout_at_most_ten_intervals() {
        let text = format!("{TWO}[uplink.health]\ninterval = \"100ms\"\ntimeout = \"1001ms\"\n");
        assert_one(
            &text,
            line_of(&text, "timeout ="),
            "timeout",
            "at most 10 x interval (100ms)",
        );
        ok(&format!(
            "{TWO}[uplink.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\n"
        ));
        // Only the interval set: the default timeout is too long for it.
        let text = format!("{TWO}[uplink.health]\ninterval = \"50ms\"\n");
        assert_one(
            &text,
            line_of(&text, "interval"),
            "interval",
            "(the default; set timeout too)",
        );
        // A bad interval is reported once, not again as a timeout problem.
        let text = format!("{TWO}[uplink.health]\ninterval = \"0ms\"\ntimeout = \"1h\"\n");
        assert_one(
            &text,
            line_of(&text, "interval"),
            "interval",
            "greater than zero",
        );
    }

    fn probe_text(kind: &str, target: &str, extra: &str) -> String {
        format!("{TWO}[[uplink.probe]]\nkind = \"{kind}\"\ntarget = \"{target}\"\n{extra}")
    }

    #[test]
    fn ipv6_probe_targets_are_read_and_judge_ipv6() {
        for (kind, target, extra, want) in [
            ("icmp", "2001:db8:ff::10", "", "icmp 2001:db8:ff::10"),
            (
                "tcp",
                "[2001:db8:ff::10]:443",
                "",
                "tcp [2001:db8:ff::10]:443",
            ),
            (
                "http",
                "http://[2001:db8:ff::10]:8080/up",
                "",
                "http http://[2001:db8:ff::10]:8080/up (expect 200)",
            ),
            (
                "dns",
                "2001:db8:ff::53",
                "query = \"example.com\"\n",
                "dns [2001:db8:ff::53]:53 A example.com",
            ),
        ] {
            let text = probe_text(kind, target, extra);
            let config = parse(&text, "t.toml").expect(&text);
            let probes = &config.uplinks[1].probes;
            assert_eq!(probes[0].kind.to_string(), want);
            assert!(probes[0].kind.is_ipv6());
            assert_eq!(config.uplinks[1].probes_of(true).len(), 1);
            assert!(config.uplinks[1].probes_of(false).is_empty());
        }
    }

    #[test]
    fn bad_probe_targets_per_kind() {
        for (kind, target, says) in [
            ("icmp", "198.51.100", "expected an IP address"),
            ("icmp", "198.51.100.10:80", "expected an IP address"),
            ("icmp", "example.com", "expected an IP address"),
            ("icmp", "255.255.255.255", "broadcast"),
            ("icmp", "fe80::1", "link-local"),
            ("icmp", "ff02::1", "multicast"),
            ("icmp", "::1", "loopback"),
            ("icmp", "::ffff:198.51.100.10", "IPv4-mapped"),
            ("tcp", "198.51.100.10", "expected IPv4:port"),
            ("tcp", "2001:db8::10", "[IPv6]:port"),
            ("tcp", "198.51.100.10:0", "port 0"),
            ("tcp", "[2001:db8::10]:0", "port 0"),
            ("tcp", "198.51.100.10:65536", "expected IPv4:port"),
            (
                "http",
                "198.51.100.10/health",
                "expected http://IP[:port]/path",
            ),
            ("http", "https://198.51.100.10/", "https is not supported"),
            ("http", "http://example.com/", "probes do not resolve names"),
            ("http", "http://198.51.100.10:x/", "expected http://"),
            ("http", "http://[2001:db8::10/", "expected http://"),
            ("http", "http:///health", "expected http://"),
            (
                "http",
                "http://198.51.100.10/a b",
                "the path cannot contain ' '",
            ),
            (
                "dns",
                "198.51.100",
                "expected the resolver as an IP address",
            ),
            ("dns", "dns.google", "expected the resolver"),
            ("dns", "[ff02::fb]:5353", "multicast"),
            ("dns", "224.0.0.251:5353", "multicast"),
        ] {
            let extra = if kind == "dns" {
                "query = \"example.com\"\n"
            } else {
                ""
            };
            let text = probe_text(kind, target, extra);
            let message = assert_one(&text, line_of(&text, "target ="), "target", says);
            assert!(
                message.contains("uplink \"isp2\" probe #1 key target"),
                "{message}"
            );
        }
    }

    #[test]
    fn good_probe_targets_per_kind() {
        let config = ok(&format!(
            "{}{}{}{}",
            probe_text("icmp", "198.51.100.10", ""),
            "[[uplink.probe]]\nkind = \"tcp\"\ntarget = \"198.51.100.10:22\"\n",
            "[[uplink.probe]]\nkind = \"http\"\ntarget = \"http://198.51.100.10:8080/a?b=c\"\nexpect_status = 301\n",
            "[[uplink.probe]]\nkind = \"dns\"\ntarget = \"198.51.100.53:5353\"\nquery = \"example.com.\"\n",
        ));
        let kinds: Vec<String> = config.uplinks[1]
            .probes
            .iter()
            .map(|p| p.kind.to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "icmp 198.51.100.10",
                "tcp 198.51.100.10:22",
                "http http://198.51.100.10:8080/a?b=c (expect 301)",
                "dns 198.51.100.53:5353 A example.com.",
            ]
        );
    }

    #[test]
    fn probe_keys_that_do_not_fit_the_kind() {
        let text = probe_text("icmp", "198.51.100.10", "expect_status = 200\n");
        assert_one(
            &text,
            line_of(&text, "expect_status"),
            "expect_status",
            "only for kind = \"http\"",
        );
        let text = probe_text("http", "http://198.51.100.10/", "query = \"example.com\"\n");
        assert_one(
            &text,
            line_of(&text, "query"),
            "query",
            "only for kind = \"dns\"",
        );
        let text = probe_text("http", "http://198.51.100.10/", "expect_status = 42\n");
        assert_one(
            &text,
            line_of(&text, "expect_status"),
            "expect_status",
            "between 100 and 599",
        );
        let text = probe_text("dns", "198.51.100.10", "");
        assert_one(
            &text,
            line_of(&text, "[[uplink.probe]]"),
            "query",
            "missing (required)",
        );
        let text = probe_text("dns", "198.51.100.10", "query = \"-a..b\"\n");
        assert_one(
            &text,
            line_of(&text, "query"),
            "query",
            "expected a domain name",
        );
        let text = probe_text("ping", "198.51.100.10", "");
        assert_one(
            &text,
            line_of(&text, "kind"),
            "kind",
            "must be one of \"icmp\"",
        );
        let text = format!("{TWO}[[uplink.probe]]\ntarget = \"198.51.100.10\"\n");
        assert_one(
            &text,
            line_of(&text, "[[uplink.probe]]"),
            "kind",
            "missing (required)",
        );
        let text = format!("{TWO}[[uplink.probe]]\nkind = \"icmp\"\n");
        assert_one(
            &text,
            line_of(&text, "[[uplink.probe]]"),
            "target",
            "missing (required)",
        );
    }

    #[test]
    fn duplicate_probe() {
        let probe = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"\n";
        let text = format!("{TWO}{probe}{probe}");
        assert_one(
            &text,
            line_of_nth(&text, "target", 1),
            "target",
            "the same probe as probe #1",
        );
    }

    #[test]
    fn all_problems_are_reported_in_line_order() {
        let text = r#"[flows]
udp_timeout = "5"

[[lan]]
interface = "wan1"

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1"
weight = 0

[[uplink]]
name = "isp1"
interface = "wan2"
gateway = "100.64.2.1"
tier = 9

[[uplink.probe]]
kind = "tcp"
target = "198.51.100.10"

[nat]
port_range = "1-2"
"#;
        let found = problems(text);
        let summary: Vec<(Option<usize>, Option<&str>)> =
            found.iter().map(|p| (p.line, p.key.as_deref())).collect();
        assert_eq!(
            summary,
            [
                (Some(2), Some("udp_timeout")),
                (Some(9), Some("interface")),
                (Some(10), Some("gateway")),
                (Some(11), Some("weight")),
                (Some(14), Some("name")),
                (Some(17), Some("tier")),
                (Some(21), Some("target")),
                (Some(24), Some("port_range")),
            ],
            "{found:#?}"
        );
        let err = parse(text, "t.toml").expect_err("invalid");
        let shown = err.to_string();
        assert_eq!(shown.lines().count(), 8, "{shown}");
        assert!(shown.lines().all(|l| l.starts_with("t.toml:")), "{shown}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
        assert_eq!(
            parse_duration("5124095h"),
            Ok(Duration::from_secs(5_124_095 * 3600))
        );
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(
            parse_duration("0"),
            Err(DurationError::MissingUnit("0".into()))
        );
        assert_eq!(
            parse_duration("10"),
            Err(DurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_duration("0ms"),
            Err(DurationError::Zero("0ms".into()))
        );
        assert_eq!(
            parse_duration("-1s"),
            Err(DurationError::Negative("-1s".into()))
        );
        assert_eq!(
            parse_duration("s"),
            Err(DurationError::BadNumber("s".into()))
        );
        assert_eq!(
            parse_duration("+1s"),
            Err(DurationError::BadNumber("+1s".into()))
        );
        assert_eq!(
            parse_duration("1.5s"),
            Err(DurationError::BadNumber("1.5s".into()))
        );
        assert_eq!(
            parse_duration(" 1s"),
            Err(DurationError::BadNumber(" 1s".into()))
        );
        assert_eq!(
            parse_duration("1us"),
            Err(DurationError::UnknownUnit {
                text: "1us".into(),
                unit: "us".into()
            })
        );
        assert_eq!(
            parse_duration("1m30s"),
            Err(DurationError::UnknownUnit {
                text: "1m30s".into(),
                unit: "m30s".into()
            })
        );
        assert_eq!(
            parse_duration("5124096h"),
            Err(DurationError::Overflow("5124096h".into()))
        );
        assert_eq!(
            parse_duration("18446744073709551616ms"),
            Err(DurationError::Overflow("18446744073709551616ms".into()))
        );
        assert!(parse_duration("१s").is_err(), "non-ASCII digits");
    }

    #[test]
    fn nat_against_local_port_range() {
        let nat = NatConfig::default();
        assert_eq!(nat_range_conflict(&nat, (32768, 60999)), None);
        assert_eq!(nat_range_conflict(&nat, (30000, 60999)), None);
        assert_eq!(nat_range_conflict(&nat, (1024, 19999)), None);
        let message = nat_range_conflict(&nat, (25000, 60999)).expect("overlap");
        assert!(message.contains("NAT port range 20000-29999"), "{message}");
        assert!(
            message.contains("ip_local_port_range 25000-60999"),
            "{message}"
        );
        assert!(message.contains("\"1024-24999\""), "{message}");
        assert!(
            message.contains("sysctl net.ipv4.ip_local_port_range"),
            "{message}"
        );
        // The suggestion is the larger free stretch.
        let message = nat_range_conflict(&nat, (10000, 29999)).expect("overlap");
        assert!(message.contains("\"30000-65535\""), "{message}");
        // Edges touch.
        assert!(nat_range_conflict(&nat, (29999, 40000)).is_some());
        assert!(nat_range_conflict(&nat, (1024, 20000)).is_some());
        // No room left at all.
        let message = nat_range_conflict(&nat, (1024, 65535)).expect("overlap");
        assert!(message.contains("narrow the kernel's range"), "{message}");
        // A reversed pair is read as a range.
        assert!(nat_range_conflict(&nat, (26000, 25000)).is_some());
    }

    #[test]
    fn local_port_range_text() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_local_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_local_port_range("32768\n"), None);
        assert_eq!(parse_local_port_range("1 2 3"), None);
        assert_eq!(parse_local_port_range("a b"), None);
        assert_eq!(parse_local_port_range("70000 80000"), None);
    }

    #[test]
    fn reads_this_hosts_local_port_range() {
        // Read-only; every Linux this runs on has it.
        let (lo, hi) = read_local_port_range()
            .unwrap_or_else(|e| panic!("reading {LOCAL_PORT_RANGE_PATH}: {e}"));
        assert!(lo >= 1 && lo <= hi, "{lo}-{hi}");
    }

    #[test]
    fn load_names_the_path_and_the_os_error() {
        let path = Path::new("/nonexistent/lb/lbd.toml");
        let err = load(path).expect_err("missing file");
        assert_eq!(
            err.to_string(),
            "cannot read config file /nonexistent/lb/lbd.toml"
        );
        let source = std::error::Error::source(&err).expect("source");
        let io = source.downcast_ref::<io::Error>().expect("io::Error");
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert!(err.problems().is_empty());
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_problems() {
        let dir = std::env::temp_dir().join(format!("lb-config-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE).expect("write");
        let loaded = load(&good);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, TWO.replace("\"wan2\"", "\"wan1\"")).expect("write");
        let failed = load(&bad);
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!(loaded.expect("example").uplinks.len(), 3);
        let message = failed.expect_err("duplicate").to_string();
        assert!(
            message.starts_with(&format!("{}:11: ", bad.display())),
            "{message}"
        );
    }

    #[test]
    fn classifier_mode_spelling() {
        for mode in ClassifierMode::ALL {
            let text = format!("[balance]\nmode = \"{mode}\"\n{TWO}");
            assert_eq!(ok(&text).balance.mode, mode);
            assert_eq!(
                Value::try_from(mode).expect("serialize"),
                Value::String(mode.as_str().to_owned())
            );
        }
        assert_eq!(ClassifierMode::FiveTuple.to_string(), "5-tuple");
        assert_eq!(ClassifierMode::SrcDstAddress.to_string(), "src-dst-address");
        assert_eq!(ClassifierMode::SrcAddress.to_string(), "src-address");
    }

    #[test]
    fn lines_and_columns_count_characters() {
        let text = "a\nbé = 1\n\nx";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (2, 1));
        assert_eq!(line_col(text, 5), (2, 3)); // after "bé", a 2-byte char
        assert_eq!(line_col(text, text.len()), (4, 2));
        assert_eq!(line_col(text, 1000), (4, 2));
        assert_eq!(line_col(text, 4), (2, 3)); // inside "é": no panic
    }

    #[test]
    fn non_ascii_and_odd_input_is_refused_without_a_panic() {
        for text in [
            "[[uplink]]\nname = \"ïsp\"\ninterface = \"wän1\"\ngateway = \"1.2.3.4\"\n",
            "\u{feff}[[lan]]\ninterface = \"lan0\"\n",
            "[[uplink]]\n[uplink.health]\n[[uplink.probe]]\n[[uplink.probe]]\n",
            "lan = []\nuplink = []\n",
            "[[uplink]]\nname = \"a\"\ngateway = 1e400\n",
        ] {
            assert!(parse(text, "t.toml").is_err(), "accepted: {text:?}");
        }
    }
}
