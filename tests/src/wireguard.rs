//! A WireGuard uplink, as a router has one to a VPN provider: userspace
//! WireGuard (`wireguard-go`, on a tun device: an L3 device, MTU 1420) on
//! the router, its peer on the VPN provider's host (`vpn`, beyond the
//! internet), the tunnel riding over the router's own default route. The
//! provider forwards what comes out of the tunnel to the internet, behind
//! its own address (masquerade), as VPN providers do.
//!
//! Owns both `wireguard-go` processes (lab processes, stopped with the
//! lab), their keys and the provider's NAT table. Never configures lbd or
//! the router's routing: lbd does what it needs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{Lab, TEST_PREFIX_ROOT};

/// WireGuard's port on the provider.
const PORT: u16 = 51820;
/// The tunnel's own addresses: the router's end and the provider's.
pub const ROUTER_ADDR: &str = "10.88.0.2/30";
pub const PROVIDER_ADDR: &str = "10.88.0.1/30";
/// The provider's address beyond the internet.
const PROVIDER: &str = "100.66.0.2";
/// How long `wireguard-go` may take to make its device.
const READY: Duration = Duration::from_secs(10);
/// `wireguard-go`'s control sockets (one per device name, on the host's
/// file system: names must be unique across labs).
const UAPI_DIR: &str = "/var/run/wireguard";

/// A running tunnel.
pub struct Tunnel {
    /// The router's WireGuard device.
    pub ifname: String,
    /// The provider's.
    pub provider_ifname: String,
}

impl Tunnel {
    /// The UDP port the router's end sends its own packets from.
    pub fn listen_port(&self, lab: &Lab) -> Result<u16> {
        let out = lab.exec("router", &["wg", "show", &self.ifname, "listen-port"])?;
        out.trim()
            .parse()
            .with_context(|| format!("`wg show {} listen-port` said {out:?}", self.ifname))
    }
}

/// `wg` and `wireguard-go` are there, or the error names them.
pub fn require_tools() -> Result<()> {
    let missing =
        crate::netns::missing_tools(&[("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")]);
    if !missing.is_empty() {
        bail!(
            "the WireGuard uplink needs {}, not on PATH; `cargo xtask setup` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Brings the tunnel up: keys, both devices, the provider's forwarding
/// and NAT; returns once both devices exist and are configured.
pub fn start(lab: &mut Lab) -> Result<Tunnel> {
    require_tools()?;
    // Device names from the lab's prefix: unique among labs running at
    // once, as their control sockets must be.
    let id: String = lab
        .prefix()
        .trim_start_matches(TEST_PREFIX_ROOT)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let ifname = short(&format!("wgr{id}"));
    let provider_ifname = short(&format!("wgv{id}"));
    let (router_key, provider_key) = (genkey()?, genkey()?);
    let dir = lab.files_dir()?;
    for (host, name, key, peer_key, extra, address) in [
        (
            "router",
            ifname.as_str(),
            &router_key,
            &provider_key,
            vec![
                "endpoint".to_string(),
                format!("{PROVIDER}:{PORT}"),
                "allowed-ips".into(),
                "0.0.0.0/0".into(),
            ],
            ROUTER_ADDR,
        ),
        (
            "vpn",
            provider_ifname.as_str(),
            &provider_key,
            &router_key,
            vec!["allowed-ips".into(), "10.88.0.2/32".into()],
            PROVIDER_ADDR,
        ),
    ] {
        lab.spawn(host, &["wireguard-go", "-f", name])
            .with_context(|| format!("starting wireguard-go for {name} on {host}"))?;
        wait_device(lab, host, name)?;
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&key_file, format!("{}\n", key.0))
            .with_context(|| format!("writing {}", key_file.display()))?;
        let key_path = path_str(&key_file)?;
        let mut args = vec!["wg", "set", name, "private-key", key_path];
        let port = PORT.to_string();
        if host == "vpn" {
            args.extend(["listen-port", &port]);
        }
        args.extend(["peer", &peer_key.1]);
        args.extend(extra.iter().map(String::as_str));
        lab.exec(host, &args)?;
        lab.exec(host, &["ip", "addr", "add", address, "dev", name])?;
        lab.exec(host, &["ip", "link", "set", "dev", name, "up"])?;
    }
    // The provider forwards the tunnel's traffic behind its own address.
    lab.exec(
        "vpn",
        &[
            "nft",
            "add table ip provider; \
             add chain ip provider post { type nat hook postrouting priority 100; }; \
             add rule ip provider post oifname \"eth0\" masquerade",
        ],
    )?;
    Ok(Tunnel {
        ifname,
        provider_ifname,
    })
}

/// At most 15 bytes: an interface name.
fn short(name: &str) -> String {
    name.chars().take(15).collect()
}

/// A key pair: (private, public), base64 as `wg` writes them.
fn genkey() -> Result<(String, String)> {
    let private = crate::netns::run(std::process::Command::new("wg").arg("genkey"))?;
    let private = private.trim().to_string();
    let mut child = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("wg pubkey's stdin")?;
        stdin.write_all(private.as_bytes())?;
    }
    let out = child.wait_with_output().context("wg pubkey")?;
    if !out.status.success() {
        bail!("wg pubkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Waits until `wireguard-go` made device `name` on `host` and listens on
/// its control socket.
fn wait_device(lab: &Lab, host: &str, name: &str) -> Result<()> {
    let socket = Path::new(UAPI_DIR).join(format!("{name}.sock"));
    let started = Instant::now();
    loop {
        let exists = lab.exec(host, &["ip", "link", "show", "dev", name]).is_ok();
        if exists && socket.exists() {
            return Ok(());
        }
        if started.elapsed() > READY {
            bail!(
                "wireguard-go did not make {name} on {host} within {READY:?} (device {}, socket {})",
                if exists { "there" } else { "missing" },
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
