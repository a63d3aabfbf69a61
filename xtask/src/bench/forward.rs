//! Packets per second through the lab router, every way in the same run on
//! the same lab: the Linux kernel doing lb's job (nftables PCC marks, policy
//! routing, masquerade), lb (lbd with its XDP data plane), lb through the
//! uplinks' qdiscs, and a bare XDP redirect (the lab's ceiling); and for
//! IPv6, lb translating every flow (NPTv6) beside the kernel's best way to
//! do that (ip6tables SNPT/DNPT, the same PCC marks, policy routing). Each
//! round runs every way once, so drifting background load hits all alike.
//!
//! It owns the benchmark's lab (namespaces `lbb-*`) for the length of its
//! run, and what it adds to it (IPv6 addresses, routes, rules, neighbours);
//! it never leaves any of it behind, also when a step fails (the lab goes
//! down with everything in it), and it never judges a speed: the report
//! states the figures.
//!
//! IPv6 (the lab itself has none: [`add_ipv6`] gives it a static plan, as
//! lbd's config can name prefixes when no DHCPv6 client says them): the
//! LAN carries a ULA, which lbd is told of with `[[lan]] prefix6`, and
//! each uplink has a delegation named with `[[uplink]] prefix6`. The LAN's
//! prefix lies in neither, so both uplinks translate: every IPv6 packet
//! measured takes lb's NPTv6 path, as every IPv4 packet takes its NAT.
//!
//! Traffic (DESIGN.md, "Facts about veth labs"): lb-bench's `bench_gen` runs
//! as a live-frames test run from a thread in the client's namespace, pinned
//! to one CPU (or its frames go through a tap where the kernel refuses
//! that: gen.rs); each frame leaves the client's eth0, so the router's lan0
//! receives it in NAPI on that same CPU, in softirq, right after each batch.
//! The generator and the router thus share one CPU and the router paces the
//! generator. `bench_sink` on each ISP's down0 counts and drops: pps is what
//! the sinks count per second. Since the sinks drop ARP too, the router has
//! static neighbours for the gateways and the client one for the router.
//!
//! CPU: the router is a namespace, not a machine, so its CPU is measured on
//! the whole system from /proc/stat: softirq time on the generator's CPU is
//! the router's forwarding (and the sinks' drop); system time there is the
//! generator; the other CPU is whatever else the machine runs.

use std::{
    net::Ipv6Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{
    tc::{SchedClassifierLinkId, TcAttachOptions},
    xdp::XdpLinkId,
    LinkOrder, TcAttachType, XdpMode,
};
use lb_daemon::{config, daemon::mac_text, reconcile::ipv6::target};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    in_netns, Lab, LabDesc,
};

use super::{
    gen::{Generator, Source},
    object::{self, BenchObject, Stamp, Udp, Udp6},
    profile::{self, Profile},
    Args,
};

/// Namespace prefix of the benchmark's lab.
const PREFIX: &str = "lbb-";
const LAB: &str = "default";
/// Traffic before each measured window: lb and conntrack learn the flows.
pub(super) const WARMUP: Duration = Duration::from_secs(1);
/// The generator's flows: UDP from these source ports to the discard port
/// of the internet host; outside both the NAT range and the router's own
/// port range, so lb keeps them.
pub(super) const GEN_PORT_BASE: u16 = 10_000;
pub(super) const XDP_TX: u32 = 3;
/// Hop limit of the generator's frames (IPv4's TTL is 64 too).
const HOP_LIMIT: u8 = 64;

/// `--flows` as the generator's count of source ports: at least one, and
/// few enough to stay below the NAT range of the lab's lbd (the default).
pub(super) fn generator_flows(flows: u32) -> Result<u16> {
    let nat_start = config::DEFAULT_NAT_PORTS.0;
    u16::try_from(flows)
        .ok()
        .filter(|&f| f > 0 && u32::from(GEN_PORT_BASE) + u32::from(f) <= u32::from(nat_start))
        .with_context(|| format!("--flows {flows}: from 1 to {}", nat_start - GEN_PORT_BASE))
}

/// The benchmark's IPv6 plan. The LAN: a ULA, named to lbd.
const LAN6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 0), 64);
const ROUTER_LAN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 1);
/// The generator's first flow; flow n comes from the source whose 7th word
/// is 0x1000 + n, to the destination whose 2nd word is 0xffff - n (the
/// two move together so that every flow's UDP checksum holds: see
/// `Stamp::flows6`). The destinations lie in 3fff::/16 (next to IPv6's
/// documentation range, RFC 9637), which no route of the lab's covers:
/// they leave by the default routes.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0x1000, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0xffff, 0, 0, 0, 0, 0, 0x10);
/// Test runs of the IPv6 generator checked before the benchmark trusts it.
const GEN6_CHECKS: u32 = 4;
/// Uplink N's delegation, 2001:db8:N:100::/56, named to lbd (a DHCPv6 client
/// would have said it with an `unreachable` route); its WAN address
/// 2001:db8:N::2/64; its next hop fe80::1, the ISP router's link-local
/// address as router advertisements give it.
fn delegation(n: u16) -> (Ipv6Addr, u8) {
    (Ipv6Addr::new(0x2001, 0xdb8, n, 0x100, 0, 0, 0, 0), 56)
}
fn wan6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 2)
}
const WAN6_LEN: u8 = 64;
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const UPLINKS: [u16; 2] = [1, 2];
/// Metrics of the uplinks' IPv6 default routes in main: isp1 first, as in
/// the IPv4 plan (1024 is the kernel's default for IPv6 routes).
const METRICS6: [&str; 2] = ["1024", "1200"];
/// How long lbd gets to balance IPv6 once it answers: a bound, so that a
/// broken setup fails the benchmark instead of hanging it.
const IPV6_READY: Duration = Duration::from_secs(10);

