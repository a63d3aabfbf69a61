//! Packets per second and router time through an L3 uplink (a device with
//! no link layer: a tun, WireGuard, a raw-IP modem), lb beside the
//! kernel's way in the same run, for two devices:
//!
//! - a bare tun device whose far end is a thread of this process that
//!   reads every packet and drops it ([`TunSink`]): what the router does,
//!   with a consumer that is not the bottleneck (a relay that writes each
//!   packet on, as the lab's raw-IP modem does, would be);
//! - a `wireguard-go` device (userspace WireGuard, `lb_tests::wireguard`),
//!   whose encrypted datagrams are counted and dropped on isp1, the first
//!   hop of the tunnel: the same router work plus WireGuard's own, so that
//!   the report can tell the two apart.
//!
//! lb's way is lbd with that device as its one uplink (the hand-off path:
//! `lan_ingress` passes the packet with a note, lb's tc program `handoff`
//! redirects it to the device's egress); the kernel's way is forward.rs's
//! nftables PCC (a conntrack mark from a hash, `ip rule fwmark`, a route
//! into the device, masquerade to its address). Each round runs every way
//! once, so drifting background load hits all alike. Replies are not
//! measured: the outbound rate needs none, and they take another program
//! (`wan_ingress_l3`), which `cargo xtask test` covers.
//!
//! It owns its lab (namespaces `lbl-*`), the tun device, the reading
//! thread and the tunnel's counting rule for the length of its run, and
//! never leaves any of it behind, also when a step fails (the lab goes down
//! with everything in it, the tun with its file). It never judges a speed:
//! the report states the figures.
//!
//! CPU (as in forward.rs): the generator and the router share the
//! generator's CPU, whose softirq time is the router's; the far ends (the
//! reading thread, `wireguard-go`, pinned there) run on another CPU, so
//! that their work is not counted as the router's.

use std::{
    fs::File,
    io::{ErrorKind, Read},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{daemon::Lbd, in_netns, tun, wireguard, Lab, LabDesc};

use super::{
    forward::{
        cpu_times, generator, generator_thread, mac, ticks_per_second, CpuTimes, GEN_PORT_BASE,
        WARMUP,
    },
    gen::{Generator, Source},
    Args,
};

/// Namespace prefix of this part's lab: its own, so that it never meets
/// forward.rs's `lbb-` lab, nor its WireGuard control socket.
const PREFIX: &str = "lbl-";
const LAB: &str = "default";
/// The tun device standing in for a raw-IP modem, on the router, and its
/// address (the modem network of tests/tests/l3.rs).
const TUN: &str = "l3tun0";
const TUN_ADDR: [u8; 4] = [10, 77, 0, 2];
const TUN_PREFIX_LEN: u8 = 30;
/// A raw-IP modem's MTU.
const TUN_MTU: &str = "1500";
/// lbd's name for its one uplink, whichever device it is.
const UPLINK: &str = "l3";
/// How long lbd gets to put the uplink in service: a bound, so that a
/// broken setup fails the benchmark instead of hanging it.
const READY: Duration = Duration::from_secs(10);
/// The VPN provider of the default lab (host `vpn`) and WireGuard's port
/// there (`lb_tests::wireguard`), and the provider's tunnel address.
const ENDPOINT: &str = "100.66.0.2/32";
const ISP1_GATEWAY: &str = "100.64.1.1";
const WG_PORT: &str = "51820";
const PROVIDER_TUNNEL_ADDR: &str = "10.88.0.1";
/// How long the first ping through the tunnel may take (it waits for the
/// handshake).
const HANDSHAKE_WAIT_SECS: &str = "5";
/// The routing table and mark of the kernel's way (PCC with one uplink).
const TABLE: &str = "1";
/// How long the sink spins on an empty queue before it sleeps: while
/// traffic flows it never sleeps, so the router's CPU is not charged a
/// wake-up per packet (a modem's DMA ring wakes nobody either).
const SPIN: Duration = Duration::from_millis(10);
/// How long the sink sleeps at most while idle, before it looks at its
/// stop flag again.
const IDLE_POLL_MS: libc::c_int = 100;
/// Largest packet the sink reads (the device's MTU is below it).
const MAX_PACKET: usize = 65_536;
/// lb's way must be lb's: at least this share of what the device took
/// must be in lb's own count (the rest would be the kernel's slow path).
const LB_SHARE_MIN: f64 = 0.5;

/// Offset of the source address in an IPv4 header.
const IPV4_SRC: usize = 12;

/// The kernel's way into one L3 device (`{dev}`): forward.rs's PCC, with
/// one uplink (every hash lands on mark 1), so that per packet the kernel
/// does what it does on a multi-WAN router (conntrack, the mark, the
/// policy rule, NAT), not a plain route.
const NFT_PCC: &str = r#"
table ip lbl3 {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan0" ct mark 0 ct mark set jhash ip saddr . ip daddr . udp sport . udp dport mod 1 offset 1
        iifname "lan0" meta mark set ct mark
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{dev}" masquerade
    }
}
"#;

