//! TCP goodput through the lab router: 8 iperf3 streams up (client to the
//! internet host) and 8 down (`-R`), wire-size frames, every way in the
//! same run, the ways taking turns: the Linux kernel doing lb's job
//! (nftables PCC marks, policy routing, masquerade), lb (lbd with its XDP
//! data plane), and a bare XDP redirect (MACs only, no NAT: the lab's
//! ceiling for XDP forwarding, and the witness for what XDP_REDIRECT itself
//! does to TCP).
//!
//! Besides goodput and retransmits it reads, before and after every run,
//! every counter that can say where a frame was lost or reordered: lb's
//! own reasons (`lbctl status --json`), each veth end's `ethtool -S` (per
//! queue: XDP redirects, `xdp_xmit` and its errors, drops), `ip -s link`'s
//! drops, /proc/net/softnet_stat (backlog drops, squeezes) and `nstat` on
//! the two ends of the connections (out-of-order queueing, reordering seen,
//! D-SACKs: a retransmit that a D-SACK answers was spurious, a reordering,
//! not a loss). The report gives the deltas per way.
//!
//! Wire-size frames (DESIGN.md, "Facts about veth labs"): the senders (the
//! client for uploads, the internet host for downloads) send without TSO
//! and GSO, so every segment crosses the router as one frame, as from a
//! wire; the receivers keep GRO on, as a NIC does. The router's ports are
//! left as the lab has them (veth without GRO: every frame is forwarded
//! alone), so every way forwards the same frames.
//!
//! Queues, as a wire has them: every host but the router sends through a
//! qdisc (`pfifo_fast`, the kernel's default for a real device), where a
//! veth has none. A veth into a peer that runs NAPI (XDP attached, or GRO
//! on) puts each frame in the peer's 256-slot ring; when the ring is full
//! a veth without a qdisc drops the frame (`tx_dropped` on the sender's
//! end), one with a qdisc stops its queue until the ring drains (veth
//! does since Linux 6.16), as a NIC's ring stops its driver's queue. Measured
//! here without the qdiscs, every frame that crossed into lb's ports (or
//! the bare redirect's, or the kernel's with GRO on, which turns NAPI on)
//! met that ring: 0.1 to 0.3 million drops a run at the client's own end,
//! one retransmit each, in every way whose router port runs NAPI; the
//! kernel's way escaped them only because its ports, without NAPI, take
//! frames into the 1,000-packet backlog instead. No wire behaves so.
//!
//! What the counters showed (BENCHMARKS.md has the figures):
//! - Downloads: `XDP_REDIRECT` from the router's lan0 into the client's
//!   full ring (`xdp_xmit_errors`), tens of thousands a run: lb (and the
//!   bare redirect) hand frames over faster than the client's stack takes
//!   them, and a redirect has no queue to wait in. The kernel's way, at
//!   two thirds of the rate, rarely fills that ring.
//! - Uploads: no drops, but every retransmit is answered by a D-SACK
//!   (spurious), with tens of thousands of out-of-order queueings at the
//!   receiver; they come with the client's veth requeueing frames (1 to
//!   2 million a run) while the router's ring is full, and captures show
//!   frames the client sent in order reaching isp1 some 24 frames late.
//!   The kernel's way, without NAPI on the router's ports, never makes
//!   the client requeue.
//!
//! What lb does about it (issue 22): the ring watch counts what
//! `XDP_REDIRECT` loses to a full ring, and lbd hands that device to its
//! queue for a while (`lb_common::egress`). Measured with it: the ring's
//! losses fall from tens of thousands a run to a few hundred (the burst
//! before lbd hears of it); but in this lab the hand-off's packets meet
//! no queue that pushes back either: the router's veth ends have TSO on,
//! so veth puts what the router's stack sends into the receiving CPU's
//! 1,000-packet backlog, shared with the other hops on that CPU, not into
//! the ring behind the device's queue, and a client slower than lb still
//! loses frames there. A NIC's queue (and the one lbd gives a veth) does
//! push back; with the router's veth TSO turned off by hand, one run lost
//! nothing in the backlog and 24,279 frames a run at the tail of lb's
//! queue in front of the client instead: a queue pushes back on the stage
//! before it, never on a sender two hops away, so a bottleneck behind the
//! router costs TCP losses whatever forwards to it, unless the forwarder
//! is itself the slowest stage. The kernel's way loses
//! little because it is the slowest stage, next to the senders, whose own
//! queues push back on their sockets: its senders never outrun the client.
//!
//! It owns the benchmark's lab (namespaces `lbp-*`) for the length of its
//! run and whatever it adds to it (offloads, routes for the bare way's
//! un-NATed frames, iperf3); it never leaves any of it behind, also when a
//! step fails (the lab goes down with everything in it), and it never
//! judges a speed: the report states the figures.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use aya::programs::{xdp::XdpLinkId, XdpMode};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns,
    traffic::wait_tcp_listener,
    Lab, LabDesc,
};
use serde_json::Value;

