//! IPv6 in the DHCP lab (`labs/dhcp.toml`) as ISPs give it: Kea's DHCPv6
//! server in each ISP (an address for the router's uplink and a delegated
//! /56) with radvd sending RAs with the Managed flag; dhcpcd on the router
//! (its `labs/dhcpcd-hook.sh` as hook), which puts a /64 of wan1's
//! delegation on br-lan; radvd on br-lan, from which the client takes a
//! SLAAC address.
//!
//! Owns those processes (lab processes, stopped with the lab), their
//! configuration and state files (in the lab's files directory, so that
//! labs running at once share nothing), the ISPs' routes to the prefixes
//! they delegated (a BNG's job, which Kea does not do), and waiting, with
//! a bound, for what the router and the client make of it all. Never
//! configures an address or a route on the router or the client: that is
//! dhcpcd's, radvd's and the kernel's job, as on a real router.
//!
//! What dhcpcd 9.4 shows the kernel (measured): wanN's IA_NA address as
//! `ADDR/128 scope global dynamic noprefixroute`; the default route as
//! `default via fe80::… dev wanN proto ra metric M` in main, one per uplink
//! (dhcpcd handles RAs itself and sets accept_ra to 0); each delegation as
//! `unreachable PREFIX/56 dev lo proto dhcp metric 1001` (lo's metric),
//! which does not say which uplink it came from: the hook writes that down
//! ([`recorded_delegations`]); wan1's /64 as `ADDR/64 … noprefixroute` on
//! br-lan with `PREFIX/64 dev br-lan proto dhcp`. At each renewal dhcpcd
//! deletes the other uplinks' reject routes and adds them back a few
//! milliseconds later: a watcher of netlink sees delegations flap.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::{desc::Cidr, stream::wait_for, Lab};

/// How long a step may take: the ISPs' RAs come every 10 s at most, the
/// LAN's every 4 s, and the servers answer at once.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The uplink whose delegation the LAN carries (one global prefix on the
/// LAN, as most small routers do).
pub const LAN_UPLINK: u8 = 1;

/// The router's LAN interface, where dhcpcd puts wan1's /64.
pub const LAN_IFNAME: &str = "br-lan";

/// The internet server's IPv6 address (inet's srv0).
pub const SERVER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);

/// The real parts, with the Debian packages that have them.
const TOOLS: [(&str, &str); 3] = [
    ("kea-dhcp6", "kea-dhcp6-server"),
    ("dhcpcd", "dhcpcd-base"),
    ("radvd", "radvd"),
];

/// Lease times of the ISPs' servers: short, so that a lease that is gone
/// is gone within minutes of a lab's life, not days.
const RENEW_S: u32 = 30;
const REBIND_S: u32 = 60;
const PREFERRED_S: u32 = 90;
const VALID_S: u32 = 120;

/// The ISPs' route to what they delegated is tagged with this protocol, so
/// that [`route_delegations`] finds its own routes among the ISP's others.
const BNG_PROTO: &str = "dhcp";

/// ISP `n`'s address space, 2001:db8:N::/48.
pub fn isp_space(n: u8) -> Cidr {
    v6(Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0, 0, 0, 0, 0), 48)
}

/// Uplink `n`'s subnet, 2001:db8:N:ffff::/64: ISP ::1, the router's lease
/// from ::100 up.
pub fn wan_subnet(n: u8) -> Cidr {
    v6(
        Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0xffff, 0, 0, 0, 0),
        64,
    )
}

/// ISP `n`'s pool of /56s to delegate in `generation` (1 to 15):
/// 2001:db8:N:G000::/52. Renumbering moves to the next generation.
pub fn pd_pool(n: u8, generation: u8) -> Cidr {
    let segment = u16::from(generation) << 12;
    v6(
        Ipv6Addr::new(0x2001, 0xdb8, n.into(), segment, 0, 0, 0, 0),
        52,
    )
}

fn v6(addr: Ipv6Addr, prefix_len: u8) -> Cidr {
    Cidr {
        addr: IpAddr::V6(addr),
        prefix_len,
    }
}

/// The network `cidr` lies in (host bits cleared).
pub fn network(cidr: Cidr) -> Cidr {
    match cidr.addr {
        IpAddr::V6(a) => {
            let host_bits = 128 - u32::from(cidr.prefix_len);
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            v6(Ipv6Addr::from_bits(a.to_bits() & mask), cidr.prefix_len)
        }
        IpAddr::V4(_) => cidr,
    }
}

/// Whether `inner` lies wholly inside `outer`.
pub fn within(inner: Cidr, outer: Cidr) -> bool {
    inner.prefix_len >= outer.prefix_len && outer.contains(inner.addr)
}

