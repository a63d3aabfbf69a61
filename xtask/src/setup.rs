//! `cargo xtask setup`: install what is missing, and nothing else.
//!
//! Idempotent and quick when everything is present: each check is a version
//! query or a file lookup; each install says what it installs and why.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cmd, root};

/// The one bpf-linker that links against the LLVM of our nightly.
const BPF_LINKER_VERSION: &str = "0.10.3";

/// Debian packages the labs, tests and benchmarks use: a command each
/// provides, and the package name.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    // sysctl for every lab's hosts; kill for signals to lbd in a lab.
    ("sysctl", "procps"),
    // nsenter runs lbd in a lab's router with the host's bpffs.
    ("nsenter", "util-linux"),
    // The lab's DHCP client hook (tests/labs/udhcpc.sh).
    ("awk", "mawk"),
    ("nft", "nftables"),
    ("ethtool", "ethtool"),
    ("iperf3", "iperf3"),
    // The benchmark's profile of where the router's time per frame goes.
    ("perf", "linux-perf"),
    ("tcpdump", "tcpdump"),
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    ("traceroute", "traceroute"),
    ("conntrack", "conntrack"),
    // The benchmark's kernel way for IPv6: SNPT/DNPT are xtables targets
    // only (ip6tables on nftables' backend).
    ("ip6tables", "iptables"),
    ("arping", "iputils-arping"),
    // The DHCP lab: a DHCP server in the ISPs, a DHCP client on the router
    // (busybox's, as OpenWrt has).
    ("dnsmasq", "dnsmasq-base"),
    ("udhcpc", "udhcpc"),
    // IPv6 in the DHCP lab (tests/src/dhcp6.rs): the ISPs' DHCPv6 server
    // with prefix delegation, the router's DHCPv6 client, and router
    // advertisements on both sides.
    ("kea-dhcp6", "kea-dhcp6-server"),
    ("dhcpcd", "dhcpcd-base"),
    ("radvd", "radvd"),
    // A WireGuard uplink in the tunnel lab (tests/src/wireguard.rs):
    // userspace WireGuard on a tun device, and `wg` to configure it.
    ("wireguard-go", "wireguard-go"),
    ("wg", "wireguard-tools"),
    // Checks lbd's metrics as Prometheus would read them.
    ("promtool", "prometheus"),
    // Build and check the package: dpkg-deb, man, systemd-analyze verify.
    ("dpkg-deb", "dpkg"),
    ("gzip", "gzip"),
    ("man", "man-db"),
    ("systemd-analyze", "systemd"),
];

pub fn run() -> Result<()> {
    nightly()?;
    bpf_linker()?;
    packages()?;
    bpffs()?;
    println!("setup: everything lb needs is present");
    Ok(())
}

/// The channel pinned in lb-ebpf/rust-toolchain.toml.
pub fn pinned_nightly() -> Result<String> {
    let path = root().join("lb-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.trim().strip_prefix("channel").map(|rest| {
                rest.trim_start_matches([' ', '='])
                    .trim_matches('"')
                    .to_string()
            })
        })
        .with_context(|| format!("no channel in {}", path.display()))
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> Result<()> {
    let channel = pinned_nightly()?;
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", &channel],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: installing Rust {channel} with rust-src (builds the XDP programs)");
    cmd(
        "rustup",
        &[
            "toolchain",
            "install",
            &channel,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ],
    )
}

fn bpf_linker() -> Result<()> {
    let have = output("bpf-linker", &["--version"]).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (links the XDP object; takes a few minutes once)");
    cmd(
        "cargo",
        &[
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ],
    )
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| output("sh", &["-c", &format!("command -v {command}")]).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "setup: installing Debian packages {} (labs and tests)",
        missing.join(" ")
    );
    cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("could not run apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    }
    cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
}