/// On isp1: count WireGuard's data messages (type 4, the first byte of
/// the UDP payload) to the provider and drop them there, before
/// conntrack; handshakes pass, so the tunnel keeps its session whatever
/// the benchmark's length.
const NFT_WG_COUNT: &str = r#"
table ip lblwg {
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        udp dport {port} @th,64,8 4 counter drop
    }
}
"#;

/// The device a way sends into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Tun,
    WireGuard,
}

/// One way of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Way {
    pub device: Device,
    pub lb: bool,
}

impl Way {
    pub const ALL: [Way; 4] = [
        Way {
            device: Device::Tun,
            lb: false,
        },
        Way {
            device: Device::Tun,
            lb: true,
        },
        Way {
            device: Device::WireGuard,
            lb: false,
        },
        Way {
            device: Device::WireGuard,
            lb: true,
        },
    ];

    pub fn label(self) -> &'static str {
        match (self.device, self.lb) {
            (Device::Tun, false) => "tun: kernel (nftables PCC + policy routing + masquerade)",
            (Device::Tun, true) => "tun: lb (lbd, XDP + tc hand-off)",
            (Device::WireGuard, false) => "wireguard-go: kernel (same rules)",
            (Device::WireGuard, true) => "wireguard-go: lb (lbd, XDP + tc hand-off)",
        }
    }
}

/// One measured window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Packets the device took from the router per second: those its far
    /// end read and those its full queue dropped (the router's work is
    /// done either way).
    pub pps: f64,
    /// Packets out of the far end per second: read by the sink (tun), or
    /// encrypted datagrams counted on isp1 (WireGuard).
    pub out_pps: f64,
    /// Frames the generator made, per second.
    pub offered_pps: f64,
    /// Share of what the device took that its full queue dropped, %.
    pub queue_drop_pct: f64,
    /// Softirq (router) and system (generator) time on the generator's CPU
    /// per packet the device took, ns.
    pub router_ns: f64,
    pub generator_ns: f64,
    /// Shares of the generator's CPU, %: softirq, system, other work.
    pub softirq_pct: f64,
    pub system_pct: f64,
    pub other_pct: f64,
    /// Busy share of the far ends' CPU, %.
    pub far_busy_pct: f64,
    /// `wireguard-go`'s CPU time (user and system, all its threads) per
    /// datagram out, ns; 0 for the tun.
    pub wireguard_ns: f64,
    /// Softirq time on the far ends' CPU per packet out, ns (WireGuard:
    /// sending the datagram into wan1 and isp1's drop).
    pub far_softirq_ns: f64,
}

pub struct WayResult {
    pub way: Way,
    pub windows: Vec<Window>,
    /// The device's qdisc, as `tc qdisc show` names it.
    pub qdisc: String,
    /// The CPU of the far ends (the sink, `wireguard-go`).
    pub far_cpu: usize,
}

