//! `cargo xtask run` and `cargo xtask lab up|down`: the interactive lab.
//!
//! The lab's namespaces are named `lb-<host>` (tests use generated prefixes,
//! so both can exist side by side). `run` owns the lab for its lifetime and
//! tears it down on Ctrl-C; `lab up` leaves it up until `lab down`. `run` on
//! the DHCP lab is dual-stack: the ISPs' DHCP and DHCPv6 servers and the
//! router's clients are started as the tests start them (`lb_tests::dhcp`,
//! `lb_tests::dhcp6`), so that lbd balances both families.

use std::{
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{desc::LabDesc, lab::Lab};

use crate::root;

/// The lab `run` and `lab up` use unless told otherwise.
pub const DEFAULT_LAB: &str = "dhcp";
/// Namespace prefix of the interactive lab.
const PREFIX: &str = "lb-";
/// How long lbd gets to come up and answer on its control socket.
const LBD_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long lbd gets, once it answers, to balance IPv6 on every uplink.
const IPV6_TIMEOUT: Duration = Duration::from_secs(30);
/// The DHCP lab's uplinks: each gets an IPv4 lease and, from its ISP's
/// Kea, an IPv6 address and a delegated prefix.
const UPLINKS: [u8; 3] = [1, 2, 3];

pub fn lab_up(name: &str) -> Result<()> {
    crate::setup::run()?;
    let lab = bring_up(name)?;
    lab.leak();
    println!("lab {name} is up (namespaces {PREFIX}*); `cargo xtask lab down` removes it");
    Ok(())
}

/// How `lab fail` fails an ISP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Failure {
    /// The ISP's link to the internet goes down; its gateway still answers.
    Upstream,
    /// The ISP's end of the router's uplink goes down: no carrier.
    Carrier,
}

/// The ISP host `isp` of the running lab (`lb-isp1`, ...), checked.
fn isp_ns(isp: &str) -> Result<String> {
    anyhow::ensure!(
        isp.starts_with("isp") && isp[3..].parse::<u8>().is_ok(),
        "expected an ISP like isp1, got {isp:?}"
    );
    let ns = format!("{PREFIX}{isp}");
    let existing = Command::new("ip").args(["netns", "list"]).output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&existing.stdout)
            .split_whitespace()
            .any(|n| n == ns),
        "no namespace {ns}: is the lab up (`cargo xtask run` or `cargo xtask lab up`)?"
    );
    Ok(ns)
}

fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .status()
        .context("running ip")?;
    anyhow::ensure!(status.success(), "`ip -n {ns} {}` failed", args.join(" "));
    Ok(())
}

pub fn lab_fail(isp: &str, how: Failure) -> Result<()> {
    let ns = isp_ns(isp)?;
    let ifname = match how {
        Failure::Upstream => "up0",
        Failure::Carrier => "down0",
    };
    ip_in(&ns, &["link", "set", "dev", ifname, "down"])?;
    println!(
        "lab: {isp}'s {ifname} is down ({}); watch `lbctl status` and `lbctl events --follow`; `cargo xtask lab restore {isp}` undoes it",
        match how {
            Failure::Upstream => "cut from the internet, its gateway still answers",
            Failure::Carrier => "the router's uplink lost its carrier",
        }
    );
    Ok(())
}

pub fn lab_restore(isp: &str) -> Result<()> {
    let ns = isp_ns(isp)?;
    for ifname in ["down0", "up0"] {
        ip_in(&ns, &["link", "set", "dev", ifname, "up"])?;
    }
    // Taking up0 down deleted the ISP's default route through it.
    let n = &isp[3..];
    ip_in(
        &ns,
        &[
            "route",
            "replace",
            "default",
            "via",
            &format!("100.65.{n}.2"),
        ],
    )?;
    println!("lab: {isp}'s links are up again; lb takes it back after `rise` good probe rounds");
    Ok(())
}

pub fn lab_down() -> Result<()> {
    let removed = Lab::down(PREFIX)?;
    if removed.is_empty() {
        println!("lab: nothing to take down");
    } else {
        println!("lab: removed {}", removed.join(" "));
    }
    Ok(())
}

fn bring_up(name: &str) -> Result<Lab> {
    // A lab left over from a crash would make `up` fail half-way.
    Lab::down(PREFIX)?;
    let desc =
        LabDesc::shipped(name).with_context(|| format!("loading lab {name} from tests/labs"))?;
    Lab::up(&desc, PREFIX)
}

