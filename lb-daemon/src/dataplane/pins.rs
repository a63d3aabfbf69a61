//! Where the data plane lives on bpffs, so that it outlives lbd.
//!
//! `ROOT/vLAYOUT/maps/NAME` pins every map, `ROOT/vLAYOUT/links/PROG@IFACE`
//! every XDP attachment (a bpf_link: the program stays attached while the
//! pin exists, whatever happens to lbd). A starting lbd that finds its own
//! layout adopts it: the same maps, so the same flows, NAT mappings,
//! classifier seed and counters, and its programs swapped into the pinned
//! links atomically. A data plane of a layout this one migrates
//! (`maps::MIGRATES_FROM`) is renamed into this layout's directory and
//! adopted the same way, the maps whose definition changed made anew
//! (the flow tables among them carried over: `carry`). Flow tables of
//! another size than the configured one are made anew and carried the
//! same way; bypass tries smaller than this layout's are made anew (the
//! IPv4 one empty, filled before lbd's `lan_ingress` takes over; the IPv6
//! one with the old one's prefixes, copied at load). A directory of any
//! other layout is never read by the new programs: its flows are counted,
//! it is removed (which detaches its programs), and a new data plane is
//! built.
//!
//! Owns those paths and their removal; `dataplane` does the loading and
//! attaching. Never touches anything outside `ROOT`.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::links::PinnedLink,
};
use lb_common::maps::{name, nat_entries, FlowKey, FlowValue, LAYOUT, MIGRATES_FROM};
use lb_common::BYPASS_ENTRIES;

use super::carry::Carry;

/// The pinned data plane's directories.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

/// What a start found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned: a new data plane.
    Nothing,
    /// A data plane of this layout, to adopt.
    Adoptable,
    /// Data planes of other layouts, removed: their directories, and the
    /// flows they held (`None`: could not be counted).
    Replaced(Vec<(String, Option<u64>)>),
}

impl Pins {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This layout's directory.
    fn dir(&self) -> PathBuf {
        self.root.join(format!("v{LAYOUT}"))
    }

    pub fn map(&self, map: &str) -> PathBuf {
        self.dir().join("maps").join(map)
    }

    /// bpffs refuses names with a dot (it keeps them for itself), and
    /// interface names may have one (VLANs: `eth0.100`).
    pub fn link(&self, prog: &str, ifname: &str) -> PathBuf {
        self.dir()
            .join("links")
            .join(format!("{prog}@{}", ifname.replace('.', "%")))
    }

