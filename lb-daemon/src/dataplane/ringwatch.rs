//! Binding the ring watch to the running kernel.
//!
//! The ring watch (`lb_common::egress`) is a raw tracepoint program on
//! `xdp_devmap_xmit`: the kernel hands it the target device as a `struct
//! net_device *` and the frames a device map flush dropped. It needs facts
//! the kernel's BTF holds: where `ifindex` sits in `struct net_device`, and
//! where the device's namespace and that namespace's inode number are (they
//! change from build to build; the tracepoint fires in every namespace,
//! and an ifindex means something only in its own), and that the
//! tracepoint still takes its arguments in the order the program reads
//! them. This module finds them in `/sys/kernel/btf/vmlinux` (`btf`), and
//! says plainly when it cannot: lb then forwards as before, without the
//! watch.
//!
//! Owns that reading and nothing else; `dataplane` loads and attaches.

use std::os::unix::fs::MetadataExt;

use anyhow::{ensure, Context, Result};
use lb_common::egress::{
    RingBinding, RING_ARG_DROPS, RING_ARG_ERR, RING_ARG_TO_DEV, RING_TRACEPOINT,
};

use super::btf::{Btf, VMLINUX};

/// The ring watch's binding to this kernel and to lbd's network namespace.
pub fn bind() -> Result<RingBinding> {
    let data = std::fs::read(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let netns = std::fs::metadata("/proc/self/ns/net")
        .context("reading lbd's network namespace (/proc/self/ns/net)")?
        .ino();
    Ok(RingBinding {
        netns: u32::try_from(netns).context("a network namespace inode beyond 32 bits")?,
        ..bind_to(&data)?
    })
}

/// As [`bind`], on BTF `data`, without the namespace.
pub fn bind_to(data: &[u8]) -> Result<RingBinding> {
    let btf = Btf::parse(data)?;
    let params = btf
        .tracepoint_params(RING_TRACEPOINT)
        .with_context(|| format!("no tracepoint {RING_TRACEPOINT} in the kernel's BTF"))?;
    // A raw tracepoint's arguments are its prototype's after `__data`.
    let at = |i: usize| params.get(i + 1);
    let is = |i: usize, name: &str, ok: &dyn Fn(u32) -> bool| {
        at(i).is_some_and(|(n, ty)| (n.is_empty() || n == name) && ok(*ty))
    };
    let device = |ty: u32| btf.points_to(ty, "net_device");
    let int = |ty: u32| btf.int_size(ty) == Some(4);
    ensure!(
        is(RING_ARG_TO_DEV, "to_dev", &device)
            && is(RING_ARG_DROPS, "drops", &int)
            && is(RING_ARG_ERR, "err", &int),
        "tracepoint {RING_TRACEPOINT} takes ({}), not to_dev, drops and err where lb reads them",
        params
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let field = |strukt: &str, path: &[&str], ok: &dyn Fn(u32) -> bool, what: &str| {
        let (offset, ty) = btf.member(strukt, path).with_context(|| {
            format!(
                "struct {strukt} has no {} in the kernel's BTF",
                path.join(".")
            )
        })?;
        ensure!(
            ok(ty) && offset > 0 && offset % 4 == 0,
            "struct {strukt}'s {} is not {what} (at byte {offset})",
            path.join(".")
        );
        Ok(offset)
    };
    Ok(RingBinding {
        ifindex: field("net_device", &["ifindex"], &int, "a 32-bit integer")?,
        net: field(
            "net_device",
            &["nd_net", "net"],
            &|ty| btf.points_to(ty, "net"),
            "a struct net pointer",
        )?,
        inum: field("net", &["ns", "inum"], &int, "a 32-bit integer")?,
        netns: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::btf::{kind, tests::Blob};

    /// int (1), net_device (2: a forward declaration, then 3: the struct,
    /// its ifindex inside an anonymous union at byte 8, at byte 4 of it,
    /// and `nd_net` at byte 16, a struct (11) of one `net` pointer (12) to
    /// struct net (13), whose `ns` at byte 8 is a struct (14) with `inum`
    /// at byte 24), the union (4), a pointer to net_device (5), the
    /// tracepoint's prototype (6) with `params`, the pointer to it (7),
    /// its typedef (8).
    fn kernel(params: &[&str]) -> Vec<u8> {
        with_names(params, false)
    }

    /// As `kernel`, the typedef's prototype without names; with `func`,
    /// also `__bpf_trace_xdp_devmap_xmit` (9), whose prototype (10) has
    /// them.
    fn with_names(params: &[&str], func: bool) -> Vec<u8> {
        let mut b = Blob::new();
        b.ty(kind::INT, "int", 0, 4);
        b.words(&[32]);
        b.ty(7, "net_device", 0, 0);
        b.ty(kind::STRUCT, "net_device", 3, 2496);
        let (pad, nd_net) = (b.s("state"), b.s("nd_net"));
        b.words(&[pad, 1, 0, 0, 4, 64, nd_net, 11, 128]);
        b.ty(kind::UNION, "", 2, 8);
        let (name, ifindex) = (b.s("name"), b.s("ifindex"));
        b.words(&[name, 1, 0, ifindex, 1, 32]);
        b.ty(kind::PTR, "", 0, 3);
        let types = |p: &str| match p {
            "from_dev" | "to_dev" => 5,
            _ => 1,
        };
        b.ty(kind::FUNC_PROTO, "", params.len() as u32, 0);
        for p in params {
            let n = if func { 0 } else { b.s(p) };
            b.words(&[n, types(p)]);
        }
        b.ty(kind::PTR, "", 0, 6);
        b.ty(kind::TYPEDEF, "btf_trace_xdp_devmap_xmit", 0, 7);
        // 9 and 10, as placeholders when there is no named prototype.
        let func_name = if func {
            "__bpf_trace_xdp_devmap_xmit"
        } else {
            ""
        };
        b.ty(kind::FUNC, func_name, 0, 10);
        b.ty(
            kind::FUNC_PROTO,
            "",
            if func { params.len() as u32 } else { 0 },
            0,
        );
        if func {
            for p in params {
                let n = b.s(p);
                b.words(&[n, types(p)]);
            }
        }
        b.ty(kind::STRUCT, "", 1, 8);
        let net = b.s("net");
        b.words(&[net, 12, 0]);
        b.ty(kind::PTR, "", 0, 13);
        b.ty(kind::STRUCT, "net", 1, 128);
        let ns = b.s("ns");
        b.words(&[ns, 14, 64]);
        b.ty(kind::STRUCT, "ns_common", 1, 64);
        let inum = b.s("inum");
        b.words(&[inum, 1, 192]);
        b.bytes()
    }

    const PARAMS: [&str; 6] = ["__data", "from_dev", "to_dev", "sent", "drops", "err"];

    #[test]
    fn finds_ifindex_the_namespace_and_its_inode() {
        let want = RingBinding {
            ifindex: 12,
            net: 16,
            inum: 32,
            netns: 0,
        };
        assert_eq!(bind_to(&kernel(&PARAMS)).ok(), Some(want));
        // As the kernel has it: names only on __bpf_trace_'s prototype.
        assert_eq!(bind_to(&with_names(&PARAMS, true)).ok(), Some(want));
    }

    #[test]
    fn refuses_to_dev_and_from_dev_swapped() {
        let swapped = ["__data", "to_dev", "from_dev", "sent", "drops", "err"];
        assert!(bind_to(&with_names(&swapped, true)).is_err());
    }

    #[test]
    fn refuses_a_tracepoint_with_other_arguments() {
        // Before Linux 5.8: (map_id, map_index, sent, drops, from_dev, to_dev, err).
        let old = [
            "__data",
            "map_id",
            "map_index",
            "sent",
            "drops",
            "from_dev",
            "to_dev",
            "err",
        ];
        let e = bind_to(&kernel(&old)).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("not to_dev, drops and err")),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(bind_to(b"not btf at all, and long enough").is_err());
        let mut cut = kernel(&PARAMS);
        cut.truncate(40);
        assert!(bind_to(&cut).is_err());
    }
}
