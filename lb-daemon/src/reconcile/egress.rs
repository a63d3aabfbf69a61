//! Egress: which way lb's packets leave each device, and lb's own shaper.
//!
//! `XDP_REDIRECT` skips a device's qdisc. Where the operator configured one
//! (SQM's shaper, a `tbf`, a queue tree), or lb shapes (`[uplink.shape]`),
//! the data plane hands its packets to its tc program instead, which sends
//! them through that qdisc (`lb_common::egress`). This module decides, per
//! device, from the qdiscs the kernel reports, and plans lb's HTB shapers:
//! pure functions, so every rule is unit-tested. Running `tc` is the only
//! side effect, in [`apply`] and [`remove`]; it never touches a qdisc that
//! lbd did not make (handle `1b:`).
//!
//! A device on the XDP path whose ring overflows (the ring watch counts
//! what `XDP_REDIRECT` lost there) takes the hand-off too, for a while:
//! `overflow` says for how long, [`Owned::ring_reading`] applies it
//! between rounds, and a round keeps it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::Write,
    process::Command,
};

use crate::config::{Shape, MIN_RATE};

use crate::observe::kernel::Qdisc;
use crate::reconcile::overflow::{Change, Overflow};

use anyhow::{bail, Context, Result};
use lb_common::egress::{self as common, path, Egress, QUEUE_MAJOR, SHAPER_MAJOR};

/// `TC_H_ROOT`: the parent of a root qdisc.
pub const ROOT: u32 = 0xffff_ffff;
/// `TC_H_INGRESS`: the parent of an `ingress` (or `clsact`) qdisc.
pub const INGRESS_PARENT: u32 = 0xffff_fff1;

/// The way out of one device, and why, for the data plane and `lbctl
/// status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `None`: the XDP path.
    pub egress: Option<Egress>,
    pub why: String,
}

impl Choice {
    pub fn path(&self) -> &'static str {
        match self.egress {
            Some(e) if e.path == path::QDISC => "qdisc",
            _ => "xdp",
        }
    }
}

/// The root qdisc of `ifindex`, if it has one.
fn root(qdiscs: &[Qdisc], ifindex: u32) -> Option<&Qdisc> {
    qdiscs
        .iter()
        .find(|q| q.ifindex == ifindex && q.parent == ROOT)
}

/// Whether a root qdisc queues or shapes by someone's choice: the kernel's
/// defaults (handle 0: `pfifo_fast`, `mq`, `fq_codel` as default_qdisc)
/// and `noqueue` do not count.
fn counts(q: &Qdisc) -> bool {
    q.handle != 0 && q.kind != "noqueue"
}

/// What lb reads of a qdisc.
impl Qdisc {
    fn handle_text(&self) -> String {
        format!("{:x}:", self.handle >> 16)
    }

    /// lb's shaper: an HTB with handle `1b:`.
    fn is_lbs(&self) -> bool {
        self.kind == "htb" && self.handle >> 16 == SHAPER_MAJOR
    }

    /// lb's queue (handle `1c:`), given to a device whose ring overflowed.
    fn is_lbq(&self) -> bool {
        self.handle >> 16 == QUEUE_MAJOR
    }
}

/// The kind of lb's queue when the system names none a device can take
/// alone: the kernel's own default FIFO for a real device.
const QUEUE_KIND: &str = "pfifo_fast";

/// Where the system says which qdisc a real device gets.
const DEFAULT_QDISC: &str = "/proc/sys/net/core/default_qdisc";

/// The kind of lb's queue, from `net.core.default_qdisc` (`default`): what
/// the operator's NICs get (`fq_codel` where systemd sets it, as on
/// Debian), so that a device handed to lb's queue queues as they do, with
/// their AQM; [`QUEUE_KIND`] for `noqueue` or a name that is not one.
fn queue_kind(default: &str) -> &str {
    let name = default.trim();
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain && name != "noqueue" {
        name
    } else {
        QUEUE_KIND
    }
}

/// Whether `ifindex` has no queue of its own (`noqueue`, a veth's and a
/// bridge's default): a packet handed to it meets a full device with
/// nothing to wait in.
fn queueless(qdiscs: &[Qdisc], ifindex: u32) -> bool {
    root(qdiscs, ifindex).is_none_or(|q| q.kind == "noqueue")
}

/// How packets leave through `ifindex` (an uplink, or a LAN port that is
/// not a bridge's).
pub fn decide(qdiscs: &[Qdisc], ifindex: u32) -> Choice {
    match root(qdiscs, ifindex) {
        None => xdp("no qdisc"),
        Some(q) if q.is_lbs() => through(q, 0, "lb's shaper"),
        Some(q) if q.is_lbq() => xdp(&format!(
            "lb's queue ({} {}) holds lb's packets only while its ring overflows",
            q.kind,
            q.handle_text()
        )),
        Some(q) if counts(q) => through(q, 0, "its qdisc"),
        Some(q) if q.handle == 0 => xdp(&format!(
            "the kernel's default qdisc ({}) does not shape",
            q.kind
        )),
        Some(q) => xdp(&format!("{} does not queue", q.kind)),
    }
}