/// Fails, naming the package, if a real part is missing.
pub fn require_tools() -> Result<()> {
    let missing = crate::netns::missing_tools(&TOOLS);
    ensure!(
        missing.is_empty(),
        "the IPv6 lab needs {}, not on PATH; `cargo xtask setup` installs them",
        missing.join(", ")
    );
    Ok(())
}

/// `path` as a string for a configuration file or a command line.
fn text(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// A subdirectory of the lab's files directory, created.
fn subdir(lab: &Lab, name: &str) -> Result<PathBuf> {
    let dir = lab.files_dir()?.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let Ok(log) = std::fs::read_to_string(path) else {
        return format!("(no log at {})", path.display());
    };
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    format!("{} ends:\n  {tail}", path.display())
}

/// ISP `n`'s files: Kea's and radvd's configurations, leases, logs.
fn isp_dir(lab: &Lab, n: u8) -> Result<PathBuf> {
    subdir(lab, &format!("isp{n}"))
}

fn router_dir(lab: &Lab) -> Result<PathBuf> {
    subdir(lab, "router")
}

/// Kea's configuration for ISP `n`: the router's uplink gets an address of
/// [`wan_subnet`] and a /56 of [`pd_pool`]`(n, generation)`. Leases in a
/// memfile of the ISP's directory, no control socket, no lease file
/// cleanup (a lab lives minutes).
fn kea_config(dir: &Path, n: u8, generation: u8) -> Result<String> {
    let subnet = wan_subnet(n);
    let first = Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0xffff, 0, 0, 0, 0x100);
    let last = Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0xffff, 0, 0, 0, 0x1ff);
    let pool = pd_pool(n, generation);
    let config = json!({
        "Dhcp6": {
            "interfaces-config": { "interfaces": ["down0"] },
            // Where Kea keeps its server DUID: the same across restarts,
            // so that a renewing client still finds its server.
            "data-directory": text(dir)?,
            "lease-database": {
                "type": "memfile",
                "persist": true,
                "name": text(&dir.join("leases6.csv"))?,
                "lfc-interval": 0
            },
            "renew-timer": RENEW_S,
            "rebind-timer": REBIND_S,
            "preferred-lifetime": PREFERRED_S,
            "valid-lifetime": VALID_S,
            "subnet6": [{
                "id": 1,
                "subnet": subnet.to_string(),
                "interface": "down0",
                "pools": [{ "pool": format!("{first}-{last}") }],
                "pd-pools": [{
                    "prefix": pool.addr.to_string(),
                    "prefix-len": pool.prefix_len,
                    "delegated-len": 56
                }]
            }],
            "loggers": [{
                "name": "kea-dhcp6",
                "output_options": [{ "output": text(&dir.join("kea.log"))? }],
                "severity": "WARN"
            }]
        }
    });
    serde_json::to_string_pretty(&config).context("rendering Kea's configuration")
}