/// The prefix the LAN's flows take by uplink `n`: lbd's own rule (the
/// LAN's subnet bits within the delegation), so that both ways translate
/// to the same prefix.
fn translated(n: u16) -> Result<(Ipv6Addr, u8)> {
    target(LAN6, Some(delegation(n)))
        .with_context(|| format!("uplink {n}'s delegation cannot hold the LAN's prefix"))
}

fn text6((addr, len): (Ipv6Addr, u8)) -> String {
    format!("{addr}/{len}")
}

/// The kernel's way (MikroTik's PCC in nftables): a new connection gets a
/// conntrack mark from a hash of its 5-tuple, every packet takes its
/// connection's mark, policy routing sends mark N to uplink N, and each
/// uplink masquerades.
const NFT_PCC: &str = r#"
table ip lbbench {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan0" ct mark 0 ct mark set jhash ip saddr . ip daddr . udp sport . udp dport mod 2 offset 1
        iifname "lan0" meta mark set ct mark
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan1" masquerade
        oifname "wan2" masquerade
    }
}
"#;

/// The kernel's way for IPv6: the same PCC mark as IPv4's (so that only
/// the translation differs); ip6tables adds SNPT/DNPT per uplink
/// ([`kernel6_on`]), as nftables has no stateless prefix translation.
const NFT_PCC6: &str = r#"
table ip6 lbbench6 {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        iifname "lan0" ct mark 0 ct mark set jhash ip6 saddr . ip6 daddr . udp sport . udp dport mod 2 offset 1
        iifname "lan0" meta mark set ct mark
    }
}
"#;

/// One way of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Kernel,
    Lb,
    /// lb with a qdisc on each uplink that it must honour: the hand-off to
    /// tc and the device's queue on every packet.
    LbQdisc,
    Bare,
    /// The ceiling through the uplinks' qdisc: `bench_nop` in XDP, then
    /// `bench_queue` in tc (new MACs, a redirect to the uplink's egress).
    BareQdisc,
    /// IPv6, every flow translated (NPTv6) on its uplink.
    Kernel6,
    Lb6,
}

impl Way {
    pub const ALL: [Way; 7] = [
        Way::Kernel,
        Way::Lb,
        Way::LbQdisc,
        Way::Bare,
        Way::BareQdisc,
        Way::Kernel6,
        Way::Lb6,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Way::Kernel => "kernel (nftables PCC + policy routing + masquerade)",
            Way::Lb => "lb (lbd, XDP)",
            Way::LbQdisc => "lb through the uplinks' qdisc (pfifo)",
            Way::Bare => "bare XDP redirect (lab ceiling)",
            Way::BareQdisc => "bare tc redirect through the uplinks' qdisc (its ceiling)",
            Way::Kernel6 => "IPv6: kernel (ip6tables SNPT/DNPT + nftables PCC + policy routing)",
            Way::Lb6 => "IPv6: lb (lbd, XDP, NPTv6)",
        }
    }
}

/// The qdisc of the qdisc way: the cheapest one that counts as an
/// operator's (it has a handle), so that what is measured is the path.
const QDISC: [&str; 6] = ["root", "handle", "1:", "pfifo", "limit", "1000"];

/// One measured window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Frames the sinks counted, per second.
    pub pps: f64,
    /// Frames the generator made, per second.
    pub offered_pps: f64,
    /// Share of the frames that reached ISP 1.
    pub isp1_share: f64,
    /// Shares of the generator's CPU, in percent: softirq (the router),
    /// system (the generator), and anything else that ran there.
    pub softirq_pct: f64,
    pub system_pct: f64,
    pub other_pct: f64,
    /// Busy share of all CPUs together, in percent.
    pub busy_pct: f64,
    /// Softirq (router) and system (generator) time on the generator's CPU
    /// per forwarded frame, ns.
    pub softirq_ns: f64,
    pub system_ns: f64,
}

pub struct WayResult {
    pub way: Way,
    pub windows: Vec<Window>,
}