/// How replies leave through LAN port `port` of bridge `bridge`: through
/// the bridge's qdisc when it has one that counts (lb's download shaper
/// lives there, so that all ports share one rate per uplink), else as for
/// the port alone.
pub fn decide_port(qdiscs: &[Qdisc], port: u32, bridge: u32) -> Choice {
    match root(qdiscs, bridge) {
        Some(q) if q.is_lbs() => through(q, bridge, "lb's shaper on its bridge"),
        Some(q) if counts(q) => through(q, bridge, "its bridge's qdisc"),
        _ => decide(qdiscs, port),
    }
}

/// How packets leave through L3 uplink `ifindex` (a tunnel, a raw-IP
/// modem): always by its qdisc, whatever it is, since `XDP_REDIRECT`
/// cannot reach a device without `ndo_xdp_xmit`; lb's tc program sends
/// them on without their Ethernet header.
pub fn decide_l3(qdiscs: &[Qdisc], ifindex: u32) -> Choice {
    match root(qdiscs, ifindex) {
        Some(q) if q.is_lbs() => through(q, 0, "lb's shaper, on an L3 device"),
        _ => Choice {
            egress: Some(Egress {
                path: path::QDISC,
                shaper_major: 0,
                ifindex: 0,
            }),
            why: "an L3 device: no XDP into it, its IP packets go by its qdisc".into(),
        },
    }
}

/// How packets leave through a device whose driver takes no frames
/// redirected by XDP (no `ndo_xdp_xmit`: a Wi-Fi radio, a DSA switch
/// port, a veth whose peer has neither GRO nor an XDP program): always by
/// a qdisc, its bridge's or its own, whatever it is; lb's tc program sends
/// them on.
pub fn decide_unredirectable(qdiscs: &[Qdisc], ifindex: u32, bridge: Option<u32>) -> Choice {
    let choice = match bridge {
        Some(bridge) => decide_port(qdiscs, ifindex, bridge),
        None => decide(qdiscs, ifindex),
    };
    if choice.egress.is_some() {
        return choice;
    }
    Choice {
        egress: Some(Egress {
            path: path::QDISC,
            shaper_major: 0,
            ifindex: 0,
        }),
        why: "its driver takes no frames redirected by XDP (no ndo_xdp_xmit)".into(),
    }
}

fn xdp(why: &str) -> Choice {
    Choice {
        egress: None,
        why: why.to_owned(),
    }
}

fn through(q: &Qdisc, via: u32, whose: &str) -> Choice {
    Choice {
        egress: Some(Egress {
            path: path::QDISC,
            shaper_major: if q.is_lbs() { SHAPER_MAJOR } else { 0 },
            ifindex: via,
        }),
        why: format!("{whose} ({} {})", q.kind, q.handle_text()),
    }
}

/// An ingress shaper on an uplink (SQM's: an `ingress` qdisc that sends
/// arrivals through an IFB) that lb cannot honour: XDP takes replies before
/// it. The refusal's text, naming the way out.
pub fn ingress_shaper(qdiscs: &[Qdisc], ifindex: u32, uplink: &str, iface: &str) -> Option<String> {
    qdiscs
        .iter()
        .find(|q| q.ifindex == ifindex && q.parent == INGRESS_PARENT && q.kind == "ingress")
        .map(|q| {
            format!(
                "uplink {uplink}: {iface} has an ingress qdisc ({}), as an ingress shaper \
                 through an IFB (SQM) sets up; lb forwards replies before it, so it would \
                 shape nothing. Shape downloads with `[uplink.shape] download = \"...\"` \
                 instead, or remove it: tc qdisc del dev {iface} ingress",
                q.handle_text()
            )
        })
}

/// The rate of a shaper's default class on a LAN device: traffic that is
/// not lb's (bridged between ports, the router's own) is not limited.
const UNLIMITED: u64 = 10_000_000_000;

/// How long a leaf's queue may hold at its uplink's rate, when the kernel
/// has no fq_codel: what bounds latency under load.
const LEAF_QUEUE_MS: u64 = 20;

/// HTB's quantum for every class, in bytes: one full frame, so that busy
/// leaves take turns frame by frame (and tc does not warn about r2q).
const QUANTUM: u32 = 1514;

/// The smallest FIFO leaf, in bytes: two GSO super-packets.
const MIN_FIFO: u64 = 2 * 65_536;

/// Leaf qdiscs' handle majors: this plus their class's minor.
const LEAF_HANDLE_BASE: u32 = 0x1000;

/// What lb's shaper on one device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaper {
    pub device: String,
    /// Rate of the default class (`1b:1`): the uplink's own rate on an
    /// uplink (its own traffic shares it), unlimited on a LAN device.
    pub default_rate: u64,
    /// Under the default class's parent: on an uplink, `Some(uplink)`.
    pub on_uplink: Option<u32>,
    /// `(uplink index, rate)` per shaped uplink.
    pub classes: Vec<(u32, u64)>,
}

/// The kind of leaf qdisc: fq_codel where the kernel has it (flow
/// fairness and AQM inside each client's leaf), else a byte FIFO sized to
/// [`LEAF_QUEUE_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    FqCodel,
    Fifo,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Leaf::FqCodel => "fq_codel",
            Leaf::Fifo => "bfifo",
        })
    }
}