/// Bring the lab up, measure every way `args.runs` times, and take the lab
/// down again (also on error).
pub fn measure(
    args: &Args,
    cpu: usize,
    source: &Source,
    interrupted: &AtomicBool,
) -> Result<Vec<WayResult>> {
    wireguard::require_tools()?;
    let cpus = std::thread::available_parallelism()
        .context("counting CPUs")?
        .get();
    ensure!(
        cpus >= 2,
        "the L3 benchmark needs 2 CPUs: one for the generator and the router, one for the far ends"
    );
    // The far ends' CPU: any other than the generator's.
    let far_cpu = if cpu == 0 { 1 } else { 0 };
    // A lab left over from a crashed run would make `up` fail half-way.
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let mut results = Vec::new();
    {
        let mut rig = Rig::new(&mut lab, args.flows, cpu, far_cpu, source)?;
        for way in Way::ALL {
            results.push(WayResult {
                way,
                windows: Vec::new(),
                qdisc: rig.qdisc(way.device)?,
                far_cpu,
            });
        }
        for round in 1..=args.runs {
            for result in &mut results {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let window = rig
                    .window(result.way, Duration::from_secs(args.seconds), interrupted)
                    .with_context(|| format!("round {round}, {}", result.way.label()))?;
                println!(
                    "  round {round}/{}: {:<52} {:>6.3} Mpps to the device, {:>6.3} out",
                    args.runs,
                    result.way.label(),
                    window.pps / 1e6,
                    window.out_pps / 1e6
                );
                result.windows.push(window);
            }
        }
        // The sink stops and the tun goes here, before the lab.
    }
    drop(lab);
    Ok(results)
}

/// The lab with the benchmark's devices and programs in place.
struct Rig<'a> {
    lab: &'a mut Lab,
    cpu: usize,
    gen: Generator,
    client_eth0: u32,
    tun: TunSink,
    /// The router's WireGuard device and `wireguard-go`'s pid.
    wg: String,
    wg_pid: u32,
}

impl<'a> Rig<'a> {
    fn new(
        lab: &'a mut Lab,
        flows: u32,
        cpu: usize,
        far_cpu: usize,
        source: &Source,
    ) -> Result<Rig<'a>> {
        let flows = u16::try_from(flows)
            .ok()
            .filter(|&f| u32::from(GEN_PORT_BASE) + u32::from(f) <= 20_000)
            .with_context(|| format!("--flows {flows}: at most {}", 20_000 - GEN_PORT_BASE))?;
        let lan0 = mac(lab, "router", "lan0")?;
        let eth0 = mac(lab, "client", "eth0")?;
        let client_eth0 = super::forward::ifindex(lab, "client", "eth0")?;
        // The kernel's way has no XDP program on lan0: without GRO, veth
        // would drop the generator's frames (DESIGN.md).
        lab.exec("router", &["ethtool", "-K", "lan0", "gro", "on"])?;

        let tun = TunSink::start(lab, far_cpu)?;

        // The tunnel, over isp1. Its endpoint gets a route of its own in
        // main, as a router's VPN endpoint has: lbd sends the router's own
        // traffic by its uplink's table, which here is the tunnel itself,
        // but the main table's specific routes come first (README, "Nothing
        // leaks").
        let tunnel = wireguard::start(lab)?;
        lab.exec(
            "router",
            &[
                "ip",
                "route",
                "replace",
                ENDPOINT,
                "via",
                ISP1_GATEWAY,
                "dev",
                "wan1",
            ],
        )
        .context("a route to the VPN endpoint")?;
        lab.exec(
            "router",
            &[
                "ping",
                "-c",
                "1",
                "-W",
                HANDSHAKE_WAIT_SECS,
                PROVIDER_TUNNEL_ADDR,
            ],
        )
        .context("a ping through the WireGuard tunnel before the benchmark")?;
        load_nft(
            lab,
            "isp1",
            "wg.nft",
            &NFT_WG_COUNT.replace("{port}", WG_PORT),
        )?;
        let wg_pid = wireguard_pid(&tunnel.ifname)?;
        pin_process(wg_pid, far_cpu)?;

        let gen = generator(eth0, lan0, GEN_PORT_BASE, flows, source)?;

