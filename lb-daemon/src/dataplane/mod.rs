//! The XDP data plane as user space sees it: loads the embedded object,
//! attaches the programs, and reads and writes the maps.
//!
//! This module owns every `aya` handle. It knows the map layouts
//! (`lb_common::maps`) but no policy: which uplink gets which buckets, or
//! when an uplink is down, is decided elsewhere and handed in here.

mod batch;
mod btf;
pub mod carry;
pub mod flows;
pub mod kfuncs;
pub mod pins;
pub mod ringwatch;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{
        lpm_trie::Key, Array, DevMap, DevMapHash, HashMap, IterableMap, LpmTrie, Map, MapData,
        PerCpuArray, ProgramArray, RingBuf,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        LinkOrder, RawTracePoint, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    egress::{Egress, RING_BINDING_GLOBAL, RING_TRACEPOINT},
    maps::{
        name, nat_entries, program, settings_flags, signals6, BucketTable, FragKey, FragValue,
        LanPort, PolicyStats, RouterMacs, Settings, Signals, Uplink6, UplinkInfo, UplinkStats,
        LAN6_SLOT, TOO_BIG6_SLOT, TOO_BIG_SLOT, UNREACHABLE6_SLOT,
    },
    policy::{
        port_index, Policy, PrefixKey, RuleBits, RuleTable, StickyKey, StickyKey6, StickyValue,
        TrieAddr, DEFAULT_POLICY, MAX_POLICIES,
    },
    reason,
    table::Table,
    MAX_UPLINKS, NO_UPLINK,
};

use crate::{config::FlowConfig, dataplane::flows::FlowTables, dataplane::pins::Pins};

/// The uplinks `table` gives new flows, as `Policy::takers` bits.
pub fn takers(table: &Table) -> u32 {
    table
        .iter()
        .filter(|&&u| u != NO_UPLINK && u < 32)
        .fold(0, |bits, &u| bits | 1 << u)
}

/// `BPF_NOEXIST`: an update that only creates.
const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: an update that only changes an entry still there.
const BPF_EXIST: u64 = 2;

/// The XDP object built by build.rs from lb-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
    /// Taken over from a pinned data plane, in the mode it had.
    Adopted,
}

/// An address family: each policy has a side for each (its bucket
/// tables, the uplinks that take its new flows), as an uplink's IPv6 may
/// be down while its IPv4 is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The maps of the family's policies: (entries, bucket tables).
    fn maps(self) -> (&'static str, &'static str) {
        match self {
            Family::V4 => (name::POLICIES, name::BUCKETS),
            Family::V6 => (name::POLICIES6, name::BUCKETS6),
        }
    }

    /// "" or "IPv6 ", for messages.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "IPv6 ",
        }
    }
}

/// An uplink's counters, all CPUs and both families together (see
/// [`Dataplane::uplink_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// Packets and bytes (whole frames) sent out of the uplink by XDP.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets and bytes arriving on the uplink.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Flows pinned to it (new, or moved here from a dead uplink).
    pub new_flows: u64,
    /// Flows moved away from it because it went down.
    pub moved_away: u64,
    /// New flows that found no free NAT port on it (dropped).
    pub nat_failures: u64,
    /// Replies translated back to a client.
    pub replies: u64,
}

pub struct Dataplane {
    ebpf: Ebpf,
    /// What each policy's `POLICIES` and `POLICIES6` entries say (their
    /// live bucket tables among them), as last written.
    policies: [[Policy; MAX_POLICIES as usize]; 2],
    settings: Settings,
    /// Where the maps and links are pinned, if they are.
    pins: Option<Pins>,
    /// The ring watch (see `ringwatch`): loaded (`Ok`), or why not.
    ring_watch: std::result::Result<bool, String>,
    /// Why a UDP datagram too big for its uplink without DF cannot be
    /// handed to the kernel with its flow's translation, if it cannot.
    no_hand_over: Option<String>,
}

impl Dataplane {
    /// Load the object and both programs into the kernel (not attached),
    /// with fresh maps.
    pub fn load(max_flows: u32) -> Result<Self> {
        Self::load_pinned(max_flows, None)
    }

    /// As [`Self::load`], with a NAT table of `nat` entries rather than
    /// [`nat_entries`]`(max_flows)` (the benchmark's: a table it fills
    /// faster than any collector would empty it).
    pub fn load_sized(max_flows: u32, nat: u32) -> Result<Self> {
        Self::load_with(max_flows, nat, None)
    }

    /// Load the object and both programs; with `pins`, onto the maps
    /// pinned there (created and pinned if absent).
    pub fn load_pinned(max_flows: u32, pins: Option<&Pins>) -> Result<Self> {
        Self::load_with(max_flows, nat_entries(max_flows), pins)
    }

    fn load_with(max_flows: u32, nat: u32, pins: Option<&Pins>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(name::FLOWS, max_flows)
            .map_max_entries(name::NAT_REV, nat)
            .map_max_entries(name::FLOWS6, max_flows);
        let paths: Vec<(&str, PathBuf)> = match pins {
            Some(p) => name::ALL.iter().map(|&m| (m, p.map(m))).collect(),
            None => Vec::new(),
        };
        for (map, path) in &paths {
            loader.map_pin_path(map, path.as_path());
        }
        // The ring watch reads the device where this kernel keeps it, in
        // lbd's namespace; unbound, it stays idle, and it is then neither
        // loaded nor attached.
        let binding = ringwatch::bind();
        let bound = binding.as_ref().copied().unwrap_or_default();
        loader.override_global(RING_BINDING_GLOBAL, &bound, true);
        let bound = crate::dataplane::kfuncs::bind(OBJECT)?;
        let lookup = ["bpf_xdp_ct_lookup", "bpf_ct_release"];
        if bound.absent.iter().any(|n| lookup.contains(n)) {
            log::warn!(
                "this kernel's BTF lacks {}: the fast path cannot ask conntrack, so replies of \
                 port forwards are taken for new flows (a kernel with CONFIG_NF_CONNTRACK=y and \
                 BTF has them)",
                bound.absent.join(" and ")
            );
        }
        if let Some(why) = &bound.no_hand_over {
            log::warn!(
                "{why}: a UDP datagram too big for its uplink without DF is fragmented and \
                 translated by the kernel's slow path, from another port than its flow's (Linux \
                 6.1 and later have what the fast path needs, with conntrack, its NAT and \
                 CONFIG_NF_CONNTRACK_MARK built in: lbd finds the kfuncs in vmlinux's BTF only)"
            );
        }
        let ebpf = loader
            .load(&bound.object)
            .context("loading the XDP object into the kernel failed (needs root, and a kernel with BPF and BTF)")?;
        let mut dp = Self {
            ebpf,
            policies: [[Policy::default(); MAX_POLICIES as usize]; 2],
            settings: Settings::default(),
            pins: pins.cloned(),
            ring_watch: binding.map(|_| false).map_err(|e| format!("{e:#}")),
            no_hand_over: bound.no_hand_over.clone(),
        };
        if let Some(pins) = pins {
            dp.copy_small_bypass6(pins)?;
        }
        for prog in [
            program::LAN_UNREACHABLE6,
            program::LAN_INGRESS6,
            program::LAN_TOO_BIG,
            program::LAN_TOO_BIG6,
            program::LAN_INGRESS,
            program::WAN_INGRESS,
        ] {
            dp.xdp(prog)?
                .load()
                .with_context(|| format!("the kernel's verifier refused program {prog}"))?;
        }
        dp.fill_tail_calls()?;
        for prog in [program::HANDOFF, program::WAN_INGRESS_L3] {
            dp.tc(prog)?
                .load()
                .with_context(|| format!("the kernel's verifier refused program {prog}"))?;
        }
        if dp.ring_watch.is_ok() {
            if let Err(e) = dp.raw_tp(program::RING_WATCH).and_then(|p| {
                p.load().with_context(|| {
                    format!(
                        "the kernel's verifier refused program {}",
                        program::RING_WATCH
                    )
                })
            }) {
                dp.ring_watch = Err(format!("{e:#}"));
            }
        }
        Ok(dp)
    }