impl Shaper {
    /// The `tc -batch` lines that build it from nothing (or rebuild it in
    /// place: every line replaces).
    ///
    /// On an uplink: root `1b:` → uplink class `1b:1X` at the upload rate →
    /// the default leaf `1b:1` (the router's own traffic) and 16 client
    /// leaves. On a LAN device: root → `1b:1` unlimited, and per shaped
    /// uplink its class at the download rate with 16 client leaves. Leaves
    /// share their class's rate equally while busy and borrow up to all of
    /// it alone: fairness per client.
    pub fn batch(&self, leaf: Leaf) -> String {
        self.root() + &self.classes(leaf)
    }

    /// The minors of every class it has.
    pub fn minors(&self) -> Vec<u32> {
        let mut out = vec![common::DEFAULT_MINOR];
        let with_leaves = |u: u32| {
            std::iter::once(common::uplink_minor(u))
                .chain((0..common::LEAVES).map(move |i| common::leaf_minor(u, i)))
        };
        if let Some(u) = self.on_uplink {
            out.extend(with_leaves(u));
        }
        for &(u, _) in &self.classes {
            out.extend(with_leaves(u));
        }
        out
    }

    /// The root line alone (HTB cannot "change" a root in place: a rebuild
    /// over lb's own root leaves it and replaces the rest).
    pub fn root(&self) -> String {
        format!(
            "qdisc replace dev {} root handle {SHAPER_MAJOR:x}: htb default {:x}\n",
            self.device,
            common::DEFAULT_MINOR
        )
    }

    /// Everything under the root.
    pub fn classes(&self, leaf: Leaf) -> String {
        let d = &self.device;
        let major = format!("{SHAPER_MAJOR:x}");
        let mut out = String::new();
        let class = |out: &mut String, parent: &str, minor: u32, rate: u64, ceil: u64| {
            out.push_str(&format!(
                "class replace dev {d} parent {parent} classid {major}:{minor:x} htb rate {rate}bit ceil {ceil}bit quantum {QUANTUM}\n"
            ));
        };
        let leaf_qdisc = |out: &mut String, minor: u32, rate: u64| {
            let opts = match leaf {
                Leaf::FqCodel => String::new(),
                // Room for one GSO super-packet (64 KiB) at least, or a
                // slow class would drop every one of them.
                Leaf::Fifo => format!(" limit {}", (rate / 8 * LEAF_QUEUE_MS / 1000).max(MIN_FIFO)),
            };
            // An explicit handle, so that a rebuild replaces the leaf
            // whatever is there (tc cannot "change" one kind into another).
            out.push_str(&format!(
                "qdisc replace dev {d} parent {major}:{minor:x} handle {:x}: {leaf}{opts}\n",
                LEAF_HANDLE_BASE + minor
            ));
        };
        let share = |rate: u64, n: u64| (rate / n).max(MIN_RATE / 8);
        let leaves = u64::from(common::LEAVES);
        match self.on_uplink {
            Some(u) => {
                let minor = common::uplink_minor(u);
                class(
                    &mut out,
                    &format!("{major}:"),
                    minor,
                    self.default_rate,
                    self.default_rate,
                );
                let parent = format!("{major}:{minor:x}");
                let each = share(self.default_rate, leaves + 1);
                class(
                    &mut out,
                    &parent,
                    common::DEFAULT_MINOR,
                    each,
                    self.default_rate,
                );
                leaf_qdisc(&mut out, common::DEFAULT_MINOR, self.default_rate);
                for i in 0..common::LEAVES {
                    let m = common::leaf_minor(u, i);
                    class(&mut out, &parent, m, each, self.default_rate);
                    leaf_qdisc(&mut out, m, self.default_rate);
                }
            }
            None => {
                class(
                    &mut out,
                    &format!("{major}:"),
                    common::DEFAULT_MINOR,
                    self.default_rate,
                    self.default_rate,
                );
                leaf_qdisc(&mut out, common::DEFAULT_MINOR, self.default_rate);
            }
        }
        for &(u, rate) in &self.classes {
            let minor = common::uplink_minor(u);
            class(&mut out, &format!("{major}:"), minor, rate, rate);
            let parent = format!("{major}:{minor:x}");
            for i in 0..common::LEAVES {
                let m = common::leaf_minor(u, i);
                class(&mut out, &parent, m, share(rate, leaves), rate);
                leaf_qdisc(&mut out, m, rate);
            }
        }
        out
    }
}

/// lb's shapers as the configuration wants them: one on each uplink with
/// an upload rate; one on each LAN interface (the bridge itself, so that
/// its ports share one rate per uplink) when any uplink has a download
/// rate. `uplinks` is `(index, interface, shape)`.
pub fn wanted(uplinks: &[(u32, &str, Shape)], lans: &[&str]) -> Vec<Shaper> {
    let mut out: Vec<Shaper> = uplinks
        .iter()
        .filter_map(|&(u, iface, shape)| {
            shape.upload.map(|rate| Shaper {
                device: iface.to_owned(),
                default_rate: rate,
                on_uplink: Some(u),
                classes: Vec::new(),
            })
        })
        .collect();
    let downloads: Vec<(u32, u64)> = uplinks
        .iter()
        .filter_map(|&(u, _, shape)| shape.download.map(|rate| (u, rate)))
        .collect();
    if !downloads.is_empty() {
        out.extend(lans.iter().map(|lan| Shaper {
            device: (*lan).to_owned(),
            default_rate: UNLIMITED,
            on_uplink: None,
            classes: downloads.clone(),
        }));
    }
    out
}

