//! Many map entries in one system call: `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (Linux 5.6), which aya 0.14 does not offer.
//!
//! A million-prefix file is a million trie entries; one `bpf()` call each
//! spends more time entering the kernel than inserting. The kernel walks a
//! batch element by element, with the same checks as one update each, and
//! says how many it did, so a failure names the entry it stopped at. This
//! module only moves bytes: what the entries mean is the caller's.

use std::{io, os::fd::AsRawFd};

use aya::Pod;

/// `enum bpf_cmd` values.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per call: large enough that the calls cost nothing, small
/// enough that the kernel's copy of the keys and values stays small.
const CHUNK: usize = 16 * 1024;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch stopped at entry `done` (of the whole slice).
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: io::Error,
}

/// Write `keys[i]` -> `values[i]` into the map `fd` (any flags: insert
/// or replace).
pub fn update<K: Pod, V: Pod>(
    fd: &impl AsRawFd,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    run(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values))
}

/// Remove `keys` from the map `fd`. Every key must be there.
pub fn delete<K: Pod>(fd: &impl AsRawFd, keys: &[K]) -> Result<(), BatchError> {
    run::<K, u8>(BPF_MAP_DELETE_BATCH, fd, keys, None)
}

/// `cmd` on `keys` (and `values`, as many), a chunk a call.
fn run<K: Pod, V: Pod>(
    cmd: libc::c_long,
    fd: &impl AsRawFd,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), BatchError> {
    let mut done = 0;
    for (i, chunk) in keys.chunks(CHUNK).enumerate() {
        let values = values.map_or(0, |v| v[i * CHUNK..].as_ptr() as u64);
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            values,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed;
        // its pointers point at `count` keys (and values) borrowed for
        // the call, of the map's key and value sizes (checked by the
        // kernel against the map: a wrong size is EINVAL, never a stray
        // read).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            // On failure the kernel says how many of this call it did.
            return Err(BatchError {
                done: done + attr.count as usize,
                error: io::Error::last_os_error(),
            });
        }
        done += attr.count as usize;
    }
    Ok(())
}