use super::{
    forward::{ifindex, kernel_off, kernel_on_with, mac},
    object::BenchObject,
};

/// Namespace prefix of this part's lab.
const PREFIX: &str = "lbp-";
const LAB: &str = "default";
const SERVER: &str = "198.51.100.10";
const IPERF_PORT: u16 = 5201;
/// Parallel streams per run, as the issue measured.
pub const STREAMS: u32 = 8;
/// How much longer than its length a run may take before it counts as
/// hung (connection set-up, the final exchange of results).
const RUN_GRACE: Duration = Duration::from_secs(20);
/// Set, this prints every counter that moved in every run.
const VERBOSE: &str = "LB_BENCH_TCP_VERBOSE";
/// The hosts' qdisc: the kernel's default one for a real device.
const SENDER_QDISC: &str = "pfifo_fast";
/// How long iperf3's server gets to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The kernel's way: forward.rs's PCC, hashed over the transport header
/// (`th`), since `udp sport` would match no TCP packet (every connection
/// would keep mark 0 and leave by the main table's default route alone).
const NFT_PCC_TCP: &str = r#"
table ip lbbench {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan0" ct mark 0 ct mark set jhash ip saddr . ip daddr . th sport . th dport mod 2 offset 1
        iifname "lan0" meta mark set ct mark
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan1" masquerade
        oifname "wan2" masquerade
    }
}
"#;

/// (host, interface) of every veth end whose counters are read: the whole
/// path, both directions.
const WATCHED: [(&str, &str); 10] = [
    ("client", "eth0"),
    ("router", "lan0"),
    ("router", "wan1"),
    ("router", "wan2"),
    ("isp1", "down0"),
    ("isp1", "up0"),
    ("isp2", "down0"),
    ("isp2", "up0"),
    ("inet", "isp1"),
    ("inet", "isp2"),
];
/// The other end of each veth end of [`WATCHED`].
fn peer(host: &str, dev: &str) -> Option<(&'static str, &'static str)> {
    Some(match (host, dev) {
        ("client", "eth0") => ("router", "lan0"),
        ("router", "lan0") => ("client", "eth0"),
        ("router", "wan1") => ("isp1", "down0"),
        ("isp1", "down0") => ("router", "wan1"),
        ("router", "wan2") => ("isp2", "down0"),
        ("isp2", "down0") => ("router", "wan2"),
        ("isp1", "up0") => ("inet", "isp1"),
        ("inet", "isp1") => ("isp1", "up0"),
        ("isp2", "up0") => ("inet", "isp2"),
        ("inet", "isp2") => ("isp2", "up0"),
        _ => return None,
    })
}

/// The connections' ends, whose TCP counters (nstat) are read.
const ENDS: [&str; 2] = ["client", "inet"];

/// One way of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Kernel,
    Lb,
    Bare,
}

impl Way {
    pub const ALL: [Way; 3] = [Way::Kernel, Way::Lb, Way::Bare];

    pub fn label(self) -> &'static str {
        match self {
            Way::Kernel => "kernel (nftables PCC + policy routing + masquerade)",
            Way::Lb => "lb (lbd, XDP)",
            Way::Bare => "bare XDP redirect (no NAT)",
        }
    }
}