/// Build (or rebuild) `shaper` with `tc -batch`, with `leaf` leaves; when
/// there is no telling yet, fq_codel first, and FIFO if this kernel has no
/// fq_codel. Says which it used.
pub fn apply(shaper: &Shaper, leaf: Option<Leaf>, root_is_lbs: bool) -> Result<Leaf> {
    let what = || format!("setting up lb's shaper on {}", shaper.device);
    if !root_is_lbs {
        tc_batch(&shaper.root()).with_context(what)?;
    }
    let built = build_classes(shaper, leaf).and_then(|leaf| {
        remove_stale_classes(shaper)?;
        Ok(leaf)
    });
    if built.is_err() {
        // Not half a shaper: a root without its classes would send
        // everything through HTB's direct queue, unshaped, under lb's name,
        // and a rebuild in place stopped half-way would mix old rates with
        // new ones. Gone, and built from scratch once more when it was a
        // rebuild.
        let _ = tc_batch(&format!("qdisc del dev {} root\n", shaper.device));
        if root_is_lbs {
            return apply(shaper, leaf, false);
        }
    }
    built.with_context(what)
}

/// The classes and leaves, with `leaf` leaves, or when there is no telling
/// yet fq_codel, and FIFOs if this kernel has no fq_codel.
fn build_classes(shaper: &Shaper, leaf: Option<Leaf>) -> Result<Leaf> {
    if let Some(leaf) = leaf {
        tc_batch(&shaper.classes(leaf))?;
        return Ok(leaf);
    }
    match tc_batch(&shaper.classes(Leaf::FqCodel)) {
        Ok(()) => Ok(Leaf::FqCodel),
        Err(e) if format!("{e:#}").contains("kind is unknown") => {
            tc_batch(&shaper.classes(Leaf::Fifo))?;
            Ok(Leaf::Fifo)
        }
        Err(e) => Err(e),
    }
}

/// Delete the classes of lb's shaper on the device that `shaper` no longer
/// has (an uplink whose rate was removed by a reload, or by a configuration
/// changed while lbd was stopped): leaves first, their qdiscs with them.
fn remove_stale_classes(shaper: &Shaper) -> Result<()> {
    let out = Command::new("tc")
        .args(["class", "show", "dev", &shaper.device])
        .output()
        .context("running tc (is iproute2 installed?)")?;
    let wanted = shaper.minors();
    let prefix = format!("{SHAPER_MAJOR:x}:");
    let mut stale: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|id| id.strip_prefix(&prefix))
        .filter_map(|minor| u32::from_str_radix(minor, 16).ok())
        .filter(|minor| !wanted.contains(minor))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    stale.sort_unstable_by(|a, b| b.cmp(a));
    let lines: String = stale
        .iter()
        .map(|m| format!("class del dev {} classid {prefix}{m:x}\n", shaper.device))
        .collect();
    tc_batch(&lines)
}

/// Remove lb's shaper from `device`, if it is lb's (handle `1b:`): the
/// kernel's default qdisc comes back.
pub fn remove(device: &str, qdiscs: &[Qdisc], ifindex: u32) -> Result<()> {
    if root(qdiscs, ifindex).is_some_and(Qdisc::is_lbs) {
        tc_batch(&format!("qdisc del dev {device} root\n"))
            .with_context(|| format!("removing lb's shaper from {device}"))?;
    }
    Ok(())
}

/// Give `device` lb's queue (see [`QUEUE_MAJOR`]), of the system's
/// default kind ([`queue_kind`]), or [`QUEUE_KIND`] where the kernel
/// refuses that one; returns the kind it took.
fn add_queue(device: &str) -> Result<String> {
    let default = std::fs::read_to_string(DEFAULT_QDISC).unwrap_or_default();
    let add = |kind: &str| {
        tc_batch(&format!(
            "qdisc replace dev {device} root handle {QUEUE_MAJOR:x}: {kind}\n"
        ))
        .with_context(|| format!("giving {device} lb's queue ({kind} {QUEUE_MAJOR:x}:)"))
    };
    let kind = queue_kind(&default);
    match add(kind) {
        Ok(()) => Ok(kind.to_owned()),
        Err(e) if kind != QUEUE_KIND => {
            log::warn!("{e:#}; {QUEUE_KIND} instead");
            add(QUEUE_KIND).map(|()| QUEUE_KIND.to_owned())
        }
        Err(e) => Err(e),
    }
}

/// Remove lb's queue from `device`, if it has it: its default (`noqueue`)
/// comes back. For `lbd --teardown`.
pub fn remove_queue(device: &str, qdiscs: &[Qdisc], ifindex: u32) -> Result<()> {
    if root(qdiscs, ifindex).is_some_and(Qdisc::is_lbq) {
        tc_batch(&format!("qdisc del dev {device} root\n"))
            .with_context(|| format!("removing lb's queue from {device}"))?;
    }
    Ok(())
}

/// Whether `ifindex` has lb's shaper now.
pub fn has_lbs(qdiscs: &[Qdisc], ifindex: u32) -> bool {
    root(qdiscs, ifindex).is_some_and(Qdisc::is_lbs)
}