/// Starts ISP `n`'s DHCPv6 server (Kea) on its down0, delegating out of
/// [`pd_pool`]`(n, generation)`, and waits until it listens. Its leases
/// survive a restart (a new generation), as an ISP's database does.
/// Returns its pid, for [`Lab::stop`].
pub fn start_server(lab: &mut Lab, n: u8, generation: u8) -> Result<u32> {
    ensure!(
        (1..=15).contains(&generation),
        "ISP {n}'s prefix pool generation {generation} is outside 1..=15"
    );
    let isp = format!("isp{n}");
    let dir = isp_dir(lab, n)?;
    let conf = dir.join("kea.json");
    write(&conf, &kea_config(&dir, n, generation)?)?;
    let conf = text(&conf)?;
    // Kea's own check first: a bad configuration fails here, with Kea's
    // words, rather than as a lease that never comes.
    let check = lab.output(&isp, &["kea-dhcp6", "-t", conf])?;
    ensure!(
        check.status.success(),
        "Kea rejects {isp}'s configuration {conf}: {}{}",
        String::from_utf8_lossy(&check.stdout).trim(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    // The pid file goes to the ISP's directory, and no logger lock file:
    // Kea's defaults are under /run, shared by every lab. What Kea says
    // before its loggers are set up (on stdout) goes to its log too.
    let pid_dir = format!("KEA_PIDFILE_DIR={}", text(&dir)?);
    let log = dir.join("kea.log");
    let args = [
        "env",
        &pid_dir,
        "KEA_LOCKFILE_DIR=none",
        "sh",
        "-c",
        "exec kea-dhcp6 -c \"$1\" >>\"$2\" 2>&1",
        "kea-in-lab",
        conf,
        text(&log)?,
    ];
    let pid = lab
        .spawn(&isp, &args)
        .with_context(|| format!("starting {isp}'s DHCPv6 server (kea-dhcp6)"))?;
    wait_for(
        &format!("{isp}'s Kea to listen on port 547"),
        TIMEOUT,
        || {
            let out = lab.exec(&isp, &["ss", "-H", "-u", "-l", "-n", "sport", "=", ":547"])?;
            Ok(!out.trim().is_empty())
        },
    )
    .with_context(|| log_tail(&log))?;
    Ok(pid)
}

/// Starts ISP `n`'s router advertisements on its down0: the Managed flag
/// (addresses from DHCPv6), no prefix, a router lifetime of 30 minutes as
/// ISPs send. Returns its pid.
pub fn start_isp_ra(lab: &mut Lab, n: u8) -> Result<u32> {
    let dir = isp_dir(lab, n)?;
    let conf = "interface down0 {\n\
                \x20   AdvSendAdvert on;\n\
                \x20   AdvManagedFlag on;\n\
                \x20   AdvOtherConfigFlag on;\n\
                \x20   MinRtrAdvInterval 3;\n\
                \x20   MaxRtrAdvInterval 10;\n\
                \x20   AdvDefaultLifetime 1800;\n\
                };\n";
    start_radvd(lab, &format!("isp{n}"), &dir, conf)
}

/// Starts the router's advertisements on br-lan: whatever /64 br-lan has
/// (radvd's `prefix ::/64`, which follows prefixes that come and go), for
/// SLAAC, every 3 to 4 seconds. Returns its pid.
pub fn start_lan_ra(lab: &mut Lab) -> Result<u32> {
    let dir = router_dir(lab)?;
    // Lifetimes as the delegation's: radvd does not withdraw a prefix that
    // left the interface, so the client keeps it until it runs out.
    let conf = format!(
        "interface {LAN_IFNAME} {{\n\
         \x20   AdvSendAdvert on;\n\
         \x20   MinRtrAdvInterval 3;\n\
         \x20   MaxRtrAdvInterval 4;\n\
         \x20   prefix ::/64 {{\n\
         \x20       AdvOnLink on;\n\
         \x20       AdvAutonomous on;\n\
         \x20       AdvValidLifetime {VALID_S};\n\
         \x20       AdvPreferredLifetime {PREFERRED_S};\n\
         \x20   }};\n\
         }};\n"
    );
    start_radvd(lab, "router", &dir, &conf)
}

fn start_radvd(lab: &mut Lab, host: &str, dir: &Path, conf: &str) -> Result<u32> {
    let conf_path = dir.join("radvd.conf");
    write(&conf_path, conf)?;
    let check = lab.output(
        host,
        &["radvd", "--configtest", "--config", text(&conf_path)?],
    )?;
    ensure!(
        check.status.success(),
        "radvd rejects {host}'s configuration {}: {}{}",
        conf_path.display(),
        String::from_utf8_lossy(&check.stdout).trim(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    let pid_file = dir.join("radvd.pid");
    let log = dir.join("radvd.log");
    let args = [
        "radvd",
        "--nodaemon",
        "--config",
        text(&conf_path)?,
        "--pidfile",
        text(&pid_file)?,
        "--logmethod",
        "logfile",
        "--logfile",
        text(&log)?,
    ];
    let pid = lab
        .spawn(host, &args)
        .with_context(|| format!("starting radvd on {host}"))?;
    // radvd writes its pid file once its socket is up and the
    // configuration taken.
    wait_for(&format!("radvd on {host} to start"), TIMEOUT, || {
        Ok(std::fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty()))
    })
    .with_context(|| log_tail(&log))?;
    Ok(pid)
}

/// dhcpcd's configuration: IPv6 only on `uplinks` (udhcpc has IPv4), an
/// address and a delegation on each, [`LAN_UPLINK`]'s first /64 on br-lan
/// (suffix ::1), the others' held but assigned nowhere.
fn dhcpcd_config(uplinks: &[u8], hook: &Path, state: &Path) -> Result<String> {
    let mut conf = String::from(
        "# The lab router's DHCPv6 client, written by lb_tests::dhcp6.\n\
         # No udev in a lab namespace: dhcpcd would wait for it forever.\n\
         nodev\n\
         # IPv4 is udhcpc's (lb_tests::dhcp).\n\
         noipv4\n\
         # No random wait before the first message, and no giving up.\n\
         nodelay\n\
         timeout 0\n",
    );
    writeln!(conf, "script {}", text(hook)?)?;
    writeln!(conf, "env LB_DHCP6_STATE={}", text(state)?)?;
    let wans: Vec<String> = uplinks.iter().map(|n| format!("wan{n}")).collect();
    writeln!(conf, "allowinterfaces {} {LAN_IFNAME}", wans.join(" "))?;
    for &n in uplinks {
        // Metric 100+N: one default route per uplink in main, wan1's first.
        // IAIDs N1 (address) and N2 (prefix): unique across uplinks.
        let assign = if n == LAN_UPLINK {
            format!("{LAN_IFNAME}/0/64")
        } else {
            // An interface that does not exist: dhcpcd 9 assigns a
            // delegation without one to every other interface; `-` (no
            // such interface) keeps it unassigned, logging "cannot delegate
            // to -". dhcpcd 10 reads `-` as exactly that.
            "-".to_string()
        };
        writeln!(
            conf,
            "interface wan{n}\n  metric {}\n  ia_na {n}1\n  ia_pd {n}2 {assign}",
            100 + u32::from(n)
        )?;
    }
    // br-lan only receives a delegation: no RS, no DHCPv6 of its own.
    writeln!(conf, "interface {LAN_IFNAME}\n  noipv6rs\n  nodhcp6")?;
    Ok(conf)
}

/// The hook dhcpcd runs on each event.
pub fn client_hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/dhcpcd-hook.sh")
}

/// Starts the router's DHCPv6 client (dhcpcd, one process for all
/// `uplinks` and br-lan). dhcpcd keeps its pid file and control socket in
/// /run/dhcpcd and its DUID and leases in /var/lib/dhcpcd, named by
/// interface only: two labs' routers would collide ("already running").
/// So it runs with the lab's own directories mounted there, in the private
/// mount namespace that `ip netns exec` gives it. Returns its pid.
pub fn start_client(lab: &mut Lab, uplinks: &[u8]) -> Result<u32> {
    let dir = router_dir(lab)?;
    let (db, run, state) = (dir.join("db"), dir.join("run"), dir.join("pd"));
    for d in [&db, &run, &state] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let conf = dir.join("dhcpcd.conf");
    write(&conf, &dhcpcd_config(uplinks, &client_hook(), &state)?)?;
    let log = dir.join("dhcpcd.log");
    // Its stderr too goes to the log: it complains there as it stops.
    let script = "mount --bind \"$1\" /var/lib/dhcpcd && mount --bind \"$2\" /run && \
                  exec dhcpcd --nobackground --quiet --config \"$3\" --logfile \"$4\" 2>>\"$4\"";
    let args = [
        "sh",
        "-c",
        script,
        "dhcpcd-in-lab",
        text(&db)?,
        text(&run)?,
        text(&conf)?,
        text(&log)?,
    ];
    lab.spawn("router", &args)
        .context("starting the router's DHCPv6 client (dhcpcd)")
}

/// Asks dhcpcd to renew every lease now (its SIGUSR1), as it does on its
/// own at T1.
pub fn renew(lab: &Lab, client_pid: u32) -> Result<()> {
    let pid = client_pid.to_string();
    lab.exec("router", &["kill", "-USR1", &pid])
        .map(|_| ())
        .context("asking dhcpcd to renew")
}

#[derive(Deserialize)]
struct ShownLink {
    #[serde(default)]
    addr_info: Vec<ShownAddr>,
}

/// `ip -j addr show … scope S` lists the addresses it filtered out as
/// `{}`: both fields are absent there.
#[derive(Deserialize)]
struct ShownAddr {
    local: Option<IpAddr>,
    prefixlen: Option<u8>,
}

/// The addresses of `scope` ("global", "link") on `host:ifname`.
fn addresses_of(lab: &Lab, host: &str, ifname: &str, scope: &str) -> Result<Vec<Cidr>> {
    let args = [
        "ip", "-j", "-6", "addr", "show", "dev", ifname, "scope", scope,
    ];
    let json = lab.exec(host, &args)?;
    let links: Vec<ShownLink> = serde_json::from_str(&json)
        .with_context(|| format!("parsing `{}` on {host}: {json}", args.join(" ")))?;
    Ok(links
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter_map(|a| {
            Some(Cidr {
                addr: a.local?,
                prefix_len: a.prefixlen?,
            })
        })
        .collect())
}

/// The global IPv6 addresses on `host:ifname`.
pub fn global_addresses(lab: &Lab, host: &str, ifname: &str) -> Result<Vec<Cidr>> {
    addresses_of(lab, host, ifname, "global")
}

/// The link-local address of `host:ifname`.
pub fn link_local(lab: &Lab, host: &str, ifname: &str) -> Result<Ipv6Addr> {
    addresses_of(lab, host, ifname, "link")?
        .into_iter()
        .find_map(|c| match c.addr {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
        .with_context(|| format!("{host}:{ifname} has no link-local address"))
}

/// One IPv6 route as `ip -j -6 route show table all` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Route6 {
    /// `unicast`, `unreachable`, `local`, …
    #[serde(rename = "type", default = "Route6::unicast")]
    pub kind: String,
    /// `default` or PREFIX/LEN.
    pub dst: String,
    pub gateway: Option<Ipv6Addr>,
    pub dev: Option<String>,
    pub table: Option<String>,
    pub protocol: Option<String>,
    pub metric: Option<u32>,
}

impl Route6 {
    fn unicast() -> String {
        "unicast".to_owned()
    }

    /// The destination as a prefix (`default` is ::/0).
    pub fn prefix(&self) -> Result<Cidr> {
        if self.dst == "default" {
            return Ok(v6(Ipv6Addr::UNSPECIFIED, 0));
        }
        // `ip` writes a host route without its /128.
        let dst = if self.dst.contains('/') {
            self.dst.clone()
        } else {
            format!("{}/128", self.dst)
        };
        dst.parse()
            .with_context(|| format!("route destination `{}`", self.dst))
    }

    fn in_main(&self) -> bool {
        self.table.as_deref().is_none_or(|t| t == "main")
    }
}

/// Every IPv6 route of `host`, all tables.
pub fn routes(lab: &Lab, host: &str) -> Result<Vec<Route6>> {
    let args = ["ip", "-j", "-d", "-6", "route", "show", "table", "all"];
    let json = lab.exec(host, &args)?;
    serde_json::from_str(&json)
        .with_context(|| format!("parsing `{}` on {host}: {json}", args.join(" ")))
}

/// The router's IPv6 default route through wan`n` in main: its gateway.
pub fn default_gateway(lab: &Lab, n: u8) -> Result<Option<Ipv6Addr>> {
    let wan = format!("wan{n}");
    Ok(routes(lab, "router")?
        .into_iter()
        .find(|r| r.dst == "default" && r.in_main() && r.dev.as_deref() == Some(&wan))
        .and_then(|r| r.gateway))
}

/// The delegations as the router's kernel shows them: dhcpcd's
/// `unreachable PREFIX dev lo proto dhcp` routes, one per delegated prefix,
/// from whichever uplink.
pub fn kernel_delegations(lab: &Lab) -> Result<Vec<Cidr>> {
    routes(lab, "router")?
        .into_iter()
        .filter(|r| {
            r.kind == "unreachable"
                && r.in_main()
                && r.dev.as_deref() == Some("lo")
                && r.protocol.as_deref() == Some("dhcp")
        })
        .map(|r| r.prefix())
        .collect()
}

/// The prefixes delegated to wan`n` as dhcpcd's hook wrote them down.
pub fn recorded_delegations(lab: &Lab, n: u8) -> Result<Vec<Cidr>> {
    let path = router_dir(lab)?.join("pd").join(format!("wan{n}.pd"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .map(|l| l.parse().with_context(|| format!("in {}", path.display())))
        .collect()
}

/// One of Kea's leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address (an IA_NA lease, /128) or the delegated prefix.
    pub prefix: Cidr,
    pub delegated: bool,
    pub duid: String,
}

/// ISP `n`'s leases that are in force, from Kea's lease file: the last
/// line for each address or prefix wins (Kea appends every change), and
/// a lease counts if its valid lifetime has not run out and Kea has not
/// declined or reclaimed it.
pub fn leases(lab: &Lab, n: u8) -> Result<Vec<Lease>> {
    let path = isp_dir(lab, n)?.join("leases6.csv");
    let csv = match std::fs::read_to_string(&path) {
        Ok(csv) => csv,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    parse_leases(&csv, now).with_context(|| format!("in Kea's lease file {}", path.display()))
}

fn parse_leases(csv: &str, now: u64) -> Result<Vec<Lease>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no column `{name}` in its header {header:?}"))
    };
    let (address, duid, valid, expire, kind, len, state) = (
        column("address")?,
        column("duid")?,
        column("valid_lifetime")?,
        column("expire")?,
        column("lease_type")?,
        column("prefix_len")?,
        column("state")?,
    );
    let mut last: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        ensure!(fields.len() >= header.len(), "short line `{line}`");
        last.insert((fields[address].into(), fields[kind].into()), fields);
    }
    let number = |fields: &[&str], i: usize| -> Result<u64> {
        fields[i]
            .parse()
            .with_context(|| format!("`{}` in column {} is not a number", fields[i], header[i]))
    };
    let mut leases = Vec::new();
    for fields in last.values() {
        // Lease type 0 is IA_NA, 2 IA_PD; state 0 is in force.
        let in_force =
            number(fields, valid)? > 0 && number(fields, expire)? > now && fields[state] == "0";
        let delegated = match fields[kind] {
            "0" => false,
            "2" => true,
            _ => continue,
        };
        if !in_force {
            continue;
        }
        let prefix = format!("{}/{}", fields[address], fields[len])
            .parse()
            .with_context(|| format!("lease `{}`", fields.join(",")))?;
        leases.push(Lease {
            prefix,
            delegated,
            duid: fields[duid].to_string(),
        });
    }
    Ok(leases)
}

/// What a BNG does and Kea does not: routes each prefix that ISP `n`
/// delegated to the address it leased to the same client, and removes
/// its routes to prefixes no longer delegated. Returns the prefixes routed.
pub fn route_delegations(lab: &Lab, n: u8) -> Result<Vec<Cidr>> {
    let isp = format!("isp{n}");
    let leases = leases(lab, n)?;
    let mut wanted = BTreeMap::new();
    for pd in leases.iter().filter(|l| l.delegated) {
        let via = leases
            .iter()
            .find(|l| !l.delegated && l.duid == pd.duid)
            .with_context(|| {
                format!(
                    "{isp} delegated {} to a client it leased no address",
                    pd.prefix
                )
            })?;
        wanted.insert(pd.prefix.to_string(), via.prefix.addr.to_string());
    }
    let ours = routes(lab, &isp)?
        .into_iter()
        .filter(|r| r.in_main() && r.protocol.as_deref() == Some(BNG_PROTO));
    for route in ours {
        if !wanted.contains_key(&route.prefix()?.to_string()) {
            lab.exec(
                &isp,
                &["ip", "-6", "route", "del", &route.dst, "proto", BNG_PROTO],
            )
            .with_context(|| format!("removing {isp}'s route to {}", route.dst))?;
        }
    }
    for (prefix, via) in &wanted {
        let args = [
            "ip", "-6", "route", "replace", prefix, "via", via, "dev", "down0", "proto", BNG_PROTO,
        ];
        lab.exec(&isp, &args)
            .with_context(|| format!("routing {prefix} to the router on {isp}"))?;
    }
    wanted.keys().map(|p| p.parse()).collect()
}

/// Waits until the router's wan`n` has a global address of
/// [`wan_subnet`]`(n)`, and returns it.
pub fn wait_wan_address(lab: &Lab, n: u8) -> Result<Ipv6Addr> {
    let wan = format!("wan{n}");
    let mut found = None;
    wait_for(&format!("a DHCPv6 address on {wan}"), TIMEOUT, || {
        found = global_addresses(lab, "router", &wan)?
            .into_iter()
            .find(|c| wan_subnet(n).contains(c.addr));
        Ok(found.is_some())
    })
    .with_context(|| client_log(lab))?;
    match found.map(|c| c.addr) {
        Some(IpAddr::V6(a)) => Ok(a),
        other => bail!("{wan}'s address {other:?} is not IPv6"),
    }
}

/// Waits until the router has a default route through wan`n` in main,
/// and returns its gateway (ISP `n`'s link-local address).
pub fn wait_default_route(lab: &Lab, n: u8) -> Result<Ipv6Addr> {
    let mut found = None;
    wait_for(
        &format!("an IPv6 default route through wan{n}"),
        TIMEOUT,
        || {
            found = default_gateway(lab, n)?;
            Ok(found.is_some())
        },
    )
    .with_context(|| client_log(lab))?;
    found.with_context(|| format!("the default route through wan{n} has no gateway"))
}

/// Waits until ISP `n` has delegated a /56 for which `accept` holds, and
/// the router shows it both ways (dhcpcd's reject route, the hook's
/// record for wan`n`, which holds that one alone). Returns it.
fn wait_delegation_where(lab: &Lab, n: u8, accept: impl Fn(Cidr) -> bool) -> Result<Cidr> {
    let mut found = None;
    wait_for(
        &format!("a prefix delegated by isp{n} on the router"),
        TIMEOUT,
        || {
            let leased: Vec<Cidr> = leases(lab, n)?
                .into_iter()
                .filter(|l| l.delegated)
                .map(|l| l.prefix)
                .collect();
            let [prefix] = leased[..] else {
                return Ok(false);
            };
            found = Some(prefix);
            Ok(accept(prefix)
                && recorded_delegations(lab, n)? == [prefix]
                && kernel_delegations(lab)?.contains(&prefix))
        },
    )
    .with_context(|| {
        format!(
            "isp{n}'s lease: {found:?}; {}; {}",
            client_log(lab),
            isp_dir(lab, n).map_or_else(|e| format!("{e:#}"), |d| log_tail(&d.join("kea.log")))
        )
    })?;
    found.with_context(|| format!("isp{n} delegated nothing"))
}

/// Waits for ISP `n`'s delegation to the router (see
/// [`wait_delegation_where`]) and returns it.
pub fn wait_delegation(lab: &Lab, n: u8) -> Result<Cidr> {
    wait_delegation_where(lab, n, |_| true)
}

/// Waits until br-lan's only global address is a /64 inside `delegation`,
/// and returns that /64.
pub fn wait_lan_prefix(lab: &Lab, delegation: Cidr) -> Result<Cidr> {
    let mut seen = Vec::new();
    wait_for(
        &format!("a /64 of {delegation} alone on {LAN_IFNAME}"),
        TIMEOUT,
        || {
            seen = global_addresses(lab, "router", LAN_IFNAME)?;
            Ok(matches!(seen[..], [a] if a.prefix_len == 64 && within(a, delegation)))
        },
    )
    .with_context(|| format!("{LAN_IFNAME} has {seen:?}; {}", client_log(lab)))?;
    Ok(network(seen[0]))
}

/// Waits until the client has a SLAAC address in `lan`, and returns it.
pub fn wait_slaac(lab: &Lab, lan: Cidr) -> Result<Ipv6Addr> {
    wait_slaac_on(lab, "client", lan)
}

/// [`wait_slaac`] on LAN host `host` (its `eth0`).
pub fn wait_slaac_on(lab: &Lab, host: &str, lan: Cidr) -> Result<Ipv6Addr> {
    let mut found = None;
    wait_for(
        &format!("a SLAAC address in {lan} on {host}"),
        TIMEOUT,
        || {
            found = global_addresses(lab, host, "eth0")?
                .into_iter()
                .find_map(|c| match c.addr {
                    IpAddr::V6(a) if lan.contains(c.addr) => Some(a),
                    _ => None,
                });
            Ok(found.is_some())
        },
    )
    .with_context(|| {
        router_dir(lab).map_or_else(|e| format!("{e:#}"), |d| log_tail(&d.join("radvd.log")))
    })?;
    found.context("no SLAAC address")
}

fn client_log(lab: &Lab) -> String {
    router_dir(lab).map_or_else(|e| format!("{e:#}"), |d| log_tail(&d.join("dhcpcd.log")))
}

/// What the router got from ISP `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uplink6 {
    pub n: u8,
    /// wan`n`'s address (IA_NA).
    pub address: Ipv6Addr,
    /// The default route's next hop: ISP `n`'s link-local address.
    pub gateway: Ipv6Addr,
    /// The /56 delegated (IA_PD).
    pub delegation: Cidr,
}

/// The IPv6 processes of a lab, and what they gave the router and client.
#[derive(Debug)]
pub struct Dhcp6 {
    /// ISP number, Kea's pid, the generation of its prefix pool.
    pub servers: Vec<(u8, u32, u8)>,
    /// ISP number, radvd's pid.
    pub isp_ras: Vec<(u8, u32)>,
    /// dhcpcd's pid on the router.
    pub client: u32,
    /// radvd's pid on the router's LAN.
    pub lan_ra: u32,
    pub uplinks: Vec<Uplink6>,
    /// The /64 on br-lan.
    pub lan: Cidr,
    /// The client's SLAAC address in `lan`.
    pub client_address: Ipv6Addr,
}

impl Dhcp6 {
    /// What the router got from ISP `n`.
    pub fn uplink(&self, n: u8) -> Result<Uplink6> {
        self.uplinks
            .iter()
            .find(|u| u.n == n)
            .copied()
            .with_context(|| format!("wan{n} has no IPv6 uplink in this lab"))
    }
}

/// The whole of IPv6 in the DHCP lab on `uplinks` (which must include
/// [`LAN_UPLINK`]): Kea and radvd in each of those ISPs, dhcpcd and the
/// LAN's radvd on the router, each ISP routing its delegation to the
/// router; waits for every uplink's address, default route and delegation,
/// the LAN's /64 and the client's SLAAC address.
pub fn start(lab: &mut Lab, uplinks: &[u8]) -> Result<Dhcp6> {
    require_tools()?;
    ensure!(
        uplinks.contains(&LAN_UPLINK),
        "the LAN's prefix comes from wan{LAN_UPLINK}, which is not among uplinks {uplinks:?}"
    );
    let (mut servers, mut isp_ras) = (Vec::new(), Vec::new());
    // The ISPs are up before the router asks, as in the field.
    for &n in uplinks {
        servers.push((n, start_server(lab, n, 1)?, 1));
        isp_ras.push((n, start_isp_ra(lab, n)?));
    }
    let client = start_client(lab, uplinks)?;
    let lan_ra = start_lan_ra(lab)?;
    let mut got = Vec::new();
    for &n in uplinks {
        let address = wait_wan_address(lab, n)?;
        let gateway = wait_default_route(lab, n)?;
        let delegation = wait_delegation(lab, n)?;
        route_delegations(lab, n)?;
        got.push(Uplink6 {
            n,
            address,
            gateway,
            delegation,
        });
    }
    let delegation = got
        .iter()
        .find(|u| u.n == LAN_UPLINK)
        .map(|u| u.delegation)
        .context("no delegation on the LAN's uplink")?;
    let lan = wait_lan_prefix(lab, delegation)?;
    let client_address = wait_slaac(lab, lan)?;
    Ok(Dhcp6 {
        servers,
        isp_ras,
        client,
        lan_ra,
        uplinks: got,
        lan,
        client_address,
    })
}

/// ISP `n` renumbers: its Kea restarts with the next pool (its leases
/// kept), the router renews (as at T1) and is told its old /56 is over and
/// given a new one, and the ISP's route moves to the new one. Waits until
/// the router holds the new /56 alone and, when `n` is the LAN's uplink,
/// until br-lan carries only a /64 of it and the client has a SLAAC
/// address there. Returns the new delegation.
pub fn renumber(lab: &mut Lab, v6: &mut Dhcp6, n: u8) -> Result<Cidr> {
    let old = v6.uplink(n)?.delegation;
    let index = v6
        .servers
        .iter()
        .position(|s| s.0 == n)
        .with_context(|| format!("isp{n} runs no DHCPv6 server"))?;
    let (_, pid, generation) = v6.servers[index];
    lab.stop(pid)
        .with_context(|| format!("stopping isp{n}'s Kea to renumber"))?;
    let generation = generation + 1;
    let pid = start_server(lab, n, generation)?;
    v6.servers[index] = (n, pid, generation);
    renew(lab, v6.client)?;
    let new = wait_delegation_where(lab, n, |p| !within(p, old) && !within(old, p))?;
    route_delegations(lab, n)?;
    for uplink in v6.uplinks.iter_mut().filter(|u| u.n == n) {
        uplink.delegation = new;
    }
    if n == LAN_UPLINK {
        v6.lan = wait_lan_prefix(lab, new)?;
        v6.client_address = wait_slaac(lab, v6.lan)?;
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_the_plan() -> Result<()> {
        assert_eq!(isp_space(2).to_string(), "2001:db8:2::/48");
        assert_eq!(wan_subnet(3).to_string(), "2001:db8:3:ffff::/64");
        assert_eq!(pd_pool(1, 1).to_string(), "2001:db8:1:1000::/52");
        assert_eq!(pd_pool(1, 2).to_string(), "2001:db8:1:2000::/52");
        assert_eq!(
            network("2001:db8:1:1000::1/64".parse()?).to_string(),
            "2001:db8:1:1000::/64"
        );
        assert!(within("2001:db8:1:1000::/64".parse()?, pd_pool(1, 1)));
        assert!(!within(pd_pool(1, 1), "2001:db8:1:1000::/64".parse()?));
        for n in 1..=3 {
            assert!(within(wan_subnet(n), isp_space(n)));
            assert!(within(pd_pool(n, 15), isp_space(n)));
        }
        Ok(())
    }

    #[test]
    fn kea_leases_last_line_wins() -> Result<()> {
        let csv = "address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,fqdn_fwd,fqdn_rev,hostname,hwaddr,state,user_context,hwtype,hwaddr_source\n\
            2001:db8:1:ffff::100,00:01,120,1000,1,90,0,11,128,0,0,,02:7c,0,,1,2\n\
            2001:db8:1:1000::,00:01,120,1000,1,90,2,12,56,0,0,,02:7c,0,,1,2\n\
            2001:db8:1:1000::,00:01,0,900,1,0,2,12,56,0,0,,02:7c,0,,1,2\n\
            2001:db8:1:2000::,00:01,120,1000,1,90,2,12,56,0,0,,02:7c,0,,1,2\n\
            2001:db8:1:3000::,00:01,120,500,1,90,2,12,56,0,0,,02:7c,0,,1,2\n";
        let leases = parse_leases(csv, 800)?;
        let shown: Vec<(String, bool)> = leases
            .iter()
            .map(|l| (l.prefix.to_string(), l.delegated))
            .collect();
        assert_eq!(
            shown,
            [
                ("2001:db8:1:2000::/56".to_string(), true),
                ("2001:db8:1:ffff::100/128".to_string(), false)
            ]
        );
        Ok(())
    }

    #[test]
    fn dhcpcd_assigns_only_the_lan_uplinks_delegation() -> Result<()> {
        let conf = dhcpcd_config(&[1, 2], Path::new("/h.sh"), Path::new("/s"))?;
        assert!(conf.contains("interface wan1\n  metric 101\n  ia_na 11\n  ia_pd 12 br-lan/0/64\n"));
        assert!(conf.contains("interface wan2\n  metric 102\n  ia_na 21\n  ia_pd 22 -\n"));
        assert!(conf.contains("allowinterfaces wan1 wan2 br-lan\n"));
        Ok(())
    }
}