        Ok(Rig {
            lab,
            cpu,
            gen,
            client_eth0,
            tun,
            wg: tunnel.ifname,
            wg_pid,
        })
    }

    fn dev(&self, device: Device) -> &str {
        match device {
            Device::Tun => TUN,
            Device::WireGuard => &self.wg,
        }
    }

    /// The device's root qdisc kind, for the report.
    fn qdisc(&self, device: Device) -> Result<String> {
        let dev = self.dev(device);
        let text = self
            .lab
            .exec("router", &["tc", "qdisc", "show", "dev", dev, "root"])?;
        Ok(text.split_whitespace().nth(1).unwrap_or("none").to_string())
    }

    /// Set `way` up, measure one window, and take `way` down again.
    fn window(&mut self, way: Way, length: Duration, interrupted: &AtomicBool) -> Result<Window> {
        let dev = self.dev(way.device).to_string();
        if !way.lb {
            load_nft(
                self.lab,
                "router",
                "pcc.nft",
                &NFT_PCC.replace("{dev}", &dev),
            )?;
            let on = self.lab.exec(
                "router",
                &[
                    "ip", "route", "replace", "default", "dev", &dev, "table", TABLE,
                ],
            );
            let on = on.and_then(|_| {
                self.lab.exec(
                    "router",
                    &["ip", "rule", "add", "fwmark", TABLE, "table", TABLE],
                )
            });
            let window = on.and_then(|_| self.traffic(way, length, interrupted));
            return first_error(window, kernel_off(self.lab));
        }
        // lbd with the device as its one uplink, no gateway (it has no
        // link layer) and no probes (the far ends answer nothing, and an
        // uplink without probes is never taken down by passive evidence).
        let config = format!(
            "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n\n\
             [[lan]]\ninterface = \"lan0\"\n\n\
             [[uplink]]\nname = \"{UPLINK}\"\ninterface = \"{dev}\"\n"
        );
        let lbd = Lbd::start(self.lab, &config)?;
        let window = lbd
            .wait_lifecycle(UPLINK, "in service", READY)
            .and_then(|_| self.traffic(way, length, interrupted))
            .and_then(|window| lbs_own(&lbd, window, length));
        first_error(window, lbd.stop(self.lab))
    }

    /// Run the generator: warm up, then measure one window (as in
    /// forward.rs).
    fn traffic(&self, way: Way, length: Duration, interrupted: &AtomicBool) -> Result<Window> {
        let (before, after) = in_netns(self.lab.ns("client")?, || {
            generator_thread(self.cpu)?;
            let before =
                self.gen
                    .send_for(self.client_eth0, WARMUP, length, interrupted, || {
                        self.sample(way.device)
                    })?;
            let after = self.sample(way.device)?;
            Ok((before, after))
        })?;
        let window = after.since(&before, self.cpu, self.tun.cpu)?;
        if way.device == Device::Tun {
            // Both ways translate: what the sink read last left with the
            // tun's address.
            let source = std::net::Ipv4Addr::from(self.tun.last_source.load(Ordering::Relaxed));
            ensure!(
                source.octets() == TUN_ADDR,
                "the tun's packets left with source {source}, not the tun's address"
            );
        }
        Ok(window)
    }

    /// Counters at one instant. The ones read by running a command (the
    /// device's, isp1's) hold still while the generator does not run, so
    /// they are read outside the window: the instant is the cheap ones'.
    fn sample(&self, device: Device) -> Result<Sample> {
        let dev = self.dev(device);
        let before_run = device_counters(self.lab, dev)?;
        let out_by_command = match device {
            Device::Tun => None,
            Device::WireGuard => Some(wg_counted(self.lab)?),
        };
        let at = Instant::now();
        let generated = self.gen.generated()?;
        let cpus = cpu_times()?;
        let out = match out_by_command {
            Some(n) => n,
            None => self.tun.read.load(Ordering::Relaxed),
        };
        let wireguard_ticks = match device {
            Device::Tun => 0,
            Device::WireGuard => process_ticks(self.wg_pid)?,
        };
        Ok(Sample {
            at,
            generated,
            taken: before_run.0,
            dropped: before_run.1,
            out,
            wireguard_ticks,
            cpus,
        })
    }
}

/// lb's way measured lb: its own count of packets sent by the uplink holds
/// most of what the device took (the kernel's slow path would also reach
/// the device, translated by lbd's nftables table).
fn lbs_own(lbd: &Lbd, window: Window, length: Duration) -> Result<Window> {
    let sent = lbd.uplink_counter(UPLINK, "tx_packets")?;
    let taken = window.pps * length.as_secs_f64();
    ensure!(
        sent as f64 >= LB_SHARE_MIN * taken,
        "lb sent {sent} packets by the uplink, the device took {taken:.0}: the kernel forwarded them"
    );
    Ok(window)
}