/// Bring the lab up, measure every way `args.runs` times, profile lb and
/// the bare redirect for one more window each, and take the lab down again
/// (also on error).
pub fn measure(
    args: &Args,
    cpu: usize,
    source: &Source,
    interrupted: &AtomicBool,
) -> Result<(Vec<WayResult>, Vec<Profile>)> {
    // A lab left over from a crashed run would make `up` fail half-way.
    Lab::down(PREFIX)?;
    let desc = LabDesc::shipped(LAB).with_context(|| format!("loading lab {LAB}"))?;
    let mut lab = Lab::up(&desc, PREFIX)?;
    let mut profiles = Vec::new();
    let mut results: Vec<WayResult> = Way::ALL
        .iter()
        .map(|&way| WayResult {
            way,
            windows: Vec::new(),
        })
        .collect();
    {
        let mut rig = Rig::new(&mut lab, args.flows, cpu, source)?;
        for round in 1..=args.runs {
            for result in &mut results {
                ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
                let window = rig
                    .window(result.way, Duration::from_secs(args.seconds), interrupted)
                    .with_context(|| format!("round {round}, {}", result.way.label()))?;
                println!(
                    "  round {round}/{}: {:<52} {:>6.3} Mpps",
                    args.runs,
                    result.way.label(),
                    window.pps / 1e6
                );
                result.windows.push(window);
            }
        }
        for way in [Way::Lb, Way::Bare] {
            ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
            let length = Duration::from_secs(args.seconds);
            let profile = profile::record(&mut rig, way, cpu, length, interrupted)?;
            println!(
                "  profiled: {:<52} {:>6.3} Mpps",
                way.label(),
                profile.pps / 1e6
            );
            profiles.push(profile);
        }
        // The rig's programs detach here, before the lab goes.
    }
    drop(lab);
    Ok((results, profiles))
}

/// The lab with the benchmark's programs in place (scale.rs drives it too,
/// with generators of its own: [`Rig::generator`]).
pub(super) struct Rig<'a> {
    pub(super) lab: &'a mut Lab,
    cpu: usize,
    /// The MACs of the generator's frames: the client's eth0, the router's
    /// lan0.
    eth0: [u8; 6],
    lan0: [u8; 6],
    /// How the generators send.
    source: Source,
    /// The generators, for IPv4 and for IPv6 (each its own object: its
    /// own stamp and sequence).
    gen: Generator,
    gen6: Generator,
    pub(super) client_eth0: u32,
    /// `bench_sink` on isp1's and isp2's down0 (each its own counter).
    sinks: [BenchObject; 2],
    /// `bench_redirect`, attached to lan0 only for its own windows.
    bare: BenchObject,
    /// `bench_nop` and `bench_queue`, likewise.
    bare_queue: BenchObject,
}

impl<'a> Rig<'a> {
    pub(super) fn new(
        lab: &'a mut Lab,
        flows: u32,
        cpu: usize,
        source: &Source,
    ) -> Result<Rig<'a>> {
        let flows = generator_flows(flows)?;
        let lan0 = mac(lab, "router", "lan0")?;
        let eth0 = mac(lab, "client", "eth0")?;
        let wan = [mac(lab, "router", "wan1")?, mac(lab, "router", "wan2")?];
        let isp = [mac(lab, "isp1", "down0")?, mac(lab, "isp2", "down0")?];
        let wan_index = [
            ifindex(lab, "router", "wan1")?,
            ifindex(lab, "router", "wan2")?,
        ];
        let client_eth0 = ifindex(lab, "client", "eth0")?;

        for (n, isp_mac) in isp.iter().enumerate() {
            let n = n + 1;
            let (gateway, dev) = (format!("100.64.{n}.1"), format!("wan{n}"));
            static_neighbour(lab, "router", &gateway, isp_mac, &dev)?;
        }
        static_neighbour(lab, "client", "10.10.0.1", &lan0, "eth0")?;
        add_ipv6(lab, &lan0, &isp)?;
        // The kernel's way has no XDP program on lan0: without GRO, veth
        // would drop the generator's frames (DESIGN.md).
        lab.exec("router", &["ethtool", "-K", "lan0", "gro", "on"])?;

        let mut sinks = [
            BenchObject::load(&["bench_sink"])?,
            BenchObject::load(&["bench_sink"])?,
        ];
        for (sink, host) in sinks.iter_mut().zip(["isp1", "isp2"]) {
            in_netns(lab.ns(host)?, || {
                sink.xdp_mut("bench_sink")?
                    .attach("down0", XdpMode::Driver)
                    .with_context(|| format!("attaching bench_sink to {host}'s down0 (native)"))
            })?;
        }

        let mut bare = BenchObject::load(&["bench_redirect"])?;
        in_netns(lab.ns("router")?, || {
            for i in 0..2 {
                bare.set_redirect(i as u32, wan_index[i], isp[i], wan[i])?;
            }
            Ok(())
        })?;

        let mut bare_queue = BenchObject::load(&["bench_nop", "bench_queue"])?;
        for i in 0..2 {
            bare_queue.set_queue(i as u32, wan_index[i], isp[i], wan[i])?;
        }

        let gen = generator(eth0, lan0, GEN_PORT_BASE, flows, source)?;

