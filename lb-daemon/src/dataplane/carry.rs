//! Carrying the flow tables (`FLOWS`, `NAT_REV`, `FLOWS6`) of an earlier
//! data plane into a new one, so that a start that cannot adopt the old
//! one whole keeps the connections it carried: an upgrade to another
//! layout, or a `[flows] max` that changed (a map's size is fixed when
//! it is made, and a pinned one is reused as it is).
//!
//! The old tables are held open by descriptor (their pins go; the old
//! programs keep using them until the new ones are swapped into the
//! links), copied into the new ones once the new data plane is loaded,
//! and copied again once the new programs have taken over, for the flows
//! the old ones made in between. A copy never overwrites an entry the new
//! data plane made itself. A table whose key or value size differs from
//! this lbd's is not carried (said, not guessed at); neither is one the
//! new table has no room for.
//!
//! Owns nothing of the new data plane's but the entries it adds.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    Pod,
};
use lb_common::maps::{name, FlowKey, FlowKey6, FlowValue, FlowValue6, NatKey, NatValue};

use super::Dataplane;

/// The flow tables of an earlier data plane, held open.
pub struct Carry {
    /// Where they were pinned, for the log.
    pub from: String,
    tables: Vec<(&'static str, Map)>,
}

/// What one copy did, per table: (name, entries added, entries that
/// found no room).
pub type Copied = Vec<(&'static str, u64, u64)>;

/// `BPF_NOEXIST`: a copy only creates.
const BPF_NOEXIST: u64 = 1;

impl Carry {
    /// The flow tables pinned in `maps` (a data plane's `maps`
    /// directory), opened: each one that is there and is a map. Their
    /// pins are left to the caller.
    pub fn open(maps: &Path, from: String) -> Option<Carry> {
        let tables: Vec<(&'static str, Map)> = [name::FLOWS, name::NAT_REV, name::FLOWS6]
            .into_iter()
            .filter_map(|table| {
                let data = MapData::from_pin(maps.join(table)).ok()?;
                Some((table, Map::from_map_data(data).ok()?))
            })
            .collect();
        (!tables.is_empty()).then_some(Carry { from, tables })
    }

    /// Copy every entry the new data plane does not have yet into it. A
    /// table that cannot be carried is said and skipped: the others go on.
    pub fn copy_into(&self, dataplane: &mut Dataplane) -> Copied {
        let mut copied = Vec::new();
        for (table, old) in &self.tables {
            let Some(new) = dataplane.ebpf.map_mut(table) else {
                continue;
            };
            let done = match *table {
                name::FLOWS => copy::<FlowKey, FlowValue>(old, new),
                name::NAT_REV => copy::<NatKey, NatValue>(old, new),
                _ => copy::<FlowKey6, FlowValue6>(old, new),
            };
            match done {
                Ok((added, lost)) => copied.push((*table, added, lost)),
                Err(e) => log::warn!(
                    "{table} of the data plane at {} is not carried: {e:#}; its connections \
                     start anew",
                    self.from
                ),
            }
        }
        copied
    }
}

/// Copy `old`'s entries missing in `new`: the number added, and the
/// number that found no room.
fn copy<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<(u64, u64)> {
    let old: HashMap<&MapData, K, V> = HashMap::try_from(old)
        .context("the earlier table is no hash table of this lbd's key and value sizes")?;
    let mut new: HashMap<&mut MapData, K, V> =
        HashMap::try_from(new).context("the new table is no hash table")?;
    let (mut added, mut lost) = (0, 0);
    for entry in old.iter() {
        // An entry removed while the walk runs is simply not there.
        let Ok((key, value)) = entry else {
            continue;
        };
        match new.insert(key, value, BPF_NOEXIST) {
            Ok(()) => added += 1,
            Err(MapError::SyscallError(e)) => match e.io_error.raw_os_error() {
                Some(libc::EEXIST) => {}
                Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => lost += 1,
                _ => return Err(MapError::SyscallError(e).into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Ok((added, lost))
}