    /// The links pinned in this layout, as (program, interface name).
    pub fn links(&self) -> Vec<(String, String)> {
        let Ok(entries) = fs::read_dir(self.dir().join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (prog, ifname) = name.split_once('@')?;
                Some((prog.to_owned(), ifname.replace('%', ".")))
            })
            .collect()
    }

    /// Make the directories, remove data planes of other layouts (or
    /// migrate one, `maps::MIGRATES_FROM`), and say what there was; with
    /// the flow tables to carry into the new data plane of `max_flows`
    /// flows, if any.
    pub fn prepare(&self, max_flows: u32) -> Result<(Found, Option<Carry>)> {
        let migrated = self.migrate()?;
        for dir in [self.dir().join("maps"), self.dir().join("links")] {
            fs::create_dir_all(&dir).with_context(|| {
                format!(
                    "creating {} (is bpffs mounted at /sys/fs/bpf? `mount -t bpf bpf /sys/fs/bpf`)",
                    dir.display()
                )
            })?;
        }
        self.unpin_strays();
        let mut replaced = Vec::new();
        let ours = self.dir();
        for entry in
            fs::read_dir(&self.root).with_context(|| format!("listing {}", self.root.display()))?
        {
            let path = entry?.path();
            if path == ours || !path.is_dir() || !is_layout_dir(&path) {
                continue;
            }
            let flows = count_flows(&path.join("maps").join(name::FLOWS));
            remove_tree(&path)?;
            replaced.push((path.display().to_string(), flows));
        }
        // Maps made anew: those the migrated layout had otherwise, and
        // flow tables of another size. The flow tables among them wait in
        // `carry` to be copied; the rest are filled again by lbd.
        let mut remade: Vec<&str> = migrated.map(|(_, maps)| maps.to_vec()).unwrap_or_default();
        remade.extend(self.resized_flow_tables(max_flows));
        remade.extend(self.small_bypass_tries());
        remade.sort_unstable();
        remade.dedup();
        for map in remade {
            let (pin, held) = (self.map(map), self.carried(map));
            let copied = [name::FLOWS, name::NAT_REV, name::FLOWS6, name::BYPASS6].contains(&map);
            if copied && !held.exists() && pin.exists() {
                let dir = self.carry_dir();
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                fs::rename(&pin, &held)
                    .with_context(|| format!("moving {} to {}", pin.display(), held.display()))?;
            } else {
                // A table an interrupted start left in `carry` is the one
                // with the flows; the newer one goes.
                let _ = fs::remove_file(&pin);
            }
        }
        let why = match migrated {
            Some((layout, _)) => format!("the data plane of layout {layout}"),
            None => "tables of another [flows] max".to_string(),
        };
        let carry = Carry::open(self.carry_dir(), why);
        let found = if !replaced.is_empty() {
            Found::Replaced(replaced)
        } else if self.map(name::SETTINGS).exists() {
            Found::Adoptable
        } else {
            Found::Nothing
        };
        Ok((found, carry))
    }

    /// A data plane of a layout this one migrates (`MIGRATES_FROM`), when
    /// there is none of this layout: renamed into this layout's
    /// directory, links and maps with it (its programs stay attached, to
    /// be swapped out as an adopted data plane's are). Its layout, and
    /// the maps this layout makes anew.
    fn migrate(&self) -> Result<Option<(u32, &'static [&'static str])>> {
        if self.map(name::SETTINGS).exists() {
            return Ok(None);
        }
        for &(layout, remade) in MIGRATES_FROM {
            let older = self.root.join(format!("v{layout}"));
            if !older.join("maps").join(name::SETTINGS).exists() {
                continue;
            }
            // Only directories this layout's start made, empty.
            if self.dir().exists() {
                remove_tree(&self.dir())?;
            }
            fs::rename(&older, self.dir()).with_context(|| {
                format!("moving {} to {}", older.display(), self.dir().display())
            })?;
            return Ok(Some((layout, remade)));
        }
        Ok(None)
    }

    /// This layout's pinned flow tables that were made for another
    /// number of flows than `max_flows` (an operator changed `[flows]
    /// max`), or as another kind of table (a migration that stopped
    /// half-way left an earlier layout's). A table that cannot be asked
    /// counts as right.
    fn resized_flow_tables(&self, max_flows: u32) -> Vec<&'static str> {
        use aya::maps::MapType;
        [
            (name::FLOWS, max_flows, MapType::LruHash),
            (name::NAT_REV, nat_entries(max_flows), MapType::Hash),
            (name::FLOWS6, max_flows, MapType::LruHash),
        ]
        .into_iter()
        .filter(|&(table, wanted, kind)| {
            MapData::from_pin(self.map(table))
                .and_then(|m| m.info())
                .is_ok_and(|info| {
                    info.max_entries() != wanted || info.map_type().is_ok_and(|t| t != kind)
                })
        })
        .map(|(table, _, _)| table)
        .collect()
    }

    /// This layout's pinned bypass tries that hold fewer prefixes than
    /// [`BYPASS_ENTRIES`] (an earlier layout's, 256, kept by a migration):
    /// made anew, they get their room. `BYPASS` is made empty: only
    /// `lan_ingress` reads it, and the round that takes `lan_ingress` over
    /// writes it first; the programs before keep the old one until then.
    /// `BYPASS6` waits in `carry`, and the load copies its prefixes into
    /// the new one ([`Self::carried`]) before it puts the new
    /// `lan_ingress6` where the running `lan_ingress` tail-calls it.
    fn small_bypass_tries(&self) -> Vec<&'static str> {
        [name::BYPASS, name::BYPASS6]
            .into_iter()
            .filter(|&trie| {
                MapData::from_pin(self.map(trie))
                    .and_then(|m| m.info())
                    .is_ok_and(|info| info.max_entries() < BYPASS_ENTRIES)
            })
            .collect()
    }

    /// Where map `map` of the data plane before waits to be copied, when
    /// it does (`prepare`).
    pub fn carried(&self, map: &str) -> PathBuf {
        self.carry_dir().join(map)
    }

    /// Where the maps of the data plane before wait to be copied.
    fn carry_dir(&self) -> PathBuf {
        self.dir().join("carry")
    }

    /// Unpin the maps of this layout that no map of this lbd's has the
    /// name of: one an lbd of this layout named otherwise (`FRAGS`, before
    /// it held a time) is freed once no program uses it. A map it cannot
    /// unpin stays, said: it costs its memory, and nothing else.
    fn unpin_strays(&self) {
        let maps = self.dir().join("maps");
        let Ok(entries) = fs::read_dir(&maps) else {
            return;
        };
        for entry in entries.flatten() {
            let known = entry
                .file_name()
                .to_str()
                .is_some_and(|n| name::ALL.contains(&n));
            let path = entry.path();
            if known || path.is_dir() {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => log::info!("{}: no map of this lbd's; unpinned", path.display()),
                Err(e) => log::warn!(
                    "{}: no map of this lbd's, and it could not be unpinned ({e}); it keeps \
                     its memory until the data plane is removed (`lbd --teardown`)",
                    path.display()
                ),
            }
        }
    }

    /// Remove the whole pinned data plane, of every layout: unpinning its
    /// links detaches its programs, unpinning its maps frees them once no
    /// program holds them. The root goes too when nothing else is in it;
    /// anything else there (another program's pins, if `bpffs` names a
    /// directory others use) is left alone.
    pub fn remove(&self) -> Result<()> {
        let entries = match fs::read_dir(&self.root) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            entries => entries.with_context(|| format!("listing {}", self.root.display()))?,
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() && is_layout_dir(&path) {
                remove_tree(&path)?;
            }
        }
        match fs::remove_dir(&self.root) {
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                log::info!(
                    "{} holds pins that are not lbd's: left in place",
                    self.root.display()
                );
                Ok(())
            }
            removed => removed.with_context(|| format!("removing {}", self.root.display())),
        }
    }
}