/// The window, unless measuring it or taking its way down again failed
/// (the measurement's error first).
fn first_error(window: Result<Window>, teardown: Result<()>) -> Result<Window> {
    let window = window?;
    teardown?;
    Ok(window)
}

fn kernel_off(lab: &Lab) -> Result<()> {
    // Each step even if one before failed (a half-set way), the first
    // error reported.
    let steps = [
        lab.exec(
            "router",
            &["ip", "rule", "del", "fwmark", TABLE, "table", TABLE],
        ),
        lab.exec("router", &["ip", "route", "flush", "table", TABLE]),
        lab.exec("router", &["nft", "delete", "table", "ip", "lbl3"]),
        // lb leaves connections that conntrack holds to the kernel: the
        // next way's flows must be new to both.
        lab.exec("router", &["conntrack", "-F"]),
    ];
    steps.into_iter().try_for_each(|s| s.map(drop))
}

/// Load nftables `rules` on `host`, through a file named `name`.
fn load_nft(lab: &Lab, host: &str, name: &str, rules: &str) -> Result<()> {
    let file = std::env::temp_dir().join(format!("{PREFIX}{name}"));
    std::fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
    let path = file.to_str().context("temporary directory is not UTF-8")?;
    let loaded = lab
        .exec(host, &["nft", "-f", path])
        .map(drop)
        .with_context(|| format!("loading {name} on {host}"));
    let _ = std::fs::remove_file(&file);
    loaded
}

/// The router's device `dev`: packets it took from its queue to the far
/// end (a tun counts them when they are read) and packets it dropped.
fn device_counters(lab: &Lab, dev: &str) -> Result<(u64, u64)> {
    let dir = format!("/sys/class/net/{dev}/statistics");
    let text = lab.exec(
        "router",
        &[
            "cat",
            &format!("{dir}/tx_packets"),
            &format!("{dir}/tx_dropped"),
        ],
    )?;
    let numbers: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{dev}'s counters: `{}`", text.trim()))?;
    match numbers[..] {
        [taken, dropped] => Ok((taken, dropped)),
        _ => bail!("{dev}'s counters: `{}`", text.trim()),
    }
}

/// WireGuard data messages isp1 counted (and dropped).
fn wg_counted(lab: &Lab) -> Result<u64> {
    let text = lab.exec(
        "isp1",
        &["nft", "list", "chain", "ip", "lblwg", "prerouting"],
    )?;
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .with_context(|| format!("no packet counter in isp1's rule:\n{text}"))
}

/// The pid of the `wireguard-go` that serves `ifname` (the tunnel's
/// process; its device name is the lab's own).
fn wireguard_pid(ifname: &str) -> Result<u32> {
    let wanted = ["wireguard-go", "-f", ifname];
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process may end while we look: skip what cannot be read.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        let matches = args.len() == wanted.len()
            && args
                .iter()
                .zip(wanted)
                .all(|(a, w)| a.ends_with(w.as_bytes()));
        if matches {
            return Ok(pid);
        }
    }
    bail!("no wireguard-go process serves {ifname}")
}

/// Pin every thread of process `pid` to `cpu` (threads it makes later
/// inherit it from the one that makes them).
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry.with_context(|| format!("reading {dir}"))?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
        // within it for a CPU that exists; sched_setaffinity reads it.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        // A thread that ended meanwhile is no error.
        let err = std::io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("pinning thread {tid} of {pid} to CPU {cpu}"));
        }
    }
    Ok(())
}

/// User and system time of process `pid`, all its threads, in clock ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // After the command's name (in parentheses, which may hold spaces):
    // state is field 3, utime 14 and stime 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: `{text}`"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} in `{text}`", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// Counters and CPU times at one instant.
struct Sample {
    at: Instant,
    generated: u64,
    /// The device's own counters.
    taken: u64,
    dropped: u64,
    /// Out of the far end.
    out: u64,
    wireguard_ticks: u64,
    cpus: Vec<CpuTimes>,
}