/// Which way the data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to the internet host.
    Upload,
    /// The internet host to the client (`iperf3 -R`).
    Download,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Upload, Direction::Download];

    pub fn label(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// One iperf3 run and what the counters said meanwhile.
#[derive(Clone, Debug)]
pub struct Run {
    /// What the receiver got, bit/s.
    pub goodput: f64,
    /// Segments the senders sent again (iperf3's count).
    pub retransmits: u64,
    /// Every counter that moved, by where it is (see [`Counters`]).
    pub deltas: BTreeMap<String, u64>,
    /// The veth ends (`HOST:DEV`) whose packets go into their peer's ring;
    /// the others' go into the receiving CPU's backlog (see [`ring_ends`]).
    pub ring_ends: BTreeSet<String>,
}

impl Run {
    /// Frames lost, by reason and where, from the counters that moved. A
    /// frame lost between two veth ends shows on both (the sender's
    /// `tx_dropped`, the receiver's `rx_dropped`, and a backlog's loss in
    /// softnet_stat too): the sender's count is taken, an XDP redirect's
    /// told apart from a transmit's, and a transmit's placed by the path
    /// veth gave it (its peer's ring, or the receiving CPU's backlog).
    /// What the backlogs lost beyond the watched senders' is shown apart.
    pub fn drops(&self) -> BTreeMap<String, u64> {
        let mut drops = BTreeMap::new();
        let get = |name: &str| self.deltas.get(name).copied().unwrap_or(0);
        let mut from_senders = 0;
        for (host, dev) in WATCHED {
            let at = format!("{host}:{dev}");
            let redirected = get(&format!("{at} ethtool tx_queue_0_xdp_xmit_errors"));
            let dropped = get(&format!("{at} link tx_dropped"));
            if redirected > 0 {
                drops.insert(
                    format!("XDP_REDIRECT from {at} into its peer's full ring"),
                    redirected,
                );
            }
            if dropped > redirected {
                let lost = dropped - redirected;
                let into = if self.ring_ends.contains(&at) {
                    "its peer's full ring"
                } else {
                    from_senders += lost;
                    "the receiving CPU's full backlog"
                };
                drops.insert(format!("{at} sending into {into}"), lost);
            }
        }
        let backlogs: u64 = self
            .deltas
            .iter()
            .filter(|(name, _)| name.starts_with("softnet ") && name.ends_with(" dropped"))
            .map(|(_, &d)| d)
            .sum();
        if backlogs > from_senders {
            drops.insert(
                "a backlog full, from no watched veth end".to_string(),
                backlogs - from_senders,
            );
        }
        for (name, &d) in &self.deltas {
            let reason = if let Some(at) = name.strip_suffix(" qdisc drops") {
                format!("{at}'s qdisc full")
            } else if name.starts_with("softnet ") {
                // Counted above.
                continue;
            } else if name == "lb drop_ring_full" {
                // The same frames as the device's XDP_REDIRECT errors,
                // counted again by lb's ring watch: see `ring_watch`.
                continue;
            } else if let Some(reason) = name.strip_prefix("lb drop_") {
                format!("lb: {reason}")
            } else if name.contains(" ethtool ") && name.ends_with("drops") {
                name.replace(" ethtool ", ": ")
            } else {
                continue;
            };
            *drops.entry(reason).or_insert(0) += d;
        }
        drops
    }

    /// Frames the hosts' qdiscs took back from a busy device (its peer's
    /// ring full) to send again later, summed over the hosts.
    pub fn requeued(&self) -> u64 {
        self.deltas
            .iter()
            .filter(|(name, _)| name.ends_with(" qdisc requeues"))
            .map(|(_, &d)| d)
            .sum()
    }

    /// Frames lb's ring watch saw `XDP_REDIRECT` lose to full rings (each
    /// time, lbd handed the device to its queue for a while).
    pub fn ring_watch(&self) -> u64 {
        self.deltas.get("lb drop_ring_full").copied().unwrap_or(0)
    }

    /// Packets lb gave to the kernel (its `pass_*` reasons), by reason.
    pub fn passed(&self) -> BTreeMap<String, u64> {
        self.deltas
            .iter()
            .filter_map(|(name, &d)| Some((name.strip_prefix("lb pass_")?.to_string(), d)))
            .collect()
    }

    /// Whether the receiver queued segments out of order, and how many
    /// segments the sender learnt (D-SACK) it had sent again needlessly:
    /// (out-of-order queued, D-SACKed segments).
    pub fn reordering(&self, direction: Direction) -> (u64, u64) {
        let (sender, receiver) = match direction {
            Direction::Upload => ("client", "inet"),
            Direction::Download => ("inet", "client"),
        };
        let get = |name: String| self.deltas.get(&name).copied().unwrap_or(0);
        (
            get(format!("{receiver} nstat TcpExtTCPOFOQueue")),
            get(format!("{sender} nstat TcpExtTCPDSACKRecvSegs")),
        )
    }
}

pub struct WayRuns {
    pub way: Way,
    pub direction: Direction,
    pub runs: Vec<Run>,
}

/// Measure every way `runs` times, `seconds` per run and direction, the
/// ways taking turns; the lab goes down afterwards, also on error.
pub fn measure(runs: u32, seconds: u64, interrupted: &AtomicBool) -> Result<Vec<WayRuns>> {
    // A lab left over from a crashed run would make `up` fail half-way.
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let mut results: Vec<WayRuns> = Way::ALL
        .iter()
        .flat_map(|&way| {
            Direction::ALL.iter().map(move |&direction| WayRuns {
                way,
                direction,
                runs: Vec::new(),
            })
        })
        .collect();
    {
        let mut rig = Rig::new(&mut lab)?;
        for round in 1..=runs {
            for way in Way::ALL {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let measured = rig
                    .way(way, seconds, interrupted)
                    .with_context(|| format!("round {round}, {}", way.label()))?;
                for (direction, run) in measured {
                    println!(
                        "  round {round}/{runs}: {:<52} {:<8} {:>6.2} Gbit/s, {:>7} retransmits",
                        way.label(),
                        direction.label(),
                        run.goodput / 1e9,
                        run.retransmits
                    );
                    // Every counter that moved, for a closer look.
                    if std::env::var_os(VERBOSE).is_some() {
                        for (name, d) in &run.deltas {
                            println!("      {name}: {d}");
                        }
                    }
                    if let Some(r) = results
                        .iter_mut()
                        .find(|r| r.way == way && r.direction == direction)
                    {
                        r.runs.push(run);
                    }
                }
            }
        }
        // The bare way's programs detach here, before the lab goes.
    }
    drop(lab);
    Ok(results)
}

/// The lab, set up for wire-size TCP, with the bare way's programs loaded.
struct Rig<'a> {
    lab: &'a mut Lab,
    /// `bench_redirect` on lan0: to wan1 or wan2 by the low bit of the
    /// source port.
    bare_up: BenchObject,
    /// `bench_redirect` on wan1 and wan2: both slots to lan0, the client's
    /// MAC.
    bare_down: BenchObject,
}