pub fn run(lab_name: &str) -> Result<()> {
    let bin = crate::build::release()?;
    let (lbd, lbctl) = (bin.join("lbd"), bin.join("lbctl"));
    let example = root().join("lb-daemon/examples/lbd.toml");
    // The example's LAN is the DHCP lab's bridge; the static labs' is lan0.
    let config = if lab_name == DEFAULT_LAB {
        example
    } else {
        let text = std::fs::read_to_string(&example)
            .with_context(|| format!("reading {}", example.display()))?;
        let adapted = std::env::temp_dir().join(format!("lbd-{lab_name}.toml"));
        std::fs::write(&adapted, text.replace("\"br-lan\"", "\"lan0\""))
            .with_context(|| format!("writing {}", adapted.display()))?;
        adapted
    };

    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    println!("run: bringing up lab {lab_name}");
    let mut lab = bring_up(lab_name)?;
    let v6 = if lab_name == DEFAULT_LAB {
        println!("run: starting the ISPs' DHCP servers and the router's DHCP clients");
        lb_tests::dhcp::start(&mut lab, &UPLINKS)?;
        println!(
            "run: starting IPv6: the ISPs' Kea (DHCPv6 with prefix delegation) and radvd, the \
             router's dhcpcd and the LAN's radvd"
        );
        let v6 = lb_tests::dhcp6::start(&mut lab, &UPLINKS)
            .context("starting the DHCP lab's IPv6 (`cargo xtask setup` installs its tools)")?;
        Some(v6)
    } else {
        None
    };
    let router = lab.ns("router")?.to_string();
    // The router's network namespace with the host's bpffs, where lbd pins
    // its data plane.
    let pid = lab.spawn_net_only("router", &[path_str(&lbd)?, "--config", path_str(&config)?])?;
    wait_for_lbd(&lbctl)?;
    if let Some(v6) = &v6 {
        let lan = v6.lan.to_string();
        let uplinks: Vec<String> = UPLINKS.iter().map(|n| format!("isp{n}")).collect();
        match wait_for_ipv6(&lbctl, &lan, &uplinks) {
            Ok(took) => println!("run: lbd balances IPv6 on {lan} ({took:.1?} after it answered)"),
            // The lab stays up to be looked at: say what is missing.
            Err(e) => println!("run: warning: {e:#}"),
        }
    }

    let status = Command::new(&lbctl)
        .arg("status")
        .output()
        .context("running lbctl status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    let client = lab.ns("client")?;
    let inet = lab.ns("inet")?;
    if let Some(v6) = &v6 {
        println!(
            "
IPv6: the client has {addr} (SLAAC in {lan}); the internet server is {server}.
  ip netns exec {client} ping -c 3 {server}
  {lbctl} explain [{addr}]:40000 [{server}]:443   # which uplink, and the source it leaves with
  {lbctl} flows; {lbctl} events",
            addr = v6.client_address,
            lan = v6.lan,
            server = lb_tests::dhcp6::SERVER,
            lbctl = lbctl.display(),
        );
    }
    println!(
        "
lb is running in namespace {router} with {config}.
Try, in another terminal:
  ip netns exec {client} ping -c 3 198.51.100.10
  ip netns exec {inet} iperf3 -s -D && ip netns exec {client} iperf3 -c 198.51.100.10 -P 8 -t 5
  {lbctl} status            # per-uplink state and why, counters; --json for scripts
  ip netns exec {router} ip rule; ip netns exec {router} ip route show table all proto 251
  ip netns exec {router} ip -s link show wan1
Ctrl-C stops lbd and tears the lab down.",
        config = config.display(),
        lbctl = lbctl.display(),
    );
    let _ = stop_rx.recv();
    println!("\nrun: stopping lbd, removing what it pinned, tearing the lab down");
    lab.stop(pid)?;
    lab.exec_net_only(
        "router",
        &[
            path_str(&lbd)?,
            "--teardown",
            "--config",
            path_str(&config)?,
        ],
    )?;
    drop(lab);
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// Poll `lbctl --json status` until lbd balances IPv6 on `lan` with each
/// of `uplinks` active for IPv6; how long it took.
fn wait_for_ipv6(lbctl: &Path, lan: &str, uplinks: &[String]) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let out = Command::new(lbctl)
            .args(["--json", "status"])
            .output()
            .context("running lbctl --json status")?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "reading lbctl --json status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        let inactive: Vec<&str> = uplinks
            .iter()
            .map(String::as_str)
            .filter(|name| {
                !status["uplinks"].as_array().is_some_and(|all| {
                    all.iter()
                        .any(|u| u["name"] == *name && u["ipv6"]["state"] == "active")
                })
            })
            .collect();
        if status["lan_prefix6"] == lan && inactive.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > IPV6_TIMEOUT {
            bail!(
                "lbd did not balance IPv6 within {IPV6_TIMEOUT:?}: the LAN's prefix is {} (the \
                 lab gave {lan}), not active for IPv6: {}; see `lbctl status` and `lbctl events`",
                status["lan_prefix6"],
                inactive.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll `lbctl status` until lbd answers, with a bound.
fn wait_for_lbd(lbctl: &Path) -> Result<()> {
    let deadline = Instant::now() + LBD_START_TIMEOUT;
    loop {
        let out = Command::new(lbctl)
            .arg("status")
            .output()
            .context("running lbctl")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "lbd did not answer within {LBD_START_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