/// Whether `path` is a data plane's directory (`vLAYOUT`): the only ones
/// lbd ever removes under its root.
fn is_layout_dir(path: &Path) -> bool {
    layout_of(path).is_some()
}

/// The layout of the data plane whose directory is `path` (`vLAYOUT`).
fn layout_of(path: &Path) -> Option<u32> {
    let n = path.file_name()?.to_str()?.strip_prefix('v')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Flows in a pinned flow table, if it can be read as one.
fn count_flows(path: &Path) -> Option<u64> {
    let data = MapData::from_pin(path).ok()?;
    let map = Map::from_map_data(data).ok()?;
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(map).ok()?;
    Some(flows.keys().filter(Result::is_ok).count() as u64)
}

/// Remove a pinned tree: links through their pins (so that they detach),
/// everything else as files.
fn remove_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_tree(&path)?;
        } else if let Ok(link) = PinnedLink::from_pin(&path) {
            link.unpin()
                .with_context(|| format!("unpinning {}", path.display()))?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_no_longer_named_is_unpinned_and_the_others_kept() {
        let root = std::env::temp_dir().join(format!("lb-pins-{}", std::process::id()));
        let pins = Pins::new(&root);
        fs::create_dir_all(root.join(format!("v{LAYOUT}/maps"))).expect("mkdir");
        for file in [name::SETTINGS, name::FLOWS, "FRAGS"] {
            fs::write(pins.map(file), b"").expect("write");
        }
        let found = pins.prepare(1024).map(|(found, _)| found);
        let kept = pins.map(name::FLOWS).exists();
        let stray = pins.map("FRAGS").exists();
        let _ = fs::remove_dir_all(&root);
        assert_eq!(found.expect("prepare"), Found::Adoptable);
        assert!(kept, "FLOWS kept");
        assert!(!stray, "FRAGS unpinned");
    }

    #[test]
    fn only_lbds_own_layout_directories_are_ever_removed() {
        let root = std::env::temp_dir().join(format!("lb-pins-own-{}", std::process::id()));
        let pins = Pins::new(&root);
        // An older layout's data plane, and another program's pins beside
        // it (a root shared by mistake, such as /sys/fs/bpf itself).
        let older = root.join("v1/maps");
        let foreign = root.join("cilium/maps");
        for dir in [&older, &foreign] {
            fs::create_dir_all(dir).expect("mkdir");
        }
        fs::write(foreign.join("policy"), b"").expect("write");
        fs::write(root.join("vxlan_map"), b"").expect("write");
        let found = pins.prepare(1024).map(|(found, _)| found);
        let older_gone = !root.join("v1").exists();
        let foreign_kept = foreign.join("policy").exists() && root.join("vxlan_map").exists();
        let removed = pins.remove();
        let ours_gone = !root.join(format!("v{LAYOUT}")).exists();
        let foreign_still = foreign.join("policy").exists() && root.exists();
        let _ = fs::remove_dir_all(&root);
        assert!(
            matches!(found.expect("prepare"), Found::Replaced(old) if old.len() == 1),
            "only v1 replaced"
        );
        assert!(older_gone, "the older layout removed");
        assert!(foreign_kept, "another program's pins kept by prepare");
        removed.expect("remove");
        assert!(ours_gone, "this layout removed by remove");
        assert!(foreign_still, "another program's pins kept by remove");
        let pins = Pins::new(&root);
        let _ = fs::create_dir_all(root.join(format!("v{LAYOUT}/links")));
        let _ = fs::write(pins.link("lan_ingress", "eth0.100"), b"");
        let links = pins.links();
        let _ = fs::remove_dir_all(&root);
        assert_eq!(links, [("lan_ingress".to_string(), "eth0.100".to_string())]);
        assert!(is_layout_dir(Path::new("/x/v12")));
        assert!(!is_layout_dir(Path::new("/x/v")) && !is_layout_dir(Path::new("/x/vx1")));
    }
}