    /// The prefixes of the IPv6 bypass trie that `Pins::prepare` left in
    /// `carry` (it had less room than this layout's), copied into this
    /// one's before `fill_tail_calls`: from then on the running `lan_ingress`
    /// tail-calls this data plane's `lan_ingress6`, which must not meet an
    /// empty trie. The old trie's pin goes once copied; what does not fit
    /// (nothing: the new trie is larger) the first round writes again.
    fn copy_small_bypass6(&mut self, pins: &Pins) -> Result<()> {
        let held = pins.carried(name::BYPASS6);
        if !held.exists() {
            return Ok(());
        }
        // One that cannot be read is let go rather than tried at every
        // start: the first round writes the trie (its prefixes are the
        // kernel's routes), and until then IPv6 is balanced without it.
        let read = MapData::from_pin(&held)
            .map_err(anyhow::Error::from)
            .and_then(|data| Map::from_map_data(data).map_err(anyhow::Error::from))
            .and_then(|m| {
                let old: LpmTrie<MapData, [u8; 16], u32> = LpmTrie::try_from(m)?;
                old.iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::from)
            });
        let entries = match read {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!(
                    "{}: not copied ({e:#}); the first round writes BYPASS6 again",
                    held.display()
                );
                Vec::new()
            }
        };
        let mut new = self.bypass6()?;
        for (key, value) in &entries {
            new.insert(key, *value, 0)
                .context("copying the carried BYPASS6")?;
        }
        std::fs::remove_file(&held).with_context(|| format!("unpinning {}", held.display()))?;
        if let Some(dir) = held.parent() {
            // Left to `Carry::finish` when flow tables wait beside it.
            let _ = std::fs::remove_dir(dir);
        }
        log::info!(
            "BYPASS6 made anew with room for more: {} prefixes copied from the one before",
            entries.len()
        );
        Ok(())
    }

    /// Put the programs `lan_ingress` and `lan_ingress6` tail-call into
    /// their program arrays (`LAN6`, `TOO_BIG`), before anything is
    /// attached. A pinned array held an earlier lbd's: the pinned
    /// `lan_ingress` it still runs now reaches this one's, of the same
    /// layout.
    fn fill_tail_calls(&mut self) -> Result<()> {
        // Callees first: a running caller (the pinned `lan_ingress` of an
        // earlier lbd, this one's `lan_ingress6` once in place) never
        // meets an empty slot of this layout's.
        for (map, slot, prog) in [
            (name::TOO_BIG, TOO_BIG_SLOT, program::LAN_TOO_BIG),
            (name::TOO_BIG, TOO_BIG6_SLOT, program::LAN_TOO_BIG6),
            (name::LAN6, UNREACHABLE6_SLOT, program::LAN_UNREACHABLE6),
            (name::LAN6, LAN6_SLOT, program::LAN_INGRESS6),
        ] {
            let fd = self.xdp(prog)?.fd()?.try_clone()?;
            let m = self
                .ebpf
                .map_mut(map)
                .with_context(|| format!("map {map} missing"))?;
            let mut slots = ProgramArray::try_from(m)
                .with_context(|| format!("map {map} has an unexpected type"))?;
            slots
                .set(slot, &fd, 0)
                .with_context(|| format!("putting {prog} into {map}"))?;
        }
        Ok(())
    }

    fn raw_tp(&mut self, prog: &str) -> Result<&mut RawTracePoint> {
        self.ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the XDP object"))?
            .try_into()
            .with_context(|| format!("program {prog} is not a raw tracepoint program"))
    }

    /// Attach the ring watch to its tracepoint (for as long as this data
    /// plane is loaded: it is lbd's eyes, not part of forwarding, and is
    /// not pinned). `Err` says why there is none: lb then forwards as
    /// before, every device on the path its qdiscs decide.
    pub fn attach_ring_watch(&mut self) -> std::result::Result<(), String> {
        match &self.ring_watch {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(why) => return Err(why.clone()),
        }
        let attached = self
            .raw_tp(program::RING_WATCH)
            .and_then(|p| Ok(p.attach(RING_TRACEPOINT)?))
            .with_context(|| format!("attaching the ring watch to tracepoint {RING_TRACEPOINT}"));
        self.ring_watch = attached.map(|_| true).map_err(|e| format!("{e:#}"));
        self.ring_watch.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The ring watch's wake-ups (see `lb_common::maps::name::RING_EVENTS`),
    /// for the one reader: `None` once taken, or without the watch.
    pub fn take_ring_events(&mut self) -> Option<RingBuf<MapData>> {
        if self.ring_watch != Ok(true) {
            return None;
        }
        let map = self.ebpf.take_map(name::RING_EVENTS)?;
        match RingBuf::try_from(map) {
            Ok(events) => Some(events),
            Err(e) => {
                log::warn!("the ring watch's wake-ups cannot be read ({e}): lbd looks every 100 ms instead");
                None
            }
        }
    }

    /// Whether the ring watch is attached (counting), or why not.
    /// Why a UDP datagram too big for its uplink without DF is not handed
    /// to the kernel with its flow's translation here, if it is not (see
    /// `kfuncs`).
    pub fn no_hand_over(&self) -> Option<&str> {
        self.no_hand_over.as_deref()
    }

    pub fn ring_watch(&self) -> std::result::Result<bool, &str> {
        self.ring_watch.as_ref().copied().map_err(String::as_str)
    }

    /// Let the ring watch count for exactly the devices `ifindexes` (the
    /// devices lb sends to): their `RING_DROPS` entries are made (a count
    /// kept from before is kept), others removed.
    pub fn watch_rings(&mut self, ifindexes: &[u32]) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(name::RING_DROPS)
            .context("map RING_DROPS missing")?;
        let mut map: HashMap<&mut MapData, u32, u64> =
            HashMap::try_from(m).context("map RING_DROPS has an unexpected type")?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !ifindexes.contains(i))
            .collect();
        for ifindex in stale {
            missing_is_fine(map.remove(&ifindex))
                .with_context(|| format!("removing ifindex {ifindex} from RING_DROPS"))?;
        }
        for &ifindex in ifindexes {
            match map.insert(ifindex, 0, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("adding ifindex {ifindex} to RING_DROPS"))
                }
            }
        }
        Ok(())
    }

    /// Frames `XDP_REDIRECT` lost to device `ifindex`'s full ring, as the
    /// ring watch counted them; `None` when it has no entry.
    pub fn ring_drops(&self, ifindex: u32) -> Result<Option<u64>> {
        let m = self
            .ebpf
            .map(name::RING_DROPS)
            .context("map RING_DROPS missing")?;
        let map: HashMap<&MapData, u32, u64> =
            HashMap::try_from(m).context("map RING_DROPS has an unexpected type")?;
        match map.get(&ifindex, 0) {
            Ok(n) => Ok(Some(n)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading RING_DROPS of ifindex {ifindex}")),
        }
    }

    /// Take over the state a pinned data plane holds: the classifier
    /// settings (its seed above all: flows keep hashing as before), and
    /// each policy's entries and live bucket tables, for each family.
    pub fn adopt(&mut self) -> Result<[Vec<Table>; 2]> {
        let settings = self
            .array::<Settings>(name::SETTINGS)?
            .get(&0, 0)
            .context("reading the pinned SETTINGS")?;
        self.settings = settings;
        let mut tables = [Vec::new(), Vec::new()];
        for family in [Family::V4, Family::V6] {
            let (policies, buckets) = family.maps();
            for p in 0..MAX_POLICIES {
                let policy = self
                    .array::<Policy>(policies)?
                    .get(&p, 0)
                    .with_context(|| format!("reading the pinned {policies}"))?;
                self.policies[family as usize][p as usize] = policy;
                let table = self
                    .array::<BucketTable>(buckets)?
                    .get(&policy.table_index(p), 0)
                    .with_context(|| format!("reading a pinned table of {buckets}"))?;
                tables[family as usize].push(table.uplinks);
            }
        }
        Ok(tables)
    }

    /// The pinned entry of uplink `index`, if it has one.
    pub fn pinned_uplink(&mut self, index: u32) -> Result<Option<UplinkInfo>> {
        let info = self
            .array::<UplinkInfo>(name::UPLINKS)?
            .get(&index, 0)
            .context("reading the pinned UPLINKS")?;
        Ok((info.ifindex != 0).then_some(info))
    }

    /// The classifier seed in use.
    pub fn seed(&self) -> u32 {
        self.settings.seed
    }

    /// The loaded program `name` (for attaching, and for test runs).
    pub fn xdp(&mut self, prog: &str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the XDP object"))?
            .try_into()
            .with_context(|| format!("program {prog} is not an XDP program"))
    }

    /// Attach program `prog` to `interface`: native mode if the driver has
    /// it, generic mode otherwise; with pins, the attachment is pinned and
    /// outlives lbd, and an attachment pinned by an earlier lbd is taken
    /// over (the new program swapped in atomically: not a packet missed).
    /// The link stays until [`Self::detach`] or the program goes.
    pub fn attach(&mut self, prog: &str, interface: &str) -> Result<(AttachMode, XdpLinkId)> {
        let pin = self.pins.as_ref().map(|p| p.link(prog, interface));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            match self.take_over(prog, pin) {
                Ok(link) => return Ok((AttachMode::Adopted, link)),
                Err(e) => {
                    // The interface it was on is gone (or another lbd's
                    // leftover): a fresh attachment replaces it.
                    log::info!("not taking over {}: {e:#}; attaching anew", pin.display());
                    let _ = PinnedLink::from_pin(pin).map(PinnedLink::unpin);
                }
            }
        }
        let xdp = self.xdp(prog)?;
        let (mode, link) = match xdp.attach(interface, XdpMode::Driver) {
            Ok(link) => (AttachMode::Native, link),
            Err(native) => match xdp.attach(interface, XdpMode::Skb) {
                Ok(link) => (AttachMode::Generic, link),
                // The kernel gives a device one XDP program (per mode, and
                // never one of each): someone else's holds the hook.
                Err(generic) if [&native, &generic].iter().any(|e| taken(e)) => {
                    anyhow::bail!(
                        "{interface} already carries another XDP program (a device takes \
                         one): remove it (`ip link show dev {interface}` shows it, `ip link set \
                         dev {interface} xdp off` removes one that `ip` attached) and lbd \
                         attaches {prog} on its next round"
                    )
                }
                Err(generic) => {
                    return Err(anyhow!(generic)).with_context(|| {
                        format!("attaching {prog} to {interface} failed in native mode ({native}) and in generic mode")
                    })
                }
            },
        };
        let Some(pin) = pin else {
            return Ok((mode, link));
        };
        // Pin it, then hand it back to the program, which owns its links.
        let xdp = self.xdp(prog)?;
        let fd: FdLink = xdp.take_link(link)?.try_into().with_context(|| {
            format!("{prog} on {interface} is not a bpf_link (kernel too old?)")
        })?;
        let pinned = fd
            .pin(&pin)
            .with_context(|| format!("pinning {prog} on {interface} at {}", pin.display()))?;
        let link = xdp.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?;
        Ok((mode, link))
    }

    /// Swap `prog` into the attachment pinned at `pin`.
    fn take_over(&mut self, prog: &str, pin: &Path) -> Result<XdpLinkId> {
        let pinned = PinnedLink::from_pin(pin).context("opening the pin")?;
        let link = XdpLink::try_from(FdLink::from(pinned)).context("not an XDP link")?;
        Ok(self.xdp(prog)?.attach_to_link(link)?)
    }

    /// Detach program `prog` from `interface`, where `link` attached it,
    /// pin and all. An interface that is gone took the attachment with it:
    /// fine too.
    pub fn detach(&mut self, prog: &str, interface: &str, link: XdpLinkId) -> Result<()> {
        if let Some(pins) = &self.pins {
            let _ = std::fs::remove_file(pins.link(prog, interface));
        }
        let xdp = self.xdp(prog)?;
        if let Err(e) = xdp.detach(link) {
            log::debug!("detaching {prog}: {e} (its interface may be gone)");
        }
        Ok(())
    }

    /// One of lb's tc programs: the hand-off ([`program::HANDOFF`]), or
    /// the reply path of L3 uplinks ([`program::WAN_INGRESS_L3`]).
    fn tc(&mut self, prog: &str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the XDP object"))?
            .try_into()
            .with_context(|| format!("program {prog} is not a tc program"))
    }

    /// Attach the hand-off program to `interface`'s tc ingress (TCX, first
    /// in line), beside an XDP program there: what XDP hands over arrives
    /// there. Pinned like the XDP attachments, and taken over the same way.
    pub fn attach_handoff(&mut self, interface: &str) -> Result<SchedClassifierLinkId> {
        self.attach_tc(program::HANDOFF, interface)
    }

    /// Attach tc program `prog` to `interface`'s tc ingress, first in line.
    pub fn attach_tc(&mut self, prog: &str, interface: &str) -> Result<SchedClassifierLinkId> {
        let pin = self.pins.as_ref().map(|p| p.link(prog, interface));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let taken = PinnedLink::from_pin(pin)
                .context("opening the pin")
                .and_then(|p| {
                    SchedClassifierLink::try_from(FdLink::from(p)).context("not a tc link")
                })
                .and_then(|link| Ok(self.tc(prog)?.attach_to_link(link)?));
            match taken {
                Ok(link) => return Ok(link),
                Err(e) => {
                    log::info!("not taking over {}: {e:#}; attaching anew", pin.display());
                    let _ = PinnedLink::from_pin(pin).map(PinnedLink::unpin);
                }
            }
        }
        let tc = self.tc(prog)?;
        let link = tc
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .with_context(|| {
                format!("attaching {prog} to the tc ingress of {interface} (needs TCX: Linux 6.6 or later)")
            })?;
        let Some(pin) = pin else {
            return Ok(link);
        };
        let fd: FdLink = tc.take_link(link)?.try_into()?;
        let pinned = fd
            .pin(&pin)
            .with_context(|| format!("pinning {prog} on {interface} at {}", pin.display()))?;
        Ok(tc.attach_to_link(SchedClassifierLink::try_from(FdLink::from(pinned))?)?)
    }

    /// Detach the hand-off program from `interface`, pin and all.
    pub fn detach_handoff(&mut self, interface: &str, link: SchedClassifierLinkId) -> Result<()> {
        self.detach_tc(program::HANDOFF, interface, link)
    }

    /// Detach tc program `prog` from `interface`, pin and all.
    pub fn detach_tc(
        &mut self,
        prog: &str,
        interface: &str,
        link: SchedClassifierLinkId,
    ) -> Result<()> {
        if let Some(pins) = &self.pins {
            let _ = std::fs::remove_file(pins.link(prog, interface));
        }
        if let Err(e) = self.tc(prog)?.detach(link) {
            log::debug!("detaching {prog}: {e} (its interface may be gone)");
        }
        Ok(())
    }

    /// How packets leave device `ifindex` (`None`: the XDP path).
    pub fn set_egress(&mut self, ifindex: u32, egress: Option<Egress>) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(name::EGRESS)
            .context("map EGRESS missing")?;
        let mut map: HashMap<&mut MapData, u32, Egress> =
            HashMap::try_from(m).context("map EGRESS has an unexpected type")?;
        match egress {
            Some(e) => map
                .insert(ifindex, e, 0)
                .with_context(|| format!("writing the egress path of ifindex {ifindex}"))?,
            None => missing_is_fine(map.remove(&ifindex))
                .with_context(|| format!("removing the egress path of ifindex {ifindex}"))?,
        }
        let entries = map.keys().filter(Result::is_ok).count() as u32;
        self.array::<u32>(name::EGRESS_ANY)?
            .set(0, entries, 0)
            .context("writing EGRESS_ANY")?;
        if ifindex < lb_common::IFINDEX_SLOTS {
            self.array::<Egress>(name::EGRESS_AT)?
                .set(ifindex, egress.unwrap_or_default(), 0)
                .with_context(|| format!("writing EGRESS_AT[{ifindex}]"))?;
        }
        Ok(())
    }

    /// What the `EGRESS` map holds now.
    pub fn egress_entries(&self) -> Result<Vec<(u32, Egress)>> {
        let m = self.ebpf.map(name::EGRESS).context("map EGRESS missing")?;
        let map: HashMap<&MapData, u32, Egress> =
            HashMap::try_from(m).context("map EGRESS has an unexpected type")?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading EGRESS")
    }

    fn array<T: aya::Pod>(&mut self, map: &str) -> Result<Array<&mut MapData, T>> {
        let m = self
            .ebpf
            .map_mut(map)
            .with_context(|| format!("map {map} missing"))?;
        Array::try_from(m).with_context(|| format!("map {map} has an unexpected type"))
    }

    /// Set the classifier seed and mode.
    pub fn set_classifier(&mut self, seed: u32, mode: u32) -> Result<()> {
        self.settings.seed = seed;
        self.settings.mode = mode;
        self.write_settings()
    }

    /// Set the NAT port range and the router's own ephemeral port range
    /// (both inclusive, host order).
    pub fn set_nat_ports(&mut self, nat: (u16, u16), local: (u16, u16)) -> Result<()> {
        (self.settings.nat_port_min, self.settings.nat_port_max) = nat;
        (self.settings.local_port_min, self.settings.local_port_max) = local;
        self.write_settings()
    }

    /// Stop redirecting replies to LAN interface `ifindex`.
    pub fn remove_lan(&mut self, ifindex: u32) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(name::LAN_PORTS)
            .context("map LAN_PORTS missing")?;
        let mut ports = DevMapHash::try_from(m).context("map LAN_PORTS has an unexpected type")?;
        missing_is_fine(ports.remove(ifindex))
            .with_context(|| format!("removing LAN ifindex {ifindex} from the device map"))
    }

    /// Unpin, and so detach, every link an earlier lbd pinned that is not
    /// in `keep` (program, interface): a port that left the bridge, a LAN
    /// or an uplink taken out of the configuration while lbd was stopped;
    /// the links of `keep` are taken over by the rounds. Returns what it
    /// let go, as (program, interface), and what it could not, with why.
    pub fn release_links_except(
        &mut self,
        keep: &std::collections::BTreeSet<(String, String)>,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let Some(pins) = &self.pins else {
            return (Vec::new(), Vec::new());
        };
        let (mut released, mut failed) = (Vec::new(), Vec::new());
        for (prog, ifname) in pins.links() {
            if keep.contains(&(prog.clone(), ifname.clone())) {
                continue;
            }
            let pin = pins.link(&prog, &ifname);
            match PinnedLink::from_pin(&pin).map(PinnedLink::unpin) {
                Ok(Ok(_)) => released.push((prog, ifname)),
                Ok(Err(e)) => failed.push(format!("unpinning {}: {e}", pin.display())),
                Err(e) => failed.push(format!("opening {}: {e}", pin.display())),
            }
        }
        (released, failed)
    }

    /// Let replies be redirected to LAN interface `ifindex`.
    pub fn add_lan(&mut self, ifindex: u32) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(name::LAN_PORTS)
            .context("map LAN_PORTS missing")?;
        let mut ports = DevMapHash::try_from(m).context("map LAN_PORTS has an unexpected type")?;
        ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding LAN ifindex {ifindex} to the device map"))
    }

    /// The settings as last written (or being written).
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Put `settings` back, as before a change that failed half-way.
    pub fn restore_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings = settings;
        self.write_settings()
    }

    fn write_settings(&mut self) -> Result<()> {
        let settings = self.settings;
        self.array::<Settings>(name::SETTINGS)?
            .set(0, settings, 0)
            .context("writing SETTINGS")
    }

    /// Make `table` the live bucket table of the default policy (see
    /// [`Self::set_policy`]), taking new flows as `table` says.
    pub fn set_buckets(&mut self, table: &Table) -> Result<()> {
        self.set_default_table(Family::V4, table)
    }

    /// The same for new IPv6 flows.
    pub fn set_buckets6(&mut self, table: &Table) -> Result<()> {
        self.set_default_table(Family::V6, table)
    }

    fn set_default_table(&mut self, family: Family, table: &Table) -> Result<()> {
        let policy = Policy {
            takers: takers(table),
            ..self.policies[family as usize][0]
        };
        self.set_policy(family, DEFAULT_POLICY, Some(table), policy)
    }

    /// Write `policy`'s entry for `family`; with `table`, make it the
    /// policy's live bucket table in the same step: it goes into the idle
    /// one of the policy's two tables (one map write), then the entry,
    /// which says which is live, is written whole (one more).
    pub fn set_policy(
        &mut self,
        family: Family,
        index: u32,
        table: Option<&Table>,
        policy: Policy,
    ) -> Result<()> {
        let (policies, buckets) = family.maps();
        let slot = self.policies[family as usize]
            .get(index as usize)
            .copied()
            .with_context(|| format!("policy index {index} out of range (max {MAX_POLICIES})"))?;
        let mut next = Policy {
            active_table: slot.active_table,
            ..policy
        };
        if let Some(table) = table {
            next.active_table = slot.active_table ^ 1;
            let value = BucketTable { uplinks: *table };
            self.array::<BucketTable>(buckets)?
                .set(next.table_index(index), value, 0)
                .with_context(|| format!("writing a bucket table of {buckets}"))?;
        }
        self.array::<Policy>(policies)?
            .set(index, next, 0)
            .with_context(|| format!("writing policy {index} of {policies}"))?;
        self.policies[family as usize][index as usize] = next;
        // Right after the policy's own entry: the rules' fallbacks go by
        // this (the data plane falls back on its own in between).
        let bit = 1 << index;
        let field = match family {
            Family::V4 => &mut self.settings.live_policies,
            Family::V6 => &mut self.settings.live_policies6,
        };
        let live = if next.takers != 0 {
            *field | bit
        } else {
            *field & !bit
        };
        if live != *field {
            *field = live;
            self.write_settings()?;
        }
        Ok(())
    }

    /// The policies one of whose uplinks takes new flows of `family`
    /// (bits).
    pub fn live_policies(&self, family: Family) -> u32 {
        match family {
            Family::V4 => self.settings.live_policies,
            Family::V6 => self.settings.live_policies6,
        }
    }

    /// What the data plane has of policy `index` for `family`.
    pub fn policy(&self, family: Family, index: u32) -> Option<Policy> {
        self.policies[family as usize].get(index as usize).copied()
    }

    /// The live generation of the compiled rules (0 or 1).
    pub fn rule_generation(&self) -> u32 {
        self.settings.active_rules & 1
    }

    /// Write `generation`'s rule table (the idle generation's: the live
    /// one is never written in place).
    pub fn write_rule_table(&mut self, generation: u32, rules: &RuleTable) -> Result<()> {
        self.array::<RuleTable>(name::RULES)?
            .set(generation & 1, *rules, 0)
            .context("writing the rule table")
    }

    /// Make `generation` the live rules: one write, after which every new
    /// flow is classified by it alone.
    pub fn flip_rules(&mut self, generation: u32) -> Result<()> {
        self.settings.active_rules = generation & 1;
        self.write_settings()
    }

    /// The live rules.
    pub fn rules(&mut self) -> Result<RuleTable> {
        let live = self.rule_generation();
        self.array::<RuleTable>(name::RULES)?
            .get(&live, 0)
            .context("reading the rule table")
    }

    /// The file descriptor of map `map`, for the batch calls.
    fn fd(&self, map: &str) -> Result<std::os::fd::BorrowedFd<'_>> {
        match self.ebpf.map(map) {
            Some(Map::Array(data)) | Some(Map::LpmTrie(data)) => Ok(data.fd().as_fd()),
            Some(_) => Err(anyhow!("map {map} has an unexpected type")),
            None => Err(anyhow!("map {map} missing")),
        }
    }

    /// Write `generation`'s prefix entries of `side` into the trie of
    /// their family (`A`: `u32`, `u128`): each prefix (network in host
    /// order, length) with the rules it matches. One batch.
    pub fn write_prefixes<A: TrieAddr>(
        &mut self,
        generation: u32,
        side: u32,
        entries: &[((A, u8), RuleBits)],
    ) -> Result<()>
    where
        A::Key: aya::Pod,
    {
        let keys: Vec<Key<A::Key>> = entries
            .iter()
            .map(|&((addr, len), _)| prefix_key(generation, side, addr, len))
            .collect();
        let values: Vec<RuleBits> = entries.iter().map(|e| e.1).collect();
        batch::update(&self.fd(trie_name::<A>())?, &keys, &values).map_err(|e| {
            let at = entries
                .get(e.done)
                .map_or_else(String::new, |&((a, l), _)| format!(" at {a:?}/{l}"));
            anyhow!(
                "writing the rules' prefixes to {}{at}: {} (the trie holds at most {} prefixes \
                 a side)",
                trie_name::<A>(),
                e.error,
                lb_common::MAX_SIDE_PREFIXES
            )
        })
    }

    /// Remove `generation`'s prefixes `prefixes` of `side` (as written).
    pub fn remove_prefixes<A: TrieAddr>(
        &mut self,
        generation: u32,
        side: u32,
        prefixes: impl Iterator<Item = (A, u8)>,
    ) -> Result<()>
    where
        A::Key: aya::Pod,
    {
        let keys: Vec<Key<A::Key>> = prefixes
            .map(|(addr, len)| prefix_key(generation, side, addr, len))
            .collect();
        self.remove_prefix_keys::<A>(&keys)
    }

    /// A family's prefix trie, to read.
    fn prefix_trie<A: TrieAddr>(&self) -> Result<LpmTrie<&MapData, A::Key, RuleBits>>
    where
        A::Key: aya::Pod,
    {
        let name = trie_name::<A>();
        let m = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        LpmTrie::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// Every prefix in a family's trie, whoever wrote it, by generation:
    /// one walk (one system call a key: the trie has no batch lookup),
    /// for what lbd did not write itself (a data plane it adopted, a
    /// write that failed halfway).
    pub fn prefixes_by_generation<A: TrieAddr>(&self) -> Result<[Vec<Key<A::Key>>; 2]>
    where
        A::Key: aya::Pod,
    {
        let trie = self.prefix_trie::<A>()?;
        let mut found = [Vec::new(), Vec::new()];
        for key in trie.keys() {
            let key = key.with_context(|| format!("walking {}", trie_name::<A>()))?;
            found[A::generation(&key.data()) as usize & 1].push(key);
        }
        Ok(found)
    }

    /// Remove `keys` from a family's prefix trie; every one must be there.
    pub fn remove_prefix_keys<A: TrieAddr>(&mut self, keys: &[Key<A::Key>]) -> Result<()>
    where
        A::Key: aya::Pod,
    {
        batch::delete(&self.fd(trie_name::<A>())?, keys).map_err(|e| {
            anyhow!(
                "removing prefixes from {}: {} (at entry {})",
                trie_name::<A>(),
                e.error,
                e.done
            )
        })
    }

    /// The rules of `generation` that `addr` matches on `side`: a
    /// longest-prefix lookup in its family's trie, as the data plane's.
    pub fn prefix_rules(
        &self,
        generation: u32,
        side: u32,
        addr: IpAddr,
    ) -> Result<Option<RuleBits>> {
        let found = match addr {
            IpAddr::V4(a) => self
                .prefix_trie::<u32>()?
                .get(&prefix_key(generation, side, u32::from(a), 32), 0),
            IpAddr::V6(a) => self
                .prefix_trie::<u128>()?
                .get(&prefix_key(generation, side, u128::from(a), 128), 0),
        };
        match found {
            Ok(bits) => Ok(Some(bits)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("looking into the rules' prefixes"),
        }
    }

    /// Write `generation`'s port entries of `side`: `ports[p]` is the
    /// rules port `p` matches. One batch.
    pub fn write_ports(&mut self, generation: u32, side: u32, ports: &[RuleBits]) -> Result<()> {
        let keys: Vec<u32> = (0..ports.len() as u32)
            .map(|p| port_index(generation, side, p as u16))
            .collect();
        batch::update(&self.fd(name::PORT_BITS)?, &keys, ports).map_err(|e| {
            anyhow!(
                "writing the rules' ports: {} (at entry {})",
                e.error,
                e.done
            )
        })
    }

    /// The rules of `generation` that `port` matches on `side`.
    pub fn port_rules(&self, generation: u32, side: u32, port: u16) -> Result<RuleBits> {
        let m = self
            .ebpf
            .map(name::PORT_BITS)
            .context("map PORT_BITS missing")?;
        let ports: Array<&MapData, RuleBits> =
            Array::try_from(m).context("map PORT_BITS has an unexpected type")?;
        ports
            .get(&port_index(generation, side, port), 0)
            .context("reading PORT_BITS")
    }

    /// What LAN port `ifindex` is to the rules (`None`: forget it).
    pub fn set_lan_port(&mut self, ifindex: u32, port: Option<LanPort>) -> Result<()> {
        self.set_port_entry(name::LAN_CLASSES, ifindex, port, "LAN port")
    }

    /// The router's MACs on LAN port `ifindex` (`None`: forget the port).
    pub fn set_router_macs(&mut self, ifindex: u32, macs: Option<RouterMacs>) -> Result<()> {
        self.set_port_entry(
            name::ROUTER_MACS,
            ifindex,
            macs,
            "the router's MACs on LAN port",
        )
    }

    /// What `ROUTER_MACS` holds now.
    pub fn router_macs(&self) -> Result<Vec<(u32, RouterMacs)>> {
        self.port_entries(name::ROUTER_MACS)
    }

    /// What `LAN_CLASSES` holds now.
    pub fn lan_ports(&self) -> Result<Vec<(u32, LanPort)>> {
        self.port_entries(name::LAN_CLASSES)
    }

    /// Write (`Some`) or remove (`None`) the entry of LAN port `ifindex`
    /// in hash map `map`; `what` says what it is, in errors.
    fn set_port_entry<V: Pod>(
        &mut self,
        map: &str,
        ifindex: u32,
        value: Option<V>,
        what: &str,
    ) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(map)
            .with_context(|| format!("map {map} missing"))?;
        let mut entries: HashMap<&mut MapData, u32, V> =
            HashMap::try_from(m).with_context(|| format!("map {map} has an unexpected type"))?;
        match value {
            Some(v) => entries
                .insert(ifindex, v, 0)
                .with_context(|| format!("writing {what} {ifindex}")),
            None => missing_is_fine(entries.remove(&ifindex))
                .with_context(|| format!("removing {what} {ifindex}")),
        }
    }

    /// Every entry of hash map `map`, by LAN port.
    fn port_entries<V: Pod>(&self, map: &str) -> Result<Vec<(u32, V)>> {
        let m = self
            .ebpf
            .map(map)
            .with_context(|| format!("map {map} missing"))?;
        let entries: HashMap<&MapData, u32, V> =
            HashMap::try_from(m).with_context(|| format!("map {map} has an unexpected type"))?;
        entries
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {map}"))
    }

    /// Per-policy counters, summed over the CPUs.
    pub fn policy_stats(&self, index: u32) -> Result<PolicyStats> {
        let m = self
            .ebpf
            .map(name::POLICY_STATS)
            .context("map POLICY_STATS missing")?;
        let stats: PerCpuArray<&MapData, PolicyStats> =
            PerCpuArray::try_from(m).context("map POLICY_STATS has an unexpected type")?;
        let per_cpu = stats
            .get(&index, 0)
            .with_context(|| format!("reading POLICY_STATS[{index}]"))?;
        Ok(per_cpu
            .iter()
            .fold(PolicyStats::default(), |a, s| PolicyStats {
                new_flows: a.new_flows + s.new_flows,
                dropped: a.dropped + s.dropped,
                unreachable: a.unreachable + s.unreachable,
                sticky_hits: a.sticky_hits + s.sticky_hits,
            }))
    }

    /// Sticky entries per policy that still hold at `now_ns` (the data
    /// plane's coarse clock), given each policy's timeout.
    pub fn sticky_entries(&self, now_ns: u64) -> Result<Vec<(StickyKey, StickyValue)>> {
        self.sticky_in(name::STICKY, Family::V4, now_ns, |k: &StickyKey| k.policy)
    }

    /// The same for IPv6 clients.
    pub fn sticky_entries6(&self, now_ns: u64) -> Result<Vec<(StickyKey6, StickyValue)>> {
        self.sticky_in(name::STICKY6, Family::V6, now_ns, |k: &StickyKey6| k.policy)
    }

    fn sticky_in<K: Pod>(
        &self,
        map: &str,
        family: Family,
        now_ns: u64,
        policy_of: impl Fn(&K) -> u32,
    ) -> Result<Vec<(K, StickyValue)>> {
        let m = self
            .ebpf
            .map(map)
            .with_context(|| format!("map {map} missing"))?;
        let entries: HashMap<&MapData, K, StickyValue> =
            HashMap::try_from(m).with_context(|| format!("map {map} has an unexpected type"))?;
        Ok(entries
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                self.policy(family, policy_of(k)).is_some_and(|p| {
                    lb_common::policy::sticky_holds(v.last_ns, now_ns, p.sticky_timeout_ns)
                })
            })
            .collect())
    }

    /// Describe uplink `index` to the data plane: its device, addresses and
    /// state.
    pub fn set_uplink(&mut self, index: u32, info: &UplinkInfo) -> Result<()> {
        if index >= MAX_UPLINKS {
            return Err(anyhow!(
                "uplink index {index} out of range (max {MAX_UPLINKS})"
            ));
        }
        {
            let m = self
                .ebpf
                .map_mut(name::TX_PORTS)
                .context("map TX_PORTS missing")?;
            let mut ports = DevMap::try_from(m).context("map TX_PORTS has an unexpected type")?;
            ports
                .set(index, info.ifindex, None, 0)
                .with_context(|| format!("adding ifindex {} to the device map", info.ifindex))?;
        }
        {
            let m = self
                .ebpf
                .map_mut(name::UPLINK_BY_IFINDEX)
                .context("map UPLINK_BY_IFINDEX missing")?;
            let mut by_ifindex: HashMap<_, u32, u32> =
                HashMap::try_from(m).context("map UPLINK_BY_IFINDEX has an unexpected type")?;
            by_ifindex
                .insert(info.ifindex, index, 0)
                .context("writing UPLINK_BY_IFINDEX")?;
        }
        if info.ifindex < lb_common::IFINDEX_SLOTS {
            self.array::<u32>(name::UPLINK_AT_IFINDEX)?
                .set(info.ifindex, index + 1, 0)
                .context("writing UPLINK_AT_IFINDEX")?;
        }
        self.array::<UplinkInfo>(name::UPLINKS)?
            .set(index, info, 0)
            .context("writing UPLINKS")
    }

    /// Stop taking packets arriving on `ifindex` for an uplink's replies
    /// (the uplink's interface is gone, or has another index now).
    pub fn forget_uplink_ifindex(&mut self, ifindex: u32) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(name::UPLINK_BY_IFINDEX)
            .context("map UPLINK_BY_IFINDEX missing")?;
        let mut by_ifindex: HashMap<_, u32, u32> =
            HashMap::try_from(m).context("map UPLINK_BY_IFINDEX has an unexpected type")?;
        missing_is_fine(by_ifindex.remove(&ifindex)).context("removing from UPLINK_BY_IFINDEX")?;
        if ifindex < lb_common::IFINDEX_SLOTS {
            self.array::<u32>(name::UPLINK_AT_IFINDEX)?
                .set(ifindex, 0, 0)
                .context("clearing UPLINK_AT_IFINDEX")?;
        }
        Ok(())
    }

    /// Change only the state of uplink `index`.
    pub fn set_uplink_state(&mut self, index: u32, state: u32) -> Result<()> {
        self.update_uplink(index, |info| info.state = state)
    }

    /// Send uplink `index`'s traffic to its gateway at Ethernet address
    /// `mac` from now on.
    pub fn set_gateway_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        self.update_uplink(index, |info| info.gw_mac = mac)
    }

    /// Read, change and write back one uplink's entry. An array element is
    /// overwritten in place, so a packet read at that instant may see part
    /// of the change: for a state or a gateway address, that costs at most
    /// that packet.
    fn update_uplink(&mut self, index: u32, change: impl FnOnce(&mut UplinkInfo)) -> Result<()> {
        let mut uplinks = self.array::<UplinkInfo>(name::UPLINKS)?;
        let mut info = uplinks.get(&index, 0).context("reading UPLINKS")?;
        change(&mut info);
        uplinks.set(index, info, 0).context("writing UPLINKS")
    }

    /// Leave destinations in `addr/prefix_len` to the kernel.
    pub fn add_bypass(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let key = Key::new(u32::from(prefix_len), mask(addr, prefix_len).octets());
        self.bypass()?
            .insert(&key, 1, 0)
            .with_context(|| format!("adding {addr}/{prefix_len} to BYPASS"))
    }

    /// Stop leaving destinations in `addr/prefix_len` to the kernel.
    pub fn remove_bypass(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let key = Key::new(u32::from(prefix_len), mask(addr, prefix_len).octets());
        missing_is_fine(self.bypass()?.remove(&key))
            .with_context(|| format!("removing {addr}/{prefix_len} from BYPASS"))
    }

    /// What `BYPASS` holds now (an adopted data plane's, to converge
    /// from).
    pub fn bypass_prefixes(&self) -> Result<Vec<(Ipv4Addr, u8)>> {
        let m = self.ebpf.map(name::BYPASS).context("map BYPASS missing")?;
        let trie: LpmTrie<&MapData, [u8; 4], u32> =
            LpmTrie::try_from(m).context("map BYPASS has an unexpected type")?;
        trie.keys()
            .map(|k| k.map(|k| (Ipv4Addr::from(k.data()), k.prefix_len() as u8)))
            .collect::<Result<Vec<_>, _>>()
            .context("reading BYPASS")
    }

    fn bypass(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], u32>> {
        let m = self
            .ebpf
            .map_mut(name::BYPASS)
            .context("map BYPASS missing")?;
        LpmTrie::try_from(m).context("map BYPASS has an unexpected type")
    }

    /// Counters of uplink `index`, summed over CPUs: its `UPLINK_STATS`
    /// entry, and what its packets counted in `SIGNALS` in each family.
    pub fn uplink_stats(&self, index: u32) -> Result<UplinkCounters> {
        let m = self
            .ebpf
            .map(name::UPLINK_STATS)
            .context("map UPLINK_STATS missing")?;
        let stats: PerCpuArray<_, UplinkStats> = PerCpuArray::try_from(m)?;
        let per_cpu = stats.get(&index, 0).context("reading UPLINK_STATS")?;
        let mut sum = UplinkCounters::default();
        for s in per_cpu.iter() {
            sum.rx_packets += s.rx_packets;
            sum.rx_bytes += s.rx_bytes;
            sum.new_flows += s.new_flows;
            sum.moved_away += s.moved_away;
            sum.nat_failures += s.nat_failures;
        }
        let m = self
            .ebpf
            .map(name::SIGNALS)
            .context("map SIGNALS missing")?;
        let signals: PerCpuArray<_, Signals> = PerCpuArray::try_from(m)?;
        for slot in [index, signals6(index)] {
            let per_cpu = signals.get(&slot, 0).context("reading SIGNALS")?;
            for s in per_cpu.iter() {
                sum.tx_packets += s.tx_packets;
                sum.tx_bytes += s.tx_bytes;
                sum.replies += s.replies;
            }
        }
        Ok(sum)
    }

    /// What the traffic says about uplink `index`'s path, all CPUs
    /// together (see `passive`), read at `now_ns` (the data plane's clock).
    pub fn signals(&self, index: u32, now_ns: u64) -> Result<crate::health::passive::Sample> {
        let m = self
            .ebpf
            .map(name::SIGNALS)
            .context("map SIGNALS missing")?;
        let signals: PerCpuArray<_, Signals> = PerCpuArray::try_from(m)?;
        let per_cpu = signals.get(&index, 0).context("reading SIGNALS")?;
        let (mut flows, mut destinations) = (0u64, 0u64);
        let mut sample = crate::health::passive::Sample {
            now_ns,
            ..Default::default()
        };
        for s in per_cpu.iter() {
            sample.last_reply_ns = sample.last_reply_ns.max(s.last_reply_ns);
            sample.last_sent_ns = sample.last_sent_ns.max(s.last_sent_ns);
            sample.syn_retries += s.syn_retries;
        }
        for s in per_cpu.iter() {
            // A CPU whose last send is older than the latest reply has
            // nothing waiting.
            if s.last_sent_ns > sample.last_reply_ns {
                flows |= s.flows;
                destinations |= s.destinations;
            }
        }
        sample.flows = flows.count_ones();
        sample.destinations = destinations.count_ones();
        Ok(sample)
    }

    /// Let a retried SYN move to another uplink (`[passive] resteer_syn`).
    pub fn set_resteer_syn(&mut self, on: bool) -> Result<()> {
        if on {
            self.settings.flags |= settings_flags::RESTEER_SYN;
        } else {
            self.settings.flags &= !settings_flags::RESTEER_SYN;
        }
        self.write_settings()
    }

    /// Balance IPv6 (lbd knows the LAN's prefix and the uplinks' entries
    /// in `UPLINKS6` say how each takes it), or leave it to the kernel.
    pub fn set_ipv6(&mut self, on: bool) -> Result<()> {
        let flags = if on {
            self.settings.flags | settings_flags::IPV6
        } else {
            self.settings.flags & !settings_flags::IPV6
        };
        if flags == self.settings.flags {
            return Ok(());
        }
        self.settings.flags = flags;
        self.write_settings()
    }

    /// Describe uplink `index`'s IPv6 side: its IPv6 state, next hop and
    /// translations. (Its device is its `UPLINKS` entry's.)
    pub fn set_uplink6(&mut self, index: u32, six: &Uplink6) -> Result<()> {
        if index >= MAX_UPLINKS {
            return Err(anyhow!(
                "uplink index {index} out of range (max {MAX_UPLINKS})"
            ));
        }
        self.array::<Uplink6>(name::UPLINKS6)?
            .set(index, six, 0)
            .context("writing UPLINKS6")
    }

    /// How uplink `index` wraps its packets (a VLAN tag, a PPPoE session).
    /// The data plane looks only for an uplink whose entry has
    /// `uplink_flags::WRAPPED`: write this first, then that entry.
    pub fn set_encap(&mut self, index: u32, encap: &lb_common::encap::Encap) -> Result<()> {
        if index >= MAX_UPLINKS {
            return Err(anyhow!(
                "uplink index {index} out of range (max {MAX_UPLINKS})"
            ));
        }
        self.array::<lb_common::encap::Encap>(name::ENCAP)?
            .set(index, encap, 0)
            .context("writing ENCAP")
    }

    /// Leave IPv6 destinations in `addr/prefix_len` to the kernel.
    pub fn add_bypass6(&mut self, addr: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let key = Key::new(u32::from(prefix_len), mask6(addr, prefix_len).octets());
        self.bypass6()?
            .insert(&key, 1, 0)
            .with_context(|| format!("adding {addr}/{prefix_len} to BYPASS6"))
    }

    /// Stop leaving IPv6 destinations in `addr/prefix_len` to the kernel.
    pub fn remove_bypass6(&mut self, addr: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let key = Key::new(u32::from(prefix_len), mask6(addr, prefix_len).octets());
        missing_is_fine(self.bypass6()?.remove(&key))
            .with_context(|| format!("removing {addr}/{prefix_len} from BYPASS6"))
    }

    /// What `BYPASS6` holds now, as [`Dataplane::bypass_prefixes`].
    pub fn bypass6_prefixes(&self) -> Result<Vec<(Ipv6Addr, u8)>> {
        let m = self
            .ebpf
            .map(name::BYPASS6)
            .context("map BYPASS6 missing")?;
        let trie: LpmTrie<&MapData, [u8; 16], u32> =
            LpmTrie::try_from(m).context("map BYPASS6 has an unexpected type")?;
        trie.keys()
            .map(|k| k.map(|k| (Ipv6Addr::from(k.data()), k.prefix_len() as u8)))
            .collect::<Result<Vec<_>, _>>()
            .context("reading BYPASS6")
    }

    fn bypass6(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], u32>> {
        let m = self
            .ebpf
            .map_mut(name::BYPASS6)
            .context("map BYPASS6 missing")?;
        LpmTrie::try_from(m).context("map BYPASS6 has an unexpected type")
    }

    /// Pass/drop counters by reason, summed over CPUs.
    pub fn reasons(&self) -> Result<[u64; reason::COUNT as usize]> {
        let m = self
            .ebpf
            .map(name::REASONS)
            .context("map REASONS missing")?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(m)?;
        let mut out = [0u64; reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = counters
                .get(&(i as u32), 0)
                .context("reading REASONS")?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Flows pinned to an uplink since start (new flows, not moves). Those
    /// neither in the table now nor collected as expired, the kernel's LRU
    /// evicted to make room.
    pub fn pinned_flows(&self, uplinks: u32) -> Result<u64> {
        let mut pinned = 0u64;
        for i in 0..uplinks {
            let s = self.uplink_stats(i)?;
            pinned += s.new_flows.saturating_sub(s.moved_away);
        }
        Ok(pinned)
    }

    /// Handles of its own to the flow and NAT tables, for walks that must
    /// not hold up whoever owns this data plane. `uplink_addrs` are the
    /// uplinks' NAT addresses by index.
    pub fn flow_tables(
        &self,
        uplink_addrs: Vec<Ipv4Addr>,
        timeouts: FlowConfig,
    ) -> Result<FlowTables> {
        Ok(FlowTables::new(
            self.reopen(name::FLOWS)?,
            self.reopen(name::NAT_REV)?,
            self.reopen(name::FLOWS6)?,
            uplink_addrs,
            timeouts,
        ))
    }

    /// A handle of its own to the fragment table (datagrams in flight, by
    /// the ports of their first fragment), to look into it.
    pub fn fragments(&self) -> Result<HashMap<MapData, FragKey, FragValue>> {
        self.reopen(name::FRAGMENTS)
    }

    /// A second handle to map `map` (the same kernel map, a new fd).
    fn reopen<K: Pod, V: Pod>(&self, map: &str) -> Result<HashMap<MapData, K, V>> {
        let m = self
            .ebpf
            .map(map)
            .with_context(|| format!("map {map} missing"))?;
        let hash: HashMap<&MapData, K, V> =
            HashMap::try_from(m).with_context(|| format!("map {map} has an unexpected type"))?;
        let fd = hash
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the fd of map {map}"))?;
        let data = MapData::from_fd(fd).with_context(|| format!("reopening map {map}"))?;
        let map_again = Map::from_map_data(data).with_context(|| format!("reopening map {map}"))?;
        HashMap::try_from(map_again).with_context(|| format!("map {map} has an unexpected type"))
    }
}

/// A removal of something already gone is a success.
pub(crate) fn missing_is_fine(
    result: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The trie key of `addr/len` on `side` in `generation`.
fn prefix_key<A: TrieAddr>(generation: u32, side: u32, addr: A, len: u8) -> Key<A::Key>
where
    A::Key: aya::Pod,
{
    Key::new(
        PrefixKey::TAG_BITS + u32::from(len),
        addr.key(generation, side),
    )
}

/// The prefix trie of `A`'s family.
fn trie_name<A: TrieAddr>() -> &'static str {
    if A::BITS == 128 {
        name::PREFIXES6
    } else {
        name::PREFIXES
    }
}

/// `addr` with the bits past `prefix_len` cleared.
pub fn mask6(addr: Ipv6Addr, prefix_len: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0);
    Ipv6Addr::from(bits & mask)
}

fn mask(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(addr);
    let mask = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    };
    Ipv4Addr::from(bits & mask)
}

/// Whether an XDP attachment failed because the device's hook is taken
/// (`EBUSY`: a program in that mode; `EEXIST`: one in the other mode).
fn taken(e: &aya::programs::ProgramError) -> bool {
    matches!(
        e,
        aya::programs::ProgramError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
    )
}
