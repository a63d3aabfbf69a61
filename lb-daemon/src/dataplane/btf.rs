//! A reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`) for the few
//! facts the data plane is bound with at load: where a member of a kernel
//! struct is, and what a tracepoint takes. aya's BTF parser does not say
//! where a member is; this one reads only what those questions need, and
//! refuses a blob it cannot follow rather than guess.
//!
//! Owns the reading; `ringwatch` and `kfuncs` ask their questions of it.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

/// Where the kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

/// BTF kinds this reader needs by name, and those whose trailing data it
/// must skip.
pub mod kind {
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
pub struct Btf<'a> {
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
    pub fn parse(data: &'a [u8]) -> Result<Self> {
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
    pub fn member(&self, name: &str, path: &[&str]) -> Option<(u32, u32)> {
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
    pub fn points_to(&self, ty: u32, name: &str) -> bool {
        self.resolve(ty)
            .filter(|t| t.kind == kind::PTR)
            .and_then(|t| self.resolve(t.size_or_type))
            .is_some_and(|t| t.kind == kind::STRUCT && self.name(t.name) == name.as_bytes())
    }

    /// The size of integer type `ty`, through typedefs and qualifiers.
    pub fn int_size(&self, ty: u32) -> Option<u32> {
        self.resolve(ty)
            .filter(|t| t.kind == kind::INT)
            .map(|t| t.size_or_type)
    }

    /// The parameters (name, type) of tracepoint `name`, `__data` first:
    /// from the prototype of the kernel's `__bpf_trace_NAME`, which names
    /// them, or else of its `btf_trace_NAME` typedef (a pointer to a
    /// prototype without names).
    pub fn tracepoint_params(&self, name: &str) -> Option<Vec<(String, u32)>> {
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
pub mod tests {
    use super::*;

    /// A BTF blob written by hand: types in order (ids from 1), strings.
    #[derive(Default)]
    pub struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        pub fn new() -> Self {
            Blob {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        pub fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            at
        }

        pub fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        pub fn ty(&mut self, kind: u32, name: &str, vlen: u32, size_or_type: u32) {
            let n = self.s(name);
            self.words(&[n, kind << 24 | vlen, size_or_type]);
        }

        pub fn bytes(&self) -> Vec<u8> {
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
}