/// Someone else's root qdisc on `ifindex` (lb leaves it alone), if any.
pub fn foreign_root(qdiscs: &[Qdisc], ifindex: u32) -> Option<String> {
    root(qdiscs, ifindex)
        .filter(|q| counts(q) && !q.is_lbs())
        .map(|q| format!("{} {}", q.kind, q.handle_text()))
}

/// A device lb's packets leave by: an uplink, or a LAN port (with its
/// bridge, if it is a bridge's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    pub name: String,
    pub bridge: Option<u32>,
    /// An L3 uplink (no Ethernet header): XDP cannot send into it.
    pub l3: bool,
    /// Its driver takes no frames redirected by XDP (`observe::xdpcaps`):
    /// lb's packets reach it by its qdisc only.
    pub no_redirect: bool,
}

/// What lbd owns of egress, between two reconciles: the `EGRESS` map as
/// written, the shapers as built, and each device's choice for status.
#[derive(Debug, Default)]
pub struct Owned {
    written: BTreeMap<u32, Egress>,
    pub choices: BTreeMap<String, Choice>,
    built: BTreeMap<String, (Shaper, Leaf)>,
    /// Shapers that tc refused, as they were: not tried again until they
    /// change (a reload) or the device's qdiscs do.
    failed: BTreeMap<String, (Shaper, Vec<Qdisc>)>,
    /// The leaf kind this kernel takes, once known.
    leaf: Option<Leaf>,
    warned: BTreeSet<String>,
    /// Each device's way out as its qdiscs decide it (name, choice), by
    /// ifindex, as of the last round: what an overflow overrides and
    /// gives back.
    base: BTreeMap<u32, (String, Choice)>,
    /// Why lb's tc program is missing, if it is (nothing can be handed
    /// off then), as of the last round.
    no_handoff: Option<String>,
    /// How each device's ring fares (see `overflow`).
    overflow: Overflow,
    /// The devices without a queue of their own, as of the last round:
    /// one that overflows gets lb's queue before its hand-off.
    queueless: BTreeSet<u32>,
    /// The devices whose ring the data plane watches, as last told.
    watched: Vec<u32>,
}