impl Sample {
    fn since(&self, before: &Sample, cpu: usize, far_cpu: usize) -> Result<Window> {
        let secs = (self.at - before.at).as_secs_f64();
        let dropped = self.dropped - before.dropped;
        let handed = self.taken - before.taken + dropped;
        let out = self.out - before.out;
        ensure!(
            handed > 0 && out > 0,
            "nothing went through the device: it took {handed} packets, {out} came out"
        );
        let generated = self.generated - before.generated;
        let on = |n: usize| -> Result<CpuTimes> {
            self.cpus
                .get(1 + n)
                .zip(before.cpus.get(1 + n))
                .map(|(a, b)| a.since(b))
                .with_context(|| format!("CPU {n} missing from /proc/stat"))
        };
        // cpus[1 + n] is CPU n ("cpu" alone, all of them, comes first).
        let (mine, far) = (on(cpu)?, on(far_cpu)?);
        let tick_ns = 1e9 / ticks_per_second()?;
        let pct = |part: u64, whole: u64| 100.0 * part as f64 / whole.max(1) as f64;
        let per = |ticks: u64, packets: u64| ticks as f64 * tick_ns / packets.max(1) as f64;
        Ok(Window {
            pps: handed as f64 / secs,
            out_pps: out as f64 / secs,
            offered_pps: generated as f64 / secs,
            queue_drop_pct: pct(dropped, handed),
            router_ns: per(mine.softirq, handed),
            generator_ns: per(mine.system, handed),
            softirq_pct: pct(mine.softirq, mine.total),
            system_pct: pct(mine.system, mine.total),
            other_pct: pct(
                mine.total - mine.idle - mine.softirq - mine.system,
                mine.total,
            ),
            far_busy_pct: pct(far.total - far.idle, far.total),
            wireguard_ns: per(self.wireguard_ticks - before.wireguard_ticks, out),
            far_softirq_ns: per(far.softirq, out),
        })
    }
}

/// The tun device standing in for a raw-IP modem, and a thread that reads
/// every packet from it and drops it, pinned to the far ends' CPU. It
/// spins while packets come (no wake-up per packet is charged to the
/// router's CPU), and sleeps when none came for [`SPIN`]. Dropping it
/// stops the thread and removes the device (it is not persistent).
struct TunSink {
    cpu: usize,
    read: Arc<AtomicU64>,
    /// The IPv4 source of the last packet read.
    last_source: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TunSink {
    fn start(lab: &Lab, cpu: usize) -> Result<TunSink> {
        let file = in_netns(lab.ns("router")?, || {
            tun::open(
                TUN,
                tun::Kind::Tun,
                tun::Options {
                    nonblocking: true,
                    offloads: false,
                },
            )
        })?;
        let address = format!("{}/{TUN_PREFIX_LEN}", std::net::Ipv4Addr::from(TUN_ADDR));
        for cmd in [
            vec!["ip", "link", "set", "dev", TUN, "mtu", TUN_MTU],
            vec!["ip", "addr", "add", &address, "dev", TUN],
            vec!["ip", "link", "set", "dev", TUN, "up"],
        ] {
            lab.exec("router", &cmd)
                .with_context(|| format!("setting up {TUN} on the router"))?;
        }
        let read = Arc::new(AtomicU64::new(0));
        let last_source = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (read, last_source, stop) = (read.clone(), last_source.clone(), stop.clone());
            std::thread::spawn(move || {
                super::pin_to_cpu(cpu)?;
                drain(&file, &read, &last_source, &stop)
            })
        };
        Ok(TunSink {
            cpu,
            read,
            last_source,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TunSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: the tun sink failed: {e:#}"),
                Err(_) => eprintln!("warning: the tun sink panicked"),
            }
        }
    }
}

/// Read and drop every packet until `stop`.
fn drain(
    mut file: &File,
    read: &AtomicU64,
    last_source: &AtomicU32,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut last_packet = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match file.read(&mut buf) {
            Ok(n) => {
                read.fetch_add(1, Ordering::Relaxed);
                if let Some(src) = buf.get(IPV4_SRC..IPV4_SRC + 4).filter(|_| n >= 20) {
                    let src = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
                    last_source.store(src, Ordering::Relaxed);
                }
                last_packet = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if last_packet.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                let mut fd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, live for the call.
                if unsafe { libc::poll(&mut fd, 1, IDLE_POLL_MS) } > 0 {
                    last_packet = Instant::now();
                }
            }
            Err(e) => return Err(e).context("reading the tun device"),
        }
    }
    Ok(())
}
