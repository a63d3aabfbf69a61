//! Real DHCP in a lab (`labs/dhcp.toml`): Debian's dnsmasq as each ISP's
//! DHCP server, busybox's udhcpc (OpenWrt's client) on the router's uplinks
//! with `labs/udhcpc.sh` as its hook.
//!
//! Starts and stops them as lab processes (stopped with the lab, too), and
//! waits for what they do. Never configures an address or a route itself:
//! that is the client's job, as on a real router.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{stream::wait_for, Lab};

/// How long a lease may take: the client asks every second.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// The hook udhcpc runs on each event.
pub fn client_hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/udhcpc.sh")
}

/// Uplink `n`'s router address in the DHCP lab with lease host number
/// `host` (100.64.n.host).
pub fn uplink_addr(n: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, n, host)
}

/// The MAC address of `host:ifname`.
pub fn mac_of(lab: &Lab, host: &str, ifname: &str) -> Result<String> {
    let path = format!("/sys/class/net/{ifname}/address");
    Ok(lab.exec(host, &["cat", &path])?.trim().to_string())
}

/// Start ispN's DHCP server on its `down0`, leasing 100.64.N.`host` to
/// the router's wanN (by its MAC address) with 100.64.N.1 as the router.
/// Returns its pid, for [`Lab::stop`].
pub fn start_server(lab: &mut Lab, n: u8, host: u8) -> Result<u32> {
    let mac = mac_of(lab, "router", &format!("wan{n}"))?;
    let isp = format!("isp{n}");
    let args = [
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        // DHCP only: no DNS.
        "--port=0".into(),
        "--interface=down0".into(),
        "--bind-dynamic".into(),
        format!("--dhcp-range=100.64.{n}.2,100.64.{n}.6,255.255.255.248,2m"),
        format!("--dhcp-host={mac},{}", uplink_addr(n, host)),
        format!("--dhcp-option=option:router,100.64.{n}.1"),
        // It answers for its network: a client asking for an address it no
        // longer has is told no at once, and starts over.
        "--dhcp-authoritative".into(),
        "--leasefile-ro".into(),
        "--pid-file".into(),
        "--user=root".into(),
        "--log-facility=-".into(),
        "--quiet-dhcp".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(&isp, &args)
        .with_context(|| format!("starting {isp}'s DHCP server (dnsmasq)"))
}

/// Start the router's DHCP client on wanN; its default route goes into
/// `table` ("main", or a number). Returns its pid.
pub fn start_client(lab: &mut Lab, n: u8, table: &str) -> Result<u32> {
    let hook = client_hook();
    let hook = hook
        .to_str()
        .context("the lab directory's path is not UTF-8")?;
    let ifname = format!("wan{n}");
    let table = format!("LB_DHCP_TABLE={table}");
    let args = [
        "env", &table, "udhcpc", "-f", "-i", &ifname, "-s", hook,
        // Ask every second, and never give up.
        "-t", "3", "-T", "1", "-A", "1",
    ];
    lab.spawn("router", &args)
        .with_context(|| format!("starting the router's DHCP client on {ifname} (udhcpc)"))
}

/// Renew wanN's lease now (udhcpc's SIGUSR1), as a client does when its
/// lease is half over.
pub fn renew(lab: &Lab, client_pid: u32) -> Result<()> {
    let pid = client_pid.to_string();
    lab.exec("router", &["kill", "-USR1", &pid])
        .map(|_| ())
        .context("asking udhcpc to renew")
}

/// The IPv4 addresses on `host:ifname`.
pub fn addresses(lab: &Lab, host: &str, ifname: &str) -> Result<Vec<Ipv4Addr>> {
    let out = lab.exec(host, &["ip", "-4", "-o", "addr", "show", "dev", ifname])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            cidr.split('/').next()?.parse().ok()
        })
        .collect())
}

/// Wait until the router's wanN has exactly address `addr`.
pub fn wait_lease(lab: &Lab, n: u8, addr: Ipv4Addr) -> Result<()> {
    let ifname = format!("wan{n}");
    wait_for(
        &format!("a lease of {addr} on {ifname}"),
        LEASE_TIMEOUT,
        || Ok(addresses(lab, "router", &ifname)? == [addr]),
    )
}

/// The DHCP processes of a lab, by uplink number.
pub struct Dhcp {
    pub servers: Vec<(u8, u32)>,
    pub clients: Vec<(u8, u32)>,
}

impl Dhcp {
    /// The pid of uplink `n`'s server.
    pub fn server(&self, n: u8) -> Result<u32> {
        find(&self.servers, n).with_context(|| format!("isp{n} has no DHCP server"))
    }

    /// The pid of the router's client on wan`n`.
    pub fn client(&self, n: u8) -> Result<u32> {
        find(&self.clients, n).with_context(|| format!("wan{n} has no DHCP client"))
    }
}

fn find(pids: &[(u8, u32)], n: u8) -> Option<u32> {
    pids.iter().find(|(m, _)| *m == n).map(|(_, pid)| *pid)
}

/// The whole DHCP lab's usual start: servers on the ISPs in `servers`
/// (each leasing 100.64.N.2), clients on every uplink (wan1's default
/// route in main, the others' in tables 102 and 103), and the leases of
/// the uplinks with a server waited for.
pub fn start(lab: &mut Lab, servers: &[u8]) -> Result<Dhcp> {
    let mut dhcp = Dhcp {
        servers: Vec::new(),
        clients: Vec::new(),
    };
    for &n in servers {
        dhcp.servers.push((n, start_server(lab, n, 2)?));
    }
    for (n, table) in [(1, "main"), (2, "102"), (3, "103")] {
        dhcp.clients.push((n, start_client(lab, n, table)?));
    }
    for &n in servers {
        wait_lease(lab, n, uplink_addr(n, 2))?;
    }
    Ok(dhcp)
}