impl Owned {
    /// Converge lb's shapers towards `shapers` (running tc; never on a
    /// device with someone else's qdisc, and removing lb's from `managed`
    /// devices that should have none), then choose each device's way out.
    /// Returns the `EGRESS` writes to make (`None`: remove). `ifindex_of`
    /// names devices. With `no_handoff` (why lb's tc program is missing),
    /// every device takes the XDP path: a hand-off would find nobody.
    pub fn converge(
        &mut self,
        qdiscs: &[Qdisc],
        devices: &[Device],
        shapers: &[Shaper],
        managed: &[&str],
        no_handoff: Option<&str>,
        ifindex_of: impl Fn(&str) -> Option<u32>,
    ) -> Vec<(u32, Option<Egress>)> {
        for shaper in shapers {
            let Some(ifindex) = ifindex_of(&shaper.device) else {
                continue;
            };
            if let Some(theirs) = foreign_root(qdiscs, ifindex) {
                if self.warned.insert(shaper.device.clone()) {
                    log::warn!(
                        "{}: not shaping it: it has a qdisc lbd did not make ({theirs}), which lb honours instead; remove it (tc qdisc del dev {} root) for lb's [uplink.shape] to apply",
                        shaper.device, shaper.device
                    );
                }
                continue;
            }
            self.warned.remove(&shaper.device);
            let built = self.built.get(&shaper.device).map(|(s, _)| s);
            if has_lbs(qdiscs, ifindex) && built == Some(shaper) {
                continue;
            }
            let on_device: Vec<Qdisc> = qdiscs
                .iter()
                .filter(|q| q.ifindex == ifindex)
                .cloned()
                .collect();
            if self.failed.get(&shaper.device) == Some(&(shaper.clone(), on_device.clone())) {
                continue;
            }
            match apply(shaper, self.leaf, has_lbs(qdiscs, ifindex)) {
                Ok(leaf) => {
                    log::info!(
                        "{}: lb's shaper in place (htb 1b:, {leaf} leaves)",
                        shaper.device
                    );
                    self.leaf = Some(leaf);
                    self.failed.remove(&shaper.device);
                    self.built
                        .insert(shaper.device.clone(), (shaper.clone(), leaf));
                }
                Err(e) => {
                    log::error!("{e:#}; not tried again until its configuration or qdiscs change");
                    self.failed
                        .insert(shaper.device.clone(), (shaper.clone(), on_device));
                }
            }
        }
        for &device in managed {
            if shapers.iter().any(|s| s.device == device) {
                continue;
            }
            self.built.remove(device);
            if let Some(ifindex) = ifindex_of(device) {
                match remove(device, qdiscs, ifindex) {
                    Ok(()) => {}
                    Err(e) => log::error!("{e:#}"),
                }
            }
        }

        let mut writes = Vec::new();
        let mut seen = BTreeSet::new();
        self.no_handoff = no_handoff.map(str::to_owned);
        self.base.clear();
        for d in devices {
            let choice = match (no_handoff, d.bridge) {
                (Some(why), _) => xdp(&format!("lb's tc program is missing ({why})")),
                (None, None) if d.l3 => decide_l3(qdiscs, d.ifindex),
                (None, bridge) if d.no_redirect => decide_unredirectable(qdiscs, d.ifindex, bridge),
                (None, Some(bridge)) => decide_port(qdiscs, d.ifindex, bridge),
                (None, None) => decide(qdiscs, d.ifindex),
            };
            seen.insert(d.ifindex);
            if queueless(qdiscs, d.ifindex) {
                self.queueless.insert(d.ifindex);
            } else {
                self.queueless.remove(&d.ifindex);
            }
            self.base.insert(d.ifindex, (d.name.clone(), choice));
            writes.extend(self.choose(d.ifindex));
        }
        let ifindexes: Vec<u32> = seen.iter().copied().collect();
        self.overflow.track(&ifindexes);
        self.queueless.retain(|i| seen.contains(i));
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|i| !seen.contains(i))
            .copied()
            .collect();
        for ifindex in gone {
            self.written.remove(&ifindex);
            writes.push((ifindex, None));
        }
        self.choices
            .retain(|name, _| devices.iter().any(|d| &d.name == name));
        writes
    }

    /// Whether `what` is said for the first time (until `unsay`).
    pub fn say_once(&mut self, what: &str) -> bool {
        self.warned.insert(what.to_owned())
    }

    pub fn unsay(&mut self, what: &str) {
        self.warned.remove(what);
    }

    /// Take what the data plane's `EGRESS` map holds as what was written:
    /// at start (a pinned map from an earlier lbd), and after a failed
    /// write, so that the next convergence mends exactly what differs.
    pub fn seed(&mut self, entries: impl IntoIterator<Item = (u32, Egress)>) {
        self.written = entries.into_iter().collect();
    }

    /// Device `ifindex`'s way out now: its qdiscs' choice, or its queue
    /// while its ring overflows (when it would be XDP, and lb's tc program
    /// is there to hand off to). Written where it changed: the write for
    /// the data plane, if any.
    fn choose(&mut self, ifindex: u32) -> Option<(u32, Option<Egress>)> {
        let (name, base) = self.base.get(&ifindex)?.clone();
        let overflowing = self
            .overflow
            .queued(ifindex)
            .filter(|_| base.egress.is_none() && self.no_handoff.is_none());
        let choice = match overflowing {
            Some(why) => Choice {
                egress: Some(Egress {
                    path: path::QDISC,
                    shaper_major: 0,
                    ifindex: 0,
                }),
                why,
            },
            None => base,
        };
        let write = (self.written.get(&ifindex).copied() != choice.egress).then(|| {
            match choice.egress {
                Some(e) => self.written.insert(ifindex, e),
                None => self.written.remove(&ifindex),
            };
            (ifindex, choice.egress)
        });
        if self.choices.get(&name) != Some(&choice) {
            log::info!(
                "{name}: lb's packets leave by {}: {}",
                choice.path(),
                choice.why
            );
            self.choices.insert(name, choice);
        }
        write
    }

    /// The ring watch's count for device `ifindex` (frames `XDP_REDIRECT`
    /// lost to its full ring), read at `now`: the device takes its queue
    /// when its ring overflowed, and XDP again when its hold is over. The
    /// write for the data plane, if its way out changed.
    pub fn ring_reading(
        &mut self,
        ifindex: u32,
        count: u64,
        now: std::time::Instant,
    ) -> Option<(u32, Option<Egress>)> {
        let change = self.overflow.observe(ifindex, count, now)?;
        if matches!(change, Change::Queue { .. }) && self.queueless.remove(&ifindex) {
            // A hand-off into a device with no queue would meet the same
            // full ring with nothing to wait in.
            if let Some((name, _)) = self.base.get(&ifindex) {
                match add_queue(name) {
                    Ok(kind) => log::info!(
                        "{name}: given lb's queue ({kind} {QUEUE_MAJOR:x}:), for its ring overflows"
                    ),
                    Err(e) => log::warn!("{e:#}; its hand-off has no queue to wait in"),
                }
            }
        }
        self.choose(ifindex)
    }

    /// Whether device `ifindex`'s ring watch count says frames were lost
    /// since the last reading.
    pub fn ring_rose(&self, ifindex: u32, count: u64) -> bool {
        self.overflow.rose(ifindex, count)
    }

    /// Device `ifindex`'s count read at `now` while it has no carrier: no
    /// full ring, its path stays (see `Overflow::lost_while_down`). What it
    /// lost since last said, when it is time to say it.
    pub fn ring_lost_while_down(
        &mut self,
        ifindex: u32,
        count: u64,
        now: std::time::Instant,
    ) -> Option<u64> {
        self.overflow.lost_while_down(ifindex, count, now)
    }

    /// The name of device `ifindex`, as lb sends to it.
    pub fn ring_device_name(&self, ifindex: u32) -> Option<&str> {
        self.base.get(&ifindex).map(|(name, _)| name.as_str())
    }

    /// The devices lb sends to, when they changed since last asked: the
    /// data plane's ring watch is to count for these.
    pub fn rings_to_watch(&mut self) -> Option<Vec<u32>> {
        let now = self.overflow.devices();
        (now != self.watched).then(|| {
            self.watched = now.clone();
            now
        })
    }

    /// The devices lb sends to, whose rings are watched.
    pub fn ring_devices(&self) -> Vec<u32> {
        self.overflow.devices()
    }

    /// Frames `XDP_REDIRECT` lost to `device`'s full ring, as last read.
    pub fn ring_drops(&self, device: &str) -> Option<u64> {
        let (&ifindex, _) = self.base.iter().find(|(_, (name, _))| name == device)?;
        self.overflow.count(ifindex)
    }

    /// Forget the ring watch's entries as told (the data plane lost them):
    /// they are made again.
    pub fn rewatch(&mut self) {
        self.watched.clear();
    }
}