        let frame6 = Udp6 {
            src_mac: eth0,
            dst_mac: lan0,
            src: CLIENT6,
            dst: SERVER6,
            src_port: GEN_PORT_BASE,
            dst_port: 9,
            hop_limit: HOP_LIMIT,
        }
        .frame();
        let mut gen6 = BenchObject::load(&["bench_gen"])?;
        gen6.set_stamp(&Stamp::flows6(&frame6, flows)?)?;
        // The IPv6 frames come from IPv4's writes laid over them: check a
        // few as the kernel made them.
        for run in 0..GEN6_CHECKS {
            let (verdict, out) = object::run_once(gen6.xdp("bench_gen")?, &frame6)?;
            ensure!(
                verdict == XDP_TX,
                "bench_gen (IPv6) returned {verdict}, not XDP_TX"
            );
            object::check_ipv6_udp(&out)
                .with_context(|| format!("bench_gen's IPv6 frame, run {run}"))?;
            let (src, _) = object::ipv6_addresses(&out)?;
            ensure!(
                lb_daemon::observe::kernel6::within((src, 128), LAN6),
                "bench_gen's IPv6 frame, run {run}: source {src} outside {}",
                text6(LAN6)
            );
        }

        let gen6 = Generator::new(gen6, frame6, flows, source)?;

