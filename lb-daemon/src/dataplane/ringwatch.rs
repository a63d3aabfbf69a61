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
//! them. This module finds them in `/sys/kernel/btf/vmlinux` with a reader
//! of its own (aya's BTF parser does not say where a member is), and says
//! plainly when it cannot: lb then forwards as before, without the watch.
//!
//! Owns that reading and nothing else; `dataplane` loads and attaches.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt};

use anyhow::{bail, ensure, Context, Result};
use lb_common::egress::{RingBinding, RING_ARG_DROPS, RING_ARG_TO_DEV, RING_TRACEPOINT};

/// Where the kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

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
        is(RING_ARG_TO_DEV, "to_dev", &device) && is(RING_ARG_DROPS, "drops", &int),
        "tracepoint {RING_TRACEPOINT} takes ({}), not to_dev and drops where lb reads them",
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

const MAGIC: u16 = 0xeb9f;

/// BTF kinds this reader needs by name, and those whose trailing data it
/// must skip.
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// One type: its kind, name, size or referenced type, and its members
/// (struct, union) or parameters (function prototype) as (name, type,
/// offset in bits).
#[derive(Debug, Default)]
struct Type {
    kind: u32,
    name: u32,
    size_or_type: u32,
    members: Vec<(u32, u32, u32)>,
}

/// The parts of a BTF blob this module reads. Type ids start at 1.
struct Btf<'a> {
    strings: &'a [u8],
    types: Vec<Type>,
    by_name: BTreeMap<&'a [u8], Vec<u32>>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let b = data
        .get(at..at + 4)
        .context("the kernel's BTF is cut short")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(
            data.len() >= 24 && u16::from_le_bytes([data[0], data[1]]) == MAGIC,
            "not little-endian BTF"
        );
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .context("the kernel's BTF has a section past its end")
        };
        let (types_data, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut btf = Btf {
            strings,
            types: vec![Type::default()],
            by_name: BTreeMap::new(),
        };
        let mut at = 0;
        while at < types_data.len() {
            let (name, info, size_or_type) = (
                u32_at(types_data, at)?,
                u32_at(types_data, at + 4)?,
                u32_at(types_data, at + 8)?,
            );
            at += 12;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let bitfields = info >> 31 == 1;
            let mut t = Type {
                kind,
                name,
                size_or_type,
                members: Vec::new(),
            };
            match kind {
                kind::STRUCT | kind::UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(types_data, at + 8)?;
                        // With kind_flag the offset's top byte is the
                        // bitfield's size.
                        let offset = if bitfields {
                            offset & 0xff_ffff
                        } else {
                            offset
                        };
                        t.members.push((
                            u32_at(types_data, at)?,
                            u32_at(types_data, at + 4)?,
                            offset,
                        ));
                        at += 12;
                    }
                }
                kind::FUNC_PROTO => {
                    for _ in 0..vlen {
                        t.members
                            .push((u32_at(types_data, at)?, u32_at(types_data, at + 4)?, 0));
                        at += 8;
                    }
                }
                kind::INT | kind::VAR | kind::DECL_TAG => at += 4,
                kind::ARRAY => at += 12,
                kind::ENUM => at += 8 * vlen,
                kind::DATASEC | kind::ENUM64 => at += 12 * vlen,
                0 => bail!("BTF type {} has kind 0", btf.types.len()),
                _ if kind > kind::ENUM64 => {
                    bail!(
                        "BTF type {} has kind {kind}, newer than this reader",
                        btf.types.len()
                    )
                }
                _ => {}
            }
            let id = btf.types.len() as u32;
            let name = btf.name(name);
            if !name.is_empty() {
                btf.by_name.entry(name).or_default().push(id);
            }
            btf.types.push(t);
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &'a [u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize).filter(|_| id != 0)
    }

    /// The first type of kind `kind` named `name` (with members, for a
    /// struct: forward declarations have none).
    fn named(&self, name: &str, kind: u32) -> Option<&Type> {
        self.by_name
            .get(name.as_bytes())?
            .iter()
            .filter_map(|&id| self.get(id))
            .find(|t| t.kind == kind && (kind != kind::STRUCT || !t.members.is_empty()))
    }

    /// `id` without typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The byte offset and type of member `path` of struct `name` (a
    /// member of a member, ...), looking into anonymous structs and unions
    /// on the way.
    fn member(&self, name: &str, path: &[&str]) -> Option<(u32, u32)> {
        let mut t = self.named(name, kind::STRUCT)?;
        let (mut bits, mut ty) = (0, 0);
        for (i, step) in path.iter().enumerate() {
            if i > 0 {
                t = self
                    .resolve(ty)
                    .filter(|t| matches!(t.kind, kind::STRUCT | kind::UNION))?;
            }
            let (at, found) = self.find_member(t, step.as_bytes())?;
            bits += at;
            ty = found;
        }
        (bits % 8 == 0).then_some((bits / 8, ty))
    }

    /// Member `member` of `t` (in it, or in one of its anonymous members):
    /// its offset in bits from `t`'s start, and its type.
    fn find_member(&self, t: &Type, member: &[u8]) -> Option<(u32, u32)> {
        for &(name, ty, bits) in &t.members {
            if self.name(name) == member {
                return Some((bits, ty));
            }
            if name == 0 {
                let inner = self
                    .resolve(ty)
                    .filter(|i| matches!(i.kind, kind::STRUCT | kind::UNION));
                if let Some((at, found)) = inner.and_then(|i| self.find_member(i, member)) {
                    return Some((bits + at, found));
                }
            }
        }
        None
    }

    /// Whether `ty` is a pointer to (a qualified) struct `name`.
    fn points_to(&self, ty: u32, name: &str) -> bool {
        self.resolve(ty)
            .filter(|t| t.kind == kind::PTR)
            .and_then(|t| self.resolve(t.size_or_type))
            .is_some_and(|t| t.kind == kind::STRUCT && self.name(t.name) == name.as_bytes())
    }

    /// The size of integer type `ty`, through typedefs and qualifiers.
    fn int_size(&self, ty: u32) -> Option<u32> {
        self.resolve(ty)
            .filter(|t| t.kind == kind::INT)
            .map(|t| t.size_or_type)
    }

    /// The parameters (name, type) of tracepoint `name`, `__data` first:
    /// from the prototype of the kernel's `__bpf_trace_NAME`, which names
    /// them, or else of its `btf_trace_NAME` typedef (a pointer to a
    /// prototype without names).
    fn tracepoint_params(&self, name: &str) -> Option<Vec<(String, u32)>> {
        let named = self
            .named(&format!("__bpf_trace_{name}"), kind::FUNC)
            .map(|f| f.size_or_type);
        let typedef = || {
            let t = self.named(&format!("btf_trace_{name}"), kind::TYPEDEF)?;
            let ptr = self.get(t.size_or_type).filter(|t| t.kind == kind::PTR)?;
            Some(ptr.size_or_type)
        };
        let proto = self
            .get(named.or_else(typedef)?)
            .filter(|t| t.kind == kind::FUNC_PROTO)?;
        Some(
            proto
                .members
                .iter()
                .map(|&(n, ty, _)| (String::from_utf8_lossy(self.name(n)).into_owned(), ty))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob written by hand: types in order (ids from 1), strings.
    #[derive(Default)]
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Blob {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            at
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        fn ty(&mut self, kind: u32, name: &str, vlen: u32, size_or_type: u32) {
            let n = self.s(name);
            self.words(&[n, kind << 24 | vlen, size_or_type]);
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

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
                .is_some_and(|e| e.contains("not to_dev and drops")),
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