fn tc_batch(lines: &str) -> Result<()> {
    let mut child = Command::new("tc")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running tc (is iproute2 installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.as_bytes()).context("writing to tc")?;
    }
    let out = child.wait_with_output().context("waiting for tc")?;
    if !out.status.success() {
        bail!("tc failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;

    fn q(ifindex: u32, handle: u32, parent: u32, kind: &str) -> Qdisc {
        Qdisc {
            ifindex,
            handle,
            parent,
            kind: kind.into(),
        }
    }

    #[test]
    fn only_a_qdisc_someone_chose_is_honoured() {
        let qdiscs = [
            q(2, 0, ROOT, "noqueue"),
            q(3, 0, ROOT, "pfifo_fast"),
            q(4, 0, ROOT, "mq"),
            q(5, 0x8001_0000, ROOT, "tbf"),
            q(6, 0x1b_0000, ROOT, "htb"),
            q(7, 0x1_0000, ROOT, "htb"),
        ];
        assert_eq!(decide(&qdiscs, 1).path(), "xdp");
        assert_eq!(decide(&qdiscs, 2).path(), "xdp");
        assert_eq!(decide(&qdiscs, 3).path(), "xdp");
        assert!(decide(&qdiscs, 3).why.contains("pfifo_fast"));
        assert_eq!(decide(&qdiscs, 4).path(), "xdp");
        let tbf = decide(&qdiscs, 5);
        assert_eq!(tbf.path(), "qdisc");
        assert_eq!(tbf.why, "its qdisc (tbf 8001:)");
        assert_eq!(tbf.egress.map(|e| e.shaper_major), Some(0));
        let ours = decide(&qdiscs, 6);
        assert_eq!(ours.egress.map(|e| e.shaper_major), Some(SHAPER_MAJOR));
        // Another HTB is the operator's: honoured, never classified by lb.
        assert_eq!(decide(&qdiscs, 7).egress.map(|e| e.shaper_major), Some(0));
    }

    #[test]
    fn lbs_queue_leaves_the_xdp_path_and_marks_no_device_queueless() {
        let qdiscs = [
            q(2, QUEUE_MAJOR << 16, ROOT, QUEUE_KIND),
            q(3, 0, ROOT, "noqueue"),
        ];
        let c = decide(&qdiscs, 2);
        assert_eq!(c.path(), "xdp");
        assert!(c.why.contains("lb's queue"), "{}", c.why);
        assert!(!queueless(&qdiscs, 2));
        assert!(queueless(&qdiscs, 3));
        assert!(queueless(&qdiscs, 4), "no qdisc at all");
    }

    #[test]
    fn lbs_queue_is_of_the_systems_default_kind_when_that_is_one() {
        assert_eq!(queue_kind("fq_codel\n"), "fq_codel");
        assert_eq!(queue_kind("pfifo_fast\n"), "pfifo_fast");
        assert_eq!(queue_kind("noqueue\n"), QUEUE_KIND);
        assert_eq!(queue_kind(""), QUEUE_KIND, "unreadable");
        assert_eq!(queue_kind("fq\nqdisc del dev eth0 root"), QUEUE_KIND);
        assert_eq!(queue_kind("fq codel"), QUEUE_KIND);
    }

    #[test]
    fn an_l3_device_is_always_sent_to_through_its_qdisc() {
        let none: Vec<Qdisc> = Vec::new();
        assert_eq!(decide_l3(&none, 7).path(), "qdisc");
        assert_eq!(decide_l3(&none, 7).egress.map(|e| e.shaper_major), Some(0));
        let lbs = vec![q(7, SHAPER_MAJOR << 16, u32::MAX, "htb")];
        assert_eq!(
            decide_l3(&lbs, 7).egress.map(|e| e.shaper_major),
            Some(SHAPER_MAJOR)
        );
    }

    #[test]
    fn a_device_without_xdp_redirects_is_always_sent_to_through_a_qdisc() {
        let none: Vec<Qdisc> = Vec::new();
        let c = decide_unredirectable(&none, 7, None);
        assert_eq!(c.path(), "qdisc");
        assert!(c.why.contains("ndo_xdp_xmit"), "{}", c.why);
        // A qdisc of its own, or its bridge's shaper, is still the one used.
        let tbf = vec![q(7, 0x8001_0000, ROOT, "tbf")];
        assert!(decide_unredirectable(&tbf, 7, None).why.contains("tbf"));
        let bridged = vec![q(10, SHAPER_MAJOR << 16, ROOT, "htb")];
        assert_eq!(
            decide_unredirectable(&bridged, 7, Some(10))
                .egress
                .map(|e| e.ifindex),
            Some(10)
        );
        // lb's own queue, or the kernel's default: by the port itself.
        let default = vec![q(7, 0, ROOT, "pfifo_fast")];
        assert_eq!(decide_unredirectable(&default, 7, Some(10)).path(), "qdisc");
    }

    #[test]
    fn a_bridge_with_a_qdisc_takes_its_ports_replies() {
        let qdiscs = [
            q(10, 0x1b_0000, ROOT, "htb"),
            q(11, 0x8001_0000, ROOT, "tbf"),
        ];
        let c = decide_port(&qdiscs, 11, 10);
        assert_eq!(
            c.egress.map(|e| (e.ifindex, e.shaper_major)),
            Some((10, SHAPER_MAJOR))
        );
        // Without one on the bridge, the port's own counts.
        let c = decide_port(&qdiscs[1..], 11, 10);
        assert_eq!(c.egress.map(|e| (e.ifindex, e.shaper_major)), Some((0, 0)));
        assert_eq!(decide_port(&[], 11, 10).path(), "xdp");
    }

    #[test]
    fn an_ingress_shaper_on_an_uplink_is_refused_with_the_way_out() {
        let qdiscs = [
            q(3, 0xffff_0000, INGRESS_PARENT, "ingress"),
            q(4, 0, INGRESS_PARENT, "clsact"),
        ];
        let says = ingress_shaper(&qdiscs, 3, "isp1", "wan1").unwrap_or_default();
        assert!(says.contains("wan1 has an ingress qdisc (ffff:)"), "{says}");
        assert!(says.contains("[uplink.shape] download"), "{says}");
        assert!(says.contains("tc qdisc del dev wan1 ingress"), "{says}");
        assert_eq!(ingress_shaper(&qdiscs, 4, "isp2", "wan2"), None);
    }

    #[test]
    fn rates_are_bits_with_a_unit() {
        assert_eq!(parse_rate("20mbit"), Ok(20_000_000));
        assert_eq!(parse_rate("500Kbit"), Ok(500_000));
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        for (bad, says) in [
            ("20", "has no unit"),
            ("20mbps", "bytes per second"),
            ("20 furlongs", "unknown unit"),
            ("fast", "expected a rate"),
            ("1kbit", "outside"),
            ("99999999999999999999gbit", "expected a rate"),
        ] {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_shapers_minors_are_the_classes_it_builds() {
        let s = Shaper {
            device: "br-lan".into(),
            default_rate: UNLIMITED,
            on_uplink: None,
            classes: vec![(0, 30_000_000), (2, 10_000_000)],
        };
        let mut built: Vec<u32> = s
            .batch(Leaf::Fifo)
            .lines()
            .filter_map(|l| l.split(" classid 1b:").nth(1))
            .filter_map(|rest| u32::from_str_radix(rest.split(' ').next()?, 16).ok())
            .collect();
        let mut minors = s.minors();
        built.sort_unstable();
        minors.sort_unstable();
        assert_eq!(built, minors);
        assert_eq!(minors.len(), 1 + 2 * 17);
        assert!(parse_rate("100kbps")
            .expect_err("bytes")
            .contains("\"800kbit\" is the same rate"));
    }

    #[test]
    fn shapers_are_where_the_rates_are() {
        let up = Shape {
            upload: Some(20_000_000),
            download: None,
        };
        let down = Shape {
            upload: None,
            download: Some(30_000_000),
        };
        let w = wanted(&[(0, "wan1", up), (1, "wan2", down)], &["br-lan"]);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].device, "wan1");
        assert_eq!(w[0].on_uplink, Some(0));
        assert_eq!(w[1].device, "br-lan");
        assert_eq!(w[1].classes, [(1, 30_000_000)]);
        assert!(wanted(&[(0, "wan1", Shape::default())], &["br-lan"]).is_empty());
    }

    #[test]
    fn a_shaper_is_an_htb_tree_with_a_leaf_per_client_bucket() {
        let s = Shaper {
            device: "wan2".into(),
            default_rate: 20_000_000,
            on_uplink: Some(1),
            classes: Vec::new(),
        };
        let batch = s.batch(Leaf::Fifo);
        assert!(batch.starts_with("qdisc replace dev wan2 root handle 1b: htb default 1\n"));
        assert!(batch.contains("class replace dev wan2 parent 1b: classid 1b:11 htb rate 20000000bit ceil 20000000bit quantum 1514\n"));
        // 16 client leaves and the default one, each with its FIFO.
        assert_eq!(batch.matches("parent 1b:11 classid").count(), 17);
        assert_eq!(batch.matches(" bfifo limit 131072\n").count(), 17);
        let lan = Shaper {
            device: "br-lan".into(),
            default_rate: UNLIMITED,
            on_uplink: None,
            classes: vec![(0, 30_000_000)],
        };
        let batch = lan.batch(Leaf::FqCodel);
        assert!(batch.contains("classid 1b:1 htb rate 10000000000bit"));
        assert!(batch.contains("classid 1b:10 htb rate 30000000bit ceil 30000000bit"));
        assert_eq!(batch.matches("parent 1b:10 classid").count(), 16);
        assert!(batch.contains("parent 1b:100 handle 1100: fq_codel\n"));
    }
}