        Ok(Rig {
            lab,
            cpu,
            eth0,
            lan0,
            source: source.clone(),
            gen,
            gen6,
            client_eth0,
            sinks,
            bare,
            bare_queue,
        })
    }

    /// Set `way` up, measure one window, and take `way` down again.
    fn window(&mut self, way: Way, length: Duration, interrupted: &AtomicBool) -> Result<Window> {
        match way {
            Way::Kernel6 | Way::Lb6 => self.with_way(way, |rig| rig.traffic6(length, interrupted)),
            _ => self.with_way(way, |rig| rig.traffic(length, interrupted)),
        }
    }

    /// `bench_gen` making `flows` flows from source ports `first_port`
    /// on, as the rig's own generator does, and its first frame: for
    /// generators of their own (one per CPU in scale.rs).
    pub(super) fn generator(&self, first_port: u16, flows: u16) -> Result<Generator> {
        generator(self.eth0, self.lan0, first_port, flows, &self.source)
    }

    /// Set `way` up, run `measure` on the rig, and take `way` down again
    /// (also when `measure` failed; its error first).
    pub(super) fn with_way<T>(
        &mut self,
        way: Way,
        measure: impl FnOnce(&Rig<'a>) -> Result<T>,
    ) -> Result<T> {
        match way {
            Way::Kernel => {
                kernel_on(self.lab)?;
                let window = measure(self);
                first_error(window, kernel_off(self.lab))
            }
            Way::Lb => {
                // lbd as the lab runs it, without health probes (the sinks drop
                // every probe, which would take both uplinks down); all else
                // default: 5-tuple, 65,536 flows, NAT 20000-29999, 1:1.
                let lbd = Lbd::start(self.lab, &LabConfig::default().render())?;
                let window = measure(self);
                first_error(window, lbd.stop(self.lab))
            }
            Way::LbQdisc => {
                self.add_qdiscs()?;
                let lbd = Lbd::start(self.lab, &LabConfig::default().render())?;
                let window = wait_qdisc_path(&lbd).and_then(|()| measure(self));
                let stopped = lbd.stop(self.lab);
                first_error(window, stopped.and(self.remove_qdiscs()))
            }
            Way::BareQdisc => {
                self.add_qdiscs()?;
                let window = self.attach_bare_queue().and_then(|links| {
                    let window = measure(self);
                    first_error(window, self.detach_bare_queue(links))
                });
                first_error(window, self.remove_qdiscs())
            }
            Way::Bare => {
                let bare = &mut self.bare;
                let link = in_netns(self.lab.ns("router")?, || {
                    bare.xdp_mut("bench_redirect")?
                        .attach("lan0", XdpMode::Driver)
                        .context("attaching bench_redirect to lan0 (native)")
                })?;
                let window = measure(self);
                first_error(window, self.detach_bare(link))
            }
            Way::Kernel6 => {
                // Half-done rules are removed with the lab if this fails.
                kernel6_on(self.lab)?;
                let window = measure(self);
                first_error(window, kernel6_off(self.lab))
            }
            Way::Lb6 => {
                // As the IPv4 way, with the prefixes named (no DHCPv6 here).
                let lan = format!(
                    "[[lan]]\ninterface = \"lan0\"\nprefix6 = \"{}\"\n",
                    text6(LAN6)
                );
                let uplinks = UPLINKS.map(|n| format!("prefix6 = \"{}\"", text6(delegation(n))));
                let config = LabConfig {
                    sections: &lan,
                    lans: &[],
                    uplinks: &[(1, &uplinks[0]), (2, &uplinks[1])],
                    ..LabConfig::default()
                }
                .render();
                let lbd = Lbd::start(self.lab, &config)?;
                let window = wait_ipv6(&lbd).and_then(|()| measure(self));
                first_error(window, lbd.stop(self.lab))
            }
        }
    }

    /// The operator's qdisc (`QDISC`) on both uplinks.
    fn add_qdiscs(&mut self) -> Result<()> {
        for dev in ["wan1", "wan2"] {
            let mut args = vec!["tc", "qdisc", "add", "dev", dev];
            args.extend(QDISC);
            self.lab.exec("router", &args)?;
        }
        Ok(())
    }

    /// Both uplinks' qdiscs removed; the first error, after trying both.
    fn remove_qdiscs(&mut self) -> Result<()> {
        let mut removed = Ok(String::new());
        for dev in ["wan1", "wan2"] {
            removed = removed.and(
                self.lab
                    .exec("router", &["tc", "qdisc", "del", "dev", dev, "root"]),
            );
        }
        removed.map(drop)
    }

    /// `bench_nop` on lan0's XDP and `bench_queue` on its tc ingress; if
    /// the second fails, the first is detached again.
    fn attach_bare_queue(&mut self) -> Result<(XdpLinkId, SchedClassifierLinkId)> {
        let ns = self.lab.ns("router")?;
        let queue = &mut self.bare_queue;
        let xdp = in_netns(ns, || {
            queue
                .xdp_mut("bench_nop")?
                .attach("lan0", XdpMode::Driver)
                .context("attaching bench_nop to lan0 (native)")
        })?;
        let tc = in_netns(ns, || {
            queue
                .tc_mut("bench_queue")?
                .attach_with_options(
                    "lan0",
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .context("attaching bench_queue to lan0's tc ingress (TCX)")
        });
        match tc {
            Ok(tc) => Ok((xdp, tc)),
            Err(e) => {
                let detached = queue.xdp_mut("bench_nop").and_then(|p| Ok(p.detach(xdp)?));
                first_error(Err(e), detached)
            }
        }
    }

    fn detach_bare_queue(&mut self, (xdp, tc): (XdpLinkId, SchedClassifierLinkId)) -> Result<()> {
        let queue = &mut self.bare_queue;
        let tc = queue
            .tc_mut("bench_queue")
            .and_then(|p| Ok(p.detach(tc)?))
            .context("detaching bench_queue from lan0");
        let xdp = queue
            .xdp_mut("bench_nop")
            .and_then(|p| Ok(p.detach(xdp)?))
            .context("detaching bench_nop from lan0");
        tc.and(xdp)
    }

    fn detach_bare(&mut self, link: XdpLinkId) -> Result<()> {
        self.bare
            .xdp_mut("bench_redirect")?
            .detach(link)
            .context("detaching bench_redirect from lan0")
    }

    /// Run the generator: warm up, then measure one window.
    pub(super) fn traffic(&self, length: Duration, interrupted: &AtomicBool) -> Result<Window> {
        self.generate(&self.gen, length, interrupted)
    }

    /// [`Rig::traffic`] with the IPv6 generator.
    fn traffic6(&self, length: Duration, interrupted: &AtomicBool) -> Result<Window> {
        self.generate(&self.gen6, length, interrupted)
    }

    fn generate(
        &self,
        gen: &Generator,
        length: Duration,
        interrupted: &AtomicBool,
    ) -> Result<Window> {
        let (before, after) = in_netns(self.lab.ns("client")?, || {
            generator_thread(self.cpu)?;
            let before = gen.send_for(self.client_eth0, WARMUP, length, interrupted, || {
                self.sample(&[gen])
            })?;
            let after = self.sample(&[gen])?;
            Ok((before, after))
        })?;
        after.since(&before, self.cpu)
    }

    /// The sinks' and generators' counters and the CPU times, now.
    pub(super) fn sample(&self, gens: &[&Generator]) -> Result<Sample> {
        let mut generated = 0;
        for gen in gens {
            generated += gen.generated()?;
        }
        Ok(Sample {
            at: Instant::now(),
            sinks: [
                self.sinks[0].counter("SINK")?,
                self.sinks[1].counter("SINK")?,
            ],
            generated,
            cpus: cpu_times()?,
        })
    }
}

/// Give the lab the benchmark's IPv6 plan (see the constants): forwarding
/// on the router, addresses without duplicate detection (nothing else
/// holds them, and a tentative address cannot be used), a default route
/// per uplink via the ISP's link-local address as in the IPv4 plan (isp1
/// first), and static neighbours, since the sinks drop neighbour discovery.
/// It all goes with the lab's namespaces.
fn add_ipv6(lab: &Lab, lan0: &[u8; 6], isp: &[[u8; 6]; 2]) -> Result<()> {
    lab.exec(
        "router",
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
    )
    .context("IPv6 forwarding on the router")?;
    let lan_address = format!("{ROUTER_LAN6}/{}", LAN6.1);
    let client_address = format!("{CLIENT6}/{}", LAN6.1);
    let mut addresses = vec![
        ("router", lan_address, "lan0".to_string()),
        ("client", client_address, "eth0".to_string()),
    ];
    for n in UPLINKS {
        addresses.push((
            "router",
            format!("{}/{WAN6_LEN}", wan6(n)),
            format!("wan{n}"),
        ));
    }
    for (host, address, dev) in &addresses {
        lab.exec(
            host,
            &["ip", "-6", "address", "add", address, "dev", dev, "nodad"],
        )
        .with_context(|| format!("adding {address} to {host}:{dev}"))?;
    }
    let gateway = GATEWAY6.to_string();
    for ((n, isp_mac), metric) in UPLINKS.iter().zip(isp).zip(METRICS6) {
        let dev = format!("wan{n}");
        static_neighbour(lab, "router", &gateway, isp_mac, &dev)?;
        lab.exec(
            "router",
            &[
                "ip", "-6", "route", "replace", "default", "via", &gateway, "dev", &dev, "metric",
                metric,
            ],
        )
        .with_context(|| format!("an IPv6 default route via {dev}"))?;
    }
    static_neighbour(lab, "client", &ROUTER_LAN6.to_string(), lan0, "eth0")
}

/// Wait until lbd balances IPv6 on the LAN's prefix with both uplinks
/// active and translating to the prefixes the kernel's way uses too.
fn wait_ipv6(lbd: &Lbd) -> Result<()> {
    let lan = text6(LAN6);
    let wanted: Vec<String> = UPLINKS
        .iter()
        .map(|&n| translated(n).map(text6))
        .collect::<Result<_>>()?;
    lb_tests::stream::wait_for(
        "lbd to balance IPv6 over both uplinks, translated",
        IPV6_READY,
        || {
            let status = lbd.status()?;
            let uplinks = status["uplinks"].as_array().cloned().unwrap_or_default();
            Ok(status["lan_prefix6"] == lan.as_str()
                && uplinks.len() == wanted.len()
                && uplinks.iter().zip(&wanted).all(|(u, to)| {
                    u["ipv6"]["state"] == "active" && u["ipv6"]["translated_to"] == to.as_str()
                }))
        },
    )
}

/// Wait until lbd sends through both uplinks' qdiscs.
fn wait_qdisc_path(lbd: &Lbd) -> Result<()> {
    lb_tests::stream::wait_for(
        "lbd to take the qdisc path",
        Duration::from_secs(10),
        || {
            let status = lbd.status()?;
            let uplinks = status["uplinks"].as_array().cloned().unwrap_or_default();
            Ok(uplinks.len() == 2 && uplinks.iter().all(|u| u["egress"]["path"] == "qdisc"))
        },
    )
}

/// The window, unless measuring it or taking its way down again failed
/// (the measurement's error first).
fn first_error<T>(window: Result<T>, teardown: Result<()>) -> Result<T> {
    let window = window?;
    teardown?;
    Ok(window)
}

/// `bench_gen` loaded to make `flows` UDP flows from the client (source
/// ports `first_port` on, to the discard port of the internet host), and
/// its first frame, checked with one ordinary test run.
pub(super) fn generator(
    eth0: [u8; 6],
    lan0: [u8; 6],
    first_port: u16,
    flows: u16,
    source: &Source,
) -> Result<Generator> {
    let frame = Udp {
        src_mac: eth0,
        dst_mac: lan0,
        src: [10, 10, 0, 2].into(),
        dst: [198, 51, 100, 10].into(),
        src_port: first_port,
        dst_port: 9,
        ttl: 64,
    }
    .frame();
    let mut gen = BenchObject::load(&["bench_gen"])?;
    gen.set_stamp(&Stamp::flows(&frame, flows, 1)?)?;
    let (verdict, out) = object::run_once(gen.xdp("bench_gen")?, &frame)?;
    ensure!(
        verdict == XDP_TX,
        "bench_gen returned {verdict}, not XDP_TX"
    );
    object::check_ipv4_udp(&out).context("bench_gen's frame")?;
    Generator::new(gen, frame, flows, source)
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent` on `host`.
pub(super) fn static_neighbour(
    lab: &Lab,
    host: &str,
    ip: &str,
    mac: &[u8; 6],
    dev: &str,
) -> Result<()> {
    let mac = mac_text(mac);
    let args = [
        "ip",
        "neigh",
        "replace",
        ip,
        "lladdr",
        &mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ];
    lab.exec(host, &args)
        .with_context(|| format!("a static neighbour for {ip} on {host}"))?;
    Ok(())
}

/// Pin the generator's thread to `cpu` and raise its priority.
pub(super) fn generator_thread(cpu: usize) -> Result<()> {
    super::pin_to_cpu(cpu)?;
    // Other work takes less of this CPU (see `prioritize`); the router's
    // softirq work runs in this thread's context, so it gains too.
    // SAFETY: gettid has no preconditions; setpriority on our own thread id
    // changes only this thread's nice value.
    let rc = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            super::NICE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting the generator's nice value to {}", super::NICE));
    }
    Ok(())
}

/// Load nftables `rules` on the router, through a file named `name`.
fn load_nft(lab: &Lab, name: &str, rules: &str) -> Result<()> {
    let file = std::env::temp_dir().join(format!("{PREFIX}{name}"));
    std::fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
    let path = file.to_str().context("temporary directory is not UTF-8")?;
    let loaded = lab
        .exec("router", &["nft", "-f", path])
        .map(drop)
        .with_context(|| format!("loading {name} (is nf_conntrack available?)"));
    let _ = std::fs::remove_file(&file);
    loaded
}

pub(super) fn kernel_on(lab: &Lab) -> Result<()> {
    kernel_on_with(lab, "pcc.nft", NFT_PCC)
}

/// The kernel's way with PCC rules of the caller's (table `ip lbbench`, so
/// that [`kernel_off`] removes them): its policy routing is the same.
pub(super) fn kernel_on_with(lab: &Lab, name: &str, rules: &str) -> Result<()> {
    load_nft(lab, name, rules)?;
    for n in 1..=2 {
        let (n, gw, dev) = (n.to_string(), format!("100.64.{n}.1"), format!("wan{n}"));
        lab.exec(
            "router",
            &[
                "ip", "route", "replace", "default", "via", &gw, "dev", &dev, "table", &n,
            ],
        )?;
        lab.exec("router", &["ip", "rule", "add", "fwmark", &n, "table", &n])?;
    }
    Ok(())
}

pub(super) fn kernel_off(lab: &Lab) -> Result<()> {
    for n in ["1", "2"] {
        lab.exec("router", &["ip", "rule", "del", "fwmark", n, "table", n])?;
        lab.exec("router", &["ip", "route", "flush", "table", n])?;
    }
    lab.exec("router", &["nft", "delete", "table", "ip", "lbbench"])?;
    // The kernel's connections go too: the next ways send the same flows,
    // and lb leaves a connection that conntrack holds to the kernel (as
    // on a router, where it never takes over what it did not open), so
    // lb's windows would measure the kernel's path.
    lab.exec("router", &["conntrack", "-F"])?;
    Ok(())
}

/// The kernel's way for IPv6: PCC marks ([`NFT_PCC6`]), policy routing as
/// for IPv4, and per uplink a stateless prefix translation to the prefix
/// lb gives its flows: SNPT on the way out (mangle POSTROUTING), DNPT for
/// replies (mangle PREROUTING; the benchmark sends none, but a router that
/// translates has both).
fn kernel6_on(lab: &Lab) -> Result<()> {
    load_nft(lab, "pcc6.nft", NFT_PCC6)?;
    let lan = text6(LAN6);
    let gateway = GATEWAY6.to_string();
    for n in UPLINKS {
        let (table, dev) = (n.to_string(), format!("wan{n}"));
        let to = text6(translated(n)?);
        let rules: [&[&str]; 2] = [
            &[
                "-A",
                "POSTROUTING",
                "-o",
                &dev,
                "-s",
                &lan,
                "-j",
                "SNPT",
                "--src-pfx",
                &lan,
                "--dst-pfx",
                &to,
            ],
            &[
                "-A",
                "PREROUTING",
                "-i",
                &dev,
                "-d",
                &to,
                "-j",
                "DNPT",
                "--src-pfx",
                &to,
                "--dst-pfx",
                &lan,
            ],
        ];
        for rule in rules {
            let mut args = vec!["ip6tables", "-t", "mangle"];
            args.extend(rule);
            lab.exec("router", &args)
                .context("adding an ip6tables NPT rule (does the kernel have ip6t_NPT?)")?;
        }
        lab.exec(
            "router",
            &[
                "ip", "-6", "route", "replace", "default", "via", &gateway, "dev", &dev, "table",
                &table,
            ],
        )?;
        lab.exec(
            "router",
            &["ip", "-6", "rule", "add", "fwmark", &table, "table", &table],
        )?;
    }
    Ok(())
}

fn kernel6_off(lab: &Lab) -> Result<()> {
    // Taken before the rules go, reported after: the teardown comes first.
    let translated = snpt_counted(lab);
    for n in UPLINKS {
        let n = n.to_string();
        lab.exec(
            "router",
            &["ip", "-6", "rule", "del", "fwmark", &n, "table", &n],
        )?;
        lab.exec("router", &["ip", "-6", "route", "flush", "table", &n])?;
    }
    // ip6tables' own table goes whole: flushed, its hooks would stay.
    lab.exec("router", &["nft", "delete", "table", "ip6", "mangle"])?;
    lab.exec("router", &["nft", "delete", "table", "ip6", "lbbench6"])?;
    // As for IPv4 (`kernel_off`): lb leaves connections conntrack holds to
    // the kernel.
    lab.exec("router", &["conntrack", "-F", "-f", "ipv6"])?;
    translated
}

/// That each uplink's SNPT rule translated packets: the kernel's IPv6 row
/// measures its translation, not a path around it.
fn snpt_counted(lab: &Lab) -> Result<()> {
    let listing = lab.exec(
        "router",
        &[
            "ip6tables",
            "-t",
            "mangle",
            "-n",
            "-v",
            "-x",
            "-L",
            "POSTROUTING",
        ],
    )?;
    // Rule lines: pkts bytes target prot opt in out source destination ...
    let counts: Vec<(String, u64)> = listing
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(2) == Some(&"SNPT"))
                .then(|| Some((f.get(6)?.to_string(), f.first()?.parse().ok()?)))
                .flatten()
        })
        .collect();
    for n in UPLINKS {
        let dev = format!("wan{n}");
        let packets = counts
            .iter()
            .find(|(out, _)| *out == dev)
            .map(|&(_, p)| p)
            .with_context(|| format!("no SNPT rule for {dev} in:\n{listing}"))?;
        ensure!(packets > 0, "the SNPT rule for {dev} translated no packet");
    }
    Ok(())
}

/// Counters and CPU times at one instant.
pub(super) struct Sample {
    at: Instant,
    sinks: [u64; 2],
    generated: u64,
    cpus: Vec<CpuTimes>,
}

impl Sample {
    fn since(&self, before: &Sample, cpu: usize) -> Result<Window> {
        self.since_on(before, &[cpu])
    }

    /// The window from `before` to this sample, with generators (and so the
    /// router's softirq work) on `cpus`: their times are summed, and the
    /// shares are of those CPUs' time together.
    pub(super) fn since_on(&self, before: &Sample, cpus: &[usize]) -> Result<Window> {
        let secs = (self.at - before.at).as_secs_f64();
        let isp1 = self.sinks[0] - before.sinks[0];
        let isp2 = self.sinks[1] - before.sinks[1];
        let delivered = isp1 + isp2;
        ensure!(delivered > 0, "no frame reached either ISP");
        let generated = self.generated - before.generated;
        // cpus[0] is the "cpu" line (all CPUs), cpus[1 + n] is CPU n.
        let all = self.cpus[0].since(&before.cpus[0]);
        let mut mine = CpuTimes::default();
        for &cpu in cpus {
            let times = self
                .cpus
                .get(1 + cpu)
                .zip(before.cpus.get(1 + cpu))
                .map(|(a, b)| a.since(b))
                .with_context(|| format!("CPU {cpu} missing from /proc/stat"))?;
            mine = mine.plus(&times);
        }
        let tick_ns = 1e9 / ticks_per_second()?;
        let pct = |part: u64, whole: u64| 100.0 * part as f64 / whole.max(1) as f64;
        Ok(Window {
            pps: delivered as f64 / secs,
            offered_pps: generated as f64 / secs,
            isp1_share: isp1 as f64 / delivered as f64,
            softirq_pct: pct(mine.softirq, mine.total),
            system_pct: pct(mine.system, mine.total),
            other_pct: pct(
                mine.total - mine.idle - mine.softirq - mine.system,
                mine.total,
            ),
            busy_pct: pct(all.total - all.idle, all.total),
            softirq_ns: mine.softirq as f64 * tick_ns / delivered as f64,
            system_ns: mine.system as f64 * tick_ns / delivered as f64,
        })
    }
}

/// One line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Default)]
pub(super) struct CpuTimes {
    pub(super) total: u64,
    pub(super) idle: u64,
    pub(super) system: u64,
    pub(super) softirq: u64,
}

impl CpuTimes {
    fn plus(&self, other: &CpuTimes) -> CpuTimes {
        CpuTimes {
            total: self.total + other.total,
            idle: self.idle + other.idle,
            system: self.system + other.system,
            softirq: self.softirq + other.softirq,
        }
    }

    pub(super) fn since(&self, before: &CpuTimes) -> CpuTimes {
        CpuTimes {
            total: self.total - before.total,
            idle: self.idle - before.idle,
            system: self.system - before.system,
            softirq: self.softirq - before.softirq,
        }
    }
}

/// The "cpu" line, then one per CPU.
pub(super) fn cpu_times() -> Result<Vec<CpuTimes>> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    text.lines()
        .filter(|l| l.starts_with("cpu"))
        .map(|line| {
            // user nice system idle iowait irq softirq steal (guest time is
            // already in user and nice)
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing /proc/stat line `{line}`"))?;
            ensure!(f.len() == 8, "short /proc/stat line `{line}`");
            Ok(CpuTimes {
                total: f.iter().sum(),
                idle: f[3] + f[4],
                system: f[2],
                softirq: f[6],
            })
        })
        .collect()
}

pub(super) fn ticks_per_second() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(hz as f64)
}

/// The MAC address of `host:ifname`.
pub(super) fn mac(lab: &Lab, host: &str, ifname: &str) -> Result<[u8; 6]> {
    let text = lab.exec(host, &["cat", &format!("/sys/class/net/{ifname}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{host}:{ifname} has MAC address `{}`", text.trim()))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{host}:{ifname} has MAC address `{}`", text.trim()))
}

/// The interface index of `host:ifname`, in its namespace.
pub(super) fn ifindex(lab: &Lab, host: &str, ifname: &str) -> Result<u32> {
    let text = lab.exec(host, &["cat", &format!("/sys/class/net/{ifname}/ifindex")])?;
    text.trim()
        .parse()
        .with_context(|| format!("{host}:{ifname} has ifindex `{}`", text.trim()))
}
