//! Someone else's XDP program on a lab interface: what an operator's own
//! filter (xdp-filter, a DDoS guard) looks like to lbd. The smallest one
//! there is (every frame passes), loaded and attached with the kernel's
//! own calls (a `bpf_link`), so the tests need no object file and no tool.
//!
//! Owns the attachment for as long as the value lives: dropping it
//! detaches the program, also when a test fails.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};

use crate::{netns::in_netns, Lab};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// Generic (skb) mode: the kernel then refuses anyone else's program on
/// the device in either mode.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `r0 = XDP_PASS (2)`, then `exit`.
const PASS_ALL: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];

/// An XDP program that passes every frame, attached to a lab interface.
pub struct ForeignXdp {
    _link: OwnedFd,
}

impl ForeignXdp {
    /// Attach it to `host`'s `dev`.
    pub fn attach(lab: &Lab, host: &str, dev: &str) -> Result<ForeignXdp> {
        let ns = lab.ns(host)?.to_owned();
        let name = CString::new(dev).context("an interface name with a NUL")?;
        let link = in_netns(&ns, || {
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            anyhow::ensure!(ifindex != 0, "no interface {dev} on {host}");
            let prog = load()?;
            let mut attr = [0u32; 32];
            attr[0] = prog.as_raw_fd() as u32;
            attr[1] = ifindex;
            attr[2] = BPF_XDP;
            attr[3] = XDP_FLAGS_SKB_MODE;
            bpf(BPF_LINK_CREATE, &mut attr)
                .with_context(|| format!("attaching an XDP program to {host}:{dev}"))
        })?;
        Ok(ForeignXdp { _link: link })
    }
}

fn load() -> Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u32; 32];
    attr[0] = BPF_PROG_TYPE_XDP;
    attr[1] = PASS_ALL.len() as u32;
    let insns = PASS_ALL.as_ptr() as u64;
    (attr[2], attr[3]) = (insns as u32, (insns >> 32) as u32);
    let license = license.as_ptr() as u64;
    (attr[4], attr[5]) = (license as u32, (license >> 32) as u32);
    // expected_attach_type, after log_*, kern_version, prog_flags,
    // prog_name[16] and prog_ifindex.
    attr[17] = BPF_XDP;
    bpf(BPF_PROG_LOAD, &mut attr).context("loading a pass-all XDP program")
}

/// The `bpf` system call with `attr` (zeroed past what the command reads),
/// for the file descriptor it returns.
fn bpf(cmd: libc::c_long, attr: &mut [u32; 32]) -> Result<OwnedFd> {
    // SAFETY: `attr` is a valid, writable `bpf_attr` of the size given,
    // and the pointers in it outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the kernel just returned this new descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
