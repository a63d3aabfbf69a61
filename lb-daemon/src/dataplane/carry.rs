//! Carrying flow tables (`FLOWS`, `NAT_REV`, `FLOWS6`) that had to be
//! made anew into the new ones, so that a start that cannot keep them as
//! they are keeps their connections all the same: an upgrade whose layout
//! remade one (`maps::MIGRATES_FROM`), or a `[flows] max` that changed (a
//! map's size is fixed when it is made, and a pinned one is reused as it
//! is).
//!
//! `pins` moves the old tables' pins into the data plane's `carry`
//! directory before the new data plane is loaded; they stay there, and
//! the old programs keep using them, until the new programs are swapped
//! into the links. The entries are copied once the new data plane is
//! loaded, and again once its programs have taken over (the flows the old
//! ones made in between); then the directory goes. A start that fails in
//! between finds them there again. A copy never overwrites an entry the
//! new data plane made, and carries a NAT mapping only with its flow (a
//! smaller table keeps as many flows as fit, each with its mapping). A
//! table whose key or value size is not this lbd's is not carried: said,
//! not guessed at.
//!
//! Owns nothing of the new data plane's but the entries it adds.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, IterableMap, Map, MapData, MapError},
    Pod,
};
use lb_common::maps::{name, FlowKey, FlowKey6, FlowValue, FlowValue6, NatKey, NatValue};

use super::Dataplane;

/// Flow tables to carry, held open from their pins in `dir`.
pub struct Carry {
    dir: PathBuf,
    /// Why they are carried, for the log.
    pub why: String,
    tables: Vec<(&'static str, Map)>,
}

/// What one copy did, per table: (name, entries added, entries that
/// found no room).
pub type Copied = Vec<(&'static str, u64, u64)>;

impl Carry {
    /// The flow tables pinned in `dir`, opened; `None` when none is.
    pub fn open(dir: PathBuf, why: String) -> Option<Carry> {
        let tables: Vec<(&'static str, Map)> = [name::FLOWS, name::NAT_REV, name::FLOWS6]
            .into_iter()
            .filter_map(|table| {
                let data = MapData::from_pin(dir.join(table)).ok()?;
                Some((table, Map::from_map_data(data).ok()?))
            })
            .collect();
        (!tables.is_empty()).then_some(Carry { dir, why, tables })
    }

    /// Copy every entry the new data plane does not have yet into it:
    /// the flows first, then the mappings of the flows it has. A table
    /// that cannot be carried is said and skipped: the others go on.
    pub fn copy_into(&self, dataplane: &Dataplane) -> Copied {
        let mut copied = Vec::new();
        for table in [name::FLOWS, name::FLOWS6, name::NAT_REV] {
            let Some((_, old)) = self.tables.iter().find(|(t, _)| *t == table) else {
                continue;
            };
            let done = match table {
                name::FLOWS => dataplane
                    .reopen::<FlowKey, FlowValue>(table)
                    .and_then(|mut new| copy_flows(old, &mut new)),
                name::FLOWS6 => dataplane
                    .reopen::<FlowKey6, FlowValue6>(table)
                    .and_then(|mut new| copy_flows(old, &mut new)),
                _ => dataplane
                    .reopen::<FlowKey, FlowValue>(name::FLOWS)
                    .and_then(|mut flows| {
                        let mut new = dataplane.reopen::<NatKey, NatValue>(table)?;
                        copy_mappings(old, &mut new, &mut flows)
                    }),
            };
            match done {
                Ok((added, lost)) => copied.push((table, added, lost)),
                Err(e) => log::warn!(
                    "{table} ({}) is not carried: {e:#}; its connections start anew",
                    self.why
                ),
            }
        }
        copied
    }

    /// Let the old tables go: their pins are removed, and the maps freed
    /// once no program holds them.
    pub fn finish(self) {
        let Carry { dir, tables, .. } = self;
        drop(tables);
        if let Err(e) = fs::remove_dir_all(&dir) {
            log::warn!(
                "{}: the carried flow tables stay pinned ({e}); `lbd --teardown` removes them",
                dir.display()
            );
        }
    }
}

/// Whether mapping `k` -> `v` is the one its flow (`flow`, in `flows`)
/// has (the flow table may have let the flow go, or given it another).
fn owns(
    flows: &HashMap<MapData, FlowKey, FlowValue>,
    flow: &FlowKey,
    k: &NatKey,
    v: &NatValue,
) -> bool {
    flows
        .get(flow, 0)
        .is_ok_and(|f| f.uplink == v.uplink && f.nat_port == k.nat_port)
}

/// Copy `old`'s flows missing in `new`, as many as `new` has room for
/// (an LRU table would make room by evicting the new data plane's own):
/// the number added, and the number left out.
fn copy_flows<K: Pod, V: Pod>(old: &Map, new: &mut HashMap<MapData, K, V>) -> Result<(u64, u64)> {
    let old: HashMap<&MapData, K, V> = HashMap::try_from(old)
        .context("the earlier table is no hash table of this lbd's key and value sizes")?;
    let size = u64::from(new.map().info()?.max_entries());
    let mut room = size.saturating_sub(new.keys().count() as u64);
    let (mut added, mut lost) = (0, 0);
    for (key, value) in old.iter().flatten() {
        if room == 0 {
            lost += 1;
            continue;
        }
        match insert(new, key, value)? {
            Some(true) => {
                added += 1;
                room -= 1;
            }
            Some(false) => {}
            None => lost += 1,
        }
    }
    Ok((added, lost))
}

/// Copy `old`'s mappings whose flow `flows` holds with them and that are
/// missing in `new`. A mapping the new data plane gave meanwhile to
/// another flow (the same server, the same port) costs the carried flow
/// its entry: its next packet makes a new one, never shares. The number
/// added, and the number that found no room.
fn copy_mappings(
    old: &Map,
    new: &mut HashMap<MapData, NatKey, NatValue>,
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
) -> Result<(u64, u64)> {
    let old: HashMap<&MapData, NatKey, NatValue> = HashMap::try_from(old)
        .context("the earlier table is no hash table of this lbd's key and value sizes")?;
    let (mut added, mut lost) = (0, 0);
    for (key, value) in old.iter().flatten() {
        let flow = key.flow(&value);
        if !owns(flows, &flow, &key, &value) {
            continue;
        }
        match insert(new, key, value)? {
            Some(true) => added += 1,
            Some(false) => {
                let same = new.get(&key, 0).is_ok_and(|t| {
                    t.client_addr == value.client_addr && t.client_port == value.client_port
                });
                if !same {
                    let _ = flows.remove(&flow);
                }
            }
            None => lost += 1,
        }
    }
    Ok((added, lost))
}

/// Insert an entry that is not there: `Some(true)` added, `Some(false)`
/// there already, `None` no room.
fn insert<K: Pod, V: Pod>(
    new: &mut HashMap<MapData, K, V>,
    key: K,
    value: V,
) -> Result<Option<bool>> {
    match new.insert(key, value, super::BPF_NOEXIST) {
        Ok(()) => Ok(Some(true)),
        Err(MapError::SyscallError(e)) => match e.io_error.raw_os_error() {
            Some(libc::EEXIST) => Ok(Some(false)),
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => Ok(None),
            _ => Err(MapError::SyscallError(e).into()),
        },
        Err(e) => Err(e.into()),
    }
}