impl<'a> Rig<'a> {
    fn new(lab: &'a mut Lab) -> Result<Rig<'a>> {
        // Wire-size frames: the senders segment nothing bigger than the
        // MTU; the receivers coalesce with GRO, as a NIC does (the client's
        // end has this from the lab file already).
        for dev in ["isp1", "isp2"] {
            lab.exec(
                "inet",
                &[
                    "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "on",
                ],
            )
            .with_context(|| format!("offloads of inet:{dev}"))?;
        }
        lab.exec(
            "client",
            &[
                "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "on",
            ],
        )
        .context("offloads of client:eth0")?;
        // Every host but the router sends through a queue, as a NIC's
        // driver does (see the module's doc): a full ring then stops the
        // queue instead of dropping the frame.
        for (host, dev) in WATCHED.iter().filter(|(host, _)| *host != "router") {
            lab.exec(
                host,
                &["tc", "qdisc", "replace", "dev", dev, "root", SENDER_QDISC],
            )
            .with_context(|| format!("a {SENDER_QDISC} qdisc on {host}:{dev}"))?;
        }

        let lan0 = mac(lab, "router", "lan0")?;
        let client = mac(lab, "client", "eth0")?;
        let wan = [mac(lab, "router", "wan1")?, mac(lab, "router", "wan2")?];
        let isp = [mac(lab, "isp1", "down0")?, mac(lab, "isp2", "down0")?];
        let wan_index = [
            ifindex(lab, "router", "wan1")?,
            ifindex(lab, "router", "wan2")?,
        ];
        let lan_index = ifindex(lab, "router", "lan0")?;
        let mut bare_up = BenchObject::load(&["bench_redirect"])?;
        let mut bare_down = BenchObject::load(&["bench_redirect"])?;
        in_netns(lab.ns("router")?, || {
            for i in 0..2 {
                bare_up.set_redirect(i as u32, wan_index[i], isp[i], wan[i])?;
                bare_down.set_redirect(i as u32, lan_index, client, lan0)?;
            }
            Ok(())
        })?;

        lab.spawn(
            "inet",
            &[
                "iperf3",
                "-s",
                "-p",
                &IPERF_PORT.to_string(),
                "--logfile",
                "/dev/null",
            ],
        )?;
        wait_tcp_listener(lab.ns("inet")?, IPERF_PORT, LISTEN_TIMEOUT)?;
        Ok(Rig {
            lab,
            bare_up,
            bare_down,
        })
    }

    /// Set `way` up, run both directions, and take `way` down again.
    fn way(
        &mut self,
        way: Way,
        seconds: u64,
        interrupted: &AtomicBool,
    ) -> Result<Vec<(Direction, Run)>> {
        match way {
            Way::Kernel => {
                kernel_on_with(self.lab, "pcc-tcp.nft", NFT_PCC_TCP)?;
                let runs = self.both(None, seconds, interrupted);
                first_error(runs, kernel_off(self.lab))
            }
            Way::Lb => {
                // lbd as the lab runs it, without probes; all else default.
                let lbd = Lbd::start(self.lab, &LabConfig::default().render())?;
                let runs = self.both(Some(&lbd), seconds, interrupted);
                first_error(runs, lbd.stop(self.lab))
            }
            Way::Bare => {
                bare_routes(self.lab, true)?;
                let links = self.attach_bare();
                let runs = links.and_then(|links| {
                    let runs = self.both(None, seconds, interrupted);
                    first_error(runs, self.detach_bare(links))
                });
                first_error(runs, bare_routes(self.lab, false))
            }
        }
    }

    fn attach_bare(&mut self) -> Result<Vec<(bool, XdpLinkId)>> {
        let (up, down) = (&mut self.bare_up, &mut self.bare_down);
        in_netns(self.lab.ns("router")?, || {
            let mut links = vec![(
                true,
                up.xdp_mut("bench_redirect")?
                    .attach("lan0", XdpMode::Driver)
                    .context("attaching bench_redirect to lan0 (native)")?,
            )];
            for dev in ["wan1", "wan2"] {
                links.push((
                    false,
                    down.xdp_mut("bench_redirect")?
                        .attach(dev, XdpMode::Driver)
                        .with_context(|| format!("attaching bench_redirect to {dev} (native)"))?,
                ));
            }
            Ok(links)
        })
    }

    fn detach_bare(&mut self, links: Vec<(bool, XdpLinkId)>) -> Result<()> {
        for (up, link) in links {
            let object = if up {
                &mut self.bare_up
            } else {
                &mut self.bare_down
            };
            object
                .xdp_mut("bench_redirect")?
                .detach(link)
                .context("detaching bench_redirect")?;
        }
        Ok(())
    }

    /// An upload run, then a download run.
    fn both(
        &self,
        lbd: Option<&Lbd>,
        seconds: u64,
        interrupted: &AtomicBool,
    ) -> Result<Vec<(Direction, Run)>> {
        let mut runs = Vec::new();
        let rings = ring_ends(self.lab)?;
        for direction in Direction::ALL {
            ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
            let before = Counters::read(self.lab, lbd)?;
            let report = iperf3(self.lab, direction, seconds)
                .with_context(|| format!("{} run", direction.label()))?;
            let after = Counters::read(self.lab, lbd)?;
            runs.push((
                direction,
                Run {
                    goodput: report.goodput,
                    retransmits: report.retransmits,
                    deltas: after.since(&before),
                    ring_ends: rings.clone(),
                },
            ));
        }
        Ok(runs)
    }
}

/// The bare way forwards without NAT: the ISPs route the LAN back to the
/// router, and the internet host spreads it over both ISPs by 5-tuple
/// (as the bare redirect spreads uploads by source port). `add` puts them
/// in, `!add` takes them out again.
fn bare_routes(lab: &Lab, add: bool) -> Result<()> {
    let verb = if add { "add" } else { "del" };
    for n in 1..=2 {
        lab.exec(
            &format!("isp{n}"),
            &[
                "ip",
                "route",
                verb,
                "10.10.0.0/24",
                "via",
                &format!("100.64.{n}.2"),
            ],
        )
        .with_context(|| format!("{verb} isp{n}'s route to the LAN"))?;
    }
    if add {
        lab.exec(
            "inet",
            &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"],
        )?;
        lab.exec(
            "inet",
            &[
                "ip",
                "route",
                "add",
                "10.10.0.0/24",
                "nexthop",
                "via",
                "100.65.1.1",
                "nexthop",
                "via",
                "100.65.2.1",
            ],
        )
        .context("inet's multipath route to the LAN")?;
    } else {
        lab.exec("inet", &["ip", "route", "del", "10.10.0.0/24"])
            .context("removing inet's route to the LAN")?;
    }
    Ok(())
}

/// What iperf3 said of one run.
struct Iperf {
    goodput: f64,
    retransmits: u64,
}

/// One run of `STREAMS` streams for `seconds`, from the client.
fn iperf3(lab: &Lab, direction: Direction, seconds: u64) -> Result<Iperf> {
    let limit = (Duration::from_secs(seconds) + RUN_GRACE)
        .as_secs()
        .to_string();
    let (port, seconds, streams) = (
        IPERF_PORT.to_string(),
        seconds.to_string(),
        STREAMS.to_string(),
    );
    let mut args = vec![
        "timeout", &limit, "iperf3", "-c", SERVER, "-p", &port, "-P", &streams, "-t", &seconds,
        "-J",
    ];
    if direction == Direction::Download {
        args.push("-R");
    }
    let out = lab.output("client", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing iperf3's JSON ({}): {text}", out.status))?;
    ensure!(
        out.status.success(),
        "iperf3 failed ({}): {}",
        out.status,
        json["error"]
    );
    let end = &json["end"];
    Ok(Iperf {
        goodput: end["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 gave no sum_received.bits_per_second")?,
        // In reverse mode the server sends, and its count comes back with
        // the results (iperf3 >= 3.7).
        retransmits: end["sum_sent"]["retransmits"]
            .as_u64()
            .context("iperf3 gave no sum_sent.retransmits")?,
    })
}

/// The veth ends (`HOST:DEV`) whose packets go into their peer's ring, as
/// veth chooses (`veth_xmit`): the peer runs NAPI (an XDP program is
/// attached, or GRO is on) and the packet is one GRO may take (the
/// sender does no TSO). Every other packet goes into the receiving CPU's
/// backlog, 1,000 packets shared by every hop on that CPU, which drops
/// when full and pushes back on nobody; a full ring instead stops a
/// sender's queue, or drops when it has none.
fn ring_ends(lab: &Lab) -> Result<BTreeSet<String>> {
    let offload = |host: &str, dev: &str, feature: &str| -> Result<bool> {
        let shown = lab.exec(host, &["ethtool", "-k", dev])?;
        Ok(shown.lines().any(|l| l.trim() == format!("{feature}: on")))
    };
    let mut ends = BTreeSet::new();
    for (host, dev) in WATCHED {
        let (peer_host, peer_dev) =
            peer(host, dev).with_context(|| format!("no peer known for {host}:{dev}"))?;
        let json = lab.exec(peer_host, &["ip", "-j", "link", "show", "dev", peer_dev])?;
        let shown: Value = serde_json::from_str(&json)
            .with_context(|| format!("parsing ip -j link of {peer_host}:{peer_dev}"))?;
        let napi = shown[0].get("xdp").is_some()
            || offload(peer_host, peer_dev, "generic-receive-offload")?;
        if napi && !offload(host, dev, "tcp-segmentation-offload")? {
            ends.insert(format!("{host}:{dev}"));
        }
    }
    Ok(ends)
}

/// Every counter read at one instant, by name: `HOST:DEV ethtool NAME`,
/// `HOST:DEV link rx_dropped` (and tx, errors), `softnet cpuN dropped`
/// (and `time_squeeze`), `HOST nstat NAME`, `lb NAME` (a reason).
struct Counters(BTreeMap<String, u64>);

impl Counters {
    fn read(lab: &Lab, lbd: Option<&Lbd>) -> Result<Counters> {
        let mut c = BTreeMap::new();
        for (host, dev) in WATCHED {
            let text = lab.exec(host, &["ethtool", "-S", dev])?;
            for (name, value) in text.lines().filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                Some((name.trim(), value.trim().parse::<u64>().ok()?))
            }) {
                // Names and byte counts say nothing of where frames went.
                if name != "peer_ifindex" && !name.ends_with("bytes") {
                    c.insert(format!("{host}:{dev} ethtool {name}"), value);
                }
            }
            // The qdisc (the hosts have one): frames it dropped, and
            // frames it took back because the device was busy (a full
            // ring behind it), which it sends again later.
            let json = lab.exec(host, &["tc", "-s", "-j", "qdisc", "show", "dev", dev])?;
            let shown: Value = serde_json::from_str(&json)
                .with_context(|| format!("parsing tc -s -j qdisc of {host}:{dev}"))?;
            for qdisc in shown.as_array().into_iter().flatten() {
                for what in ["drops", "requeues"] {
                    if let Some(v) = qdisc[what].as_u64() {
                        *c.entry(format!("{host}:{dev} qdisc {what}")).or_insert(0) += v;
                    }
                }
            }
            let json = lab.exec(host, &["ip", "-s", "-j", "link", "show", "dev", dev])?;
            let shown: Value = serde_json::from_str(&json)
                .with_context(|| format!("parsing ip -s -j link of {host}:{dev}"))?;
            let stats = &shown[0]["stats64"];
            for side in ["rx", "tx"] {
                for what in ["dropped", "errors"] {
                    if let Some(v) = stats[side][what].as_u64() {
                        c.insert(format!("{host}:{dev} link {side}_{what}"), v);
                    }
                }
            }
        }
        // softnet_stat: one line per CPU, hexadecimal: processed, dropped
        // (backlog full), time_squeeze, ...
        let softnet = std::fs::read_to_string("/proc/net/softnet_stat")
            .context("reading /proc/net/softnet_stat")?;
        for (cpu, line) in softnet.lines().enumerate() {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|f| u64::from_str_radix(f, 16))
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing softnet_stat line `{line}`"))?;
            for (i, name) in [(1, "dropped"), (2, "time_squeeze")] {
                if let Some(&v) = fields.get(i) {
                    c.insert(format!("softnet cpu{cpu} {name}"), v);
                }
            }
        }
        for host in ENDS.iter().chain(&["router"]) {
            // -a: absolute values, -z: zeros too, -s: leave nstat's history
            // alone.
            let json = lab.exec(host, &["nstat", "-asz", "--json"])?;
            let shown: Value =
                serde_json::from_str(&json).with_context(|| format!("parsing nstat of {host}"))?;
            if let Some(kernel) = shown["kernel"].as_object() {
                for (name, v) in kernel {
                    if let Some(v) = v.as_u64() {
                        c.insert(format!("{host} nstat {name}"), v);
                    }
                }
            }
        }
        if let Some(lbd) = lbd {
            let status = lbd.status()?;
            for reason in status["reasons"].as_array().into_iter().flatten() {
                if let (Some(name), Some(v)) = (reason[0].as_str(), reason[1].as_u64()) {
                    c.insert(format!("lb {name}"), v);
                }
            }
            for uplink in status["uplinks"].as_array().into_iter().flatten() {
                let name = uplink["name"].as_str().unwrap_or("?");
                for (key, v) in uplink.as_object().into_iter().flatten() {
                    if let Some(v) = v.as_u64() {
                        c.insert(format!("lb {name} {key}"), v);
                    }
                }
            }
        }
        Ok(Counters(c))
    }

    /// The counters that moved since `before`.
    fn since(&self, before: &Counters) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .filter_map(|(name, &v)| {
                let d = v.saturating_sub(before.0.get(name).copied().unwrap_or(0));
                (d > 0).then(|| (name.clone(), d))
            })
            .collect()
    }
}

/// The runs, unless running them or taking their way down failed (the
/// runs' error first).
fn first_error<T>(runs: Result<T>, teardown: Result<()>) -> Result<T> {
    let runs = runs?;
    teardown?;
    Ok(runs)
}
