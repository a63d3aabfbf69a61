//! Binding the data plane's kfunc calls to the running kernel.
//!
//! The XDP object calls kernel functions (the conntrack lookup, the
//! conntrack writes of a hand-over) through placeholder instructions
//! (`lb_common::kfunc`); before it is loaded, each becomes a call of that
//! function's id in this kernel's BTF, or, where the kernel lacks it,
//! "found nothing" (the conntrack lookup, a hand-over's allocation), or a
//! refusal to load (the numeric iterator, which lb cannot do without).
//! The hand-over's store into a new connection's `mark` gets the member's
//! offset in this kernel's `struct nf_conn`, or, where the BTF does not
//! say, becomes a no-op, with the hand-over off. Owns that step and what
//! it found, for the logs. It never changes what a program does besides
//! those instructions.

use anyhow::{Context, Result};
use aya_obj::btf::{Btf as KernelBtf, BtfKind};
use lb_common::kfunc::{self, Binding, CONN_MARK_PLACEHOLDER, HAND_OVER, HAND_OVER_CALLS};

use super::btf::{Btf, VMLINUX};

/// The object bound to this kernel, and what it lacks.
pub struct Bound {
    pub object: Vec<u8>,
    /// The kfuncs the kernel lacks (their calls find nothing).
    pub absent: Vec<&'static str>,
    /// Why a UDP datagram too big for its uplink without DF cannot be
    /// handed to the kernel with its flow's translation here (the
    /// kernel's slow path translates it instead), if it cannot.
    pub no_hand_over: Option<String>,
}

/// The object with every kfunc call bound to this kernel.
pub fn bind(object: &[u8]) -> Result<Bound> {
    let btf = KernelBtf::from_sys_fs();
    if let Err(e) = &btf {
        log::warn!("reading the kernel's BTF ({VMLINUX}): {e}");
    }
    let bindings: Vec<(u32, &'static str, Binding)> = kfunc::ALL
        .iter()
        .map(|&(placeholder, name)| {
            let id = btf
                .as_ref()
                .ok()
                .and_then(|btf| btf.id_by_type_name_kind(name, BtfKind::Func).ok());
            (
                placeholder,
                name,
                id.map_or(Binding::Absent, Binding::Kernel),
            )
        })
        .collect();
    let absent: Vec<&'static str> = bindings
        .iter()
        .filter(|(_, _, b)| *b == Binding::Absent)
        .map(|&(_, name, _)| name)
        .collect();
    // Without the numeric iterator the fallback buckets and the NAT port
    // search would make no turn: every new flow would be dropped. Better
    // to refuse to start, saying why.
    if let Some(name) = absent.iter().find(|n| kfunc::REQUIRED.contains(n)) {
        anyhow::bail!(
            "this kernel lacks {name} (Linux 6.4 and later have it, with BTF at \
             {VMLINUX}); lb's data plane cannot run without it"
        );
    }
    let missing: Vec<&str> = HAND_OVER
        .iter()
        .copied()
        .filter(|name| absent.contains(name))
        .collect();
    let mark = if missing.is_empty() {
        conn_mark_offset()
    } else {
        Err(format!("this kernel lacks {}", missing.join(" and ")))
    };
    let mut bound = object.to_vec();
    apply(&mut bound, &bindings, mark.as_ref().ok().copied())?;
    Ok(Bound {
        object: bound,
        absent,
        no_hand_over: mark.err(),
    })
}

/// Rewrite `object`'s placeholders as `bindings` say, and the hand-over's
/// store into `mark` to `mark` (its offset). Without it, the store does
/// nothing and the calls that make a hand-over (`HAND_OVER_CALLS`) find
/// nothing, whatever their bindings: the hand-over is never made, and
/// conntrack is left as the data plane finds it (an allocated connection
/// left uninserted would be refused by the verifier).
fn apply(object: &mut [u8], bindings: &[(u32, &str, Binding)], mark: Option<u16>) -> Result<()> {
    for &(placeholder, name, binding) in bindings {
        let binding = match mark {
            None if HAND_OVER_CALLS.contains(&placeholder) => Binding::Absent,
            _ => binding,
        };
        let calls = kfunc::bind(object, placeholder, binding);
        anyhow::ensure!(
            calls > 0,
            "the XDP object has no call of {name} to bind (was it built from this source?)"
        );
    }
    anyhow::ensure!(
        kfunc::bind_store(object, CONN_MARK_PLACEHOLDER, mark) > 0,
        "the XDP object has no store into a connection's mark to bind (was it built from this \
         source?)"
    );
    Ok(())
}

/// Where `struct nf_conn` keeps its `mark` in this kernel.
fn conn_mark_offset() -> Result<u16, String> {
    let data = std::fs::read(VMLINUX)
        .with_context(|| format!("reading {VMLINUX}"))
        .map_err(|e| format!("{e:#}"))?;
    mark_offset_in(&data).map_err(|e| format!("{e:#}"))
}

/// [`conn_mark_offset`] in BTF `data`.
fn mark_offset_in(data: &[u8]) -> Result<u16> {
    let btf = Btf::parse(data)?;
    let (offset, ty) = btf.member("nf_conn", &["mark"]).context(
        "the kernel's struct nf_conn has no mark (a kernel without CONFIG_NF_CONNTRACK_MARK)",
    )?;
    anyhow::ensure!(
        btf.int_size(ty) == Some(4),
        "the kernel's struct nf_conn has a mark that is not a 32-bit integer"
    );
    u16::try_from(offset)
        .ok()
        .filter(|&o| o > 0 && o < i16::MAX as u16)
        .with_context(|| format!("struct nf_conn's mark at byte {offset}, beyond a store's reach"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::btf::{kind, tests::Blob};

    /// int (1), and struct nf_conn (2) with `status` and, at byte 136,
    /// `mark` (of type `mark_type`).
    fn nf_conn(mark_type: u32) -> Vec<u8> {
        let mut b = Blob::new();
        b.ty(kind::INT, "int", 0, 4);
        b.words(&[32]);
        b.ty(kind::STRUCT, "nf_conn", 2, 256);
        let (status, mark) = (b.s("status"), b.s("mark"));
        b.words(&[status, 1, 64, mark, mark_type, 136 * 8]);
        b.bytes()
    }

    #[test]
    fn finds_where_a_connection_keeps_its_mark() {
        assert_eq!(mark_offset_in(&nf_conn(1)).ok(), Some(136));
        // Not an integer: refused, not guessed at.
        assert!(mark_offset_in(&nf_conn(2)).is_err());
    }

    #[test]
    fn without_the_marks_offset_the_hand_over_is_never_made() {
        use lb_common::kfunc::{CT_ALLOC_PLACEHOLDER, CT_LOOKUP_PLACEHOLDER};
        let lookup = kfunc::kfunc_call(CT_LOOKUP_PLACEHOLDER);
        let alloc = kfunc::kfunc_call(CT_ALLOC_PLACEHOLDER);
        let store = [kfunc::STORE_W_OPCODE, 0x16, 0x62, 0x6c, 0, 0, 0, 0];
        let bindings = [
            (
                CT_LOOKUP_PLACEHOLDER,
                "bpf_xdp_ct_lookup",
                Binding::Kernel(6),
            ),
            (CT_ALLOC_PLACEHOLDER, "bpf_xdp_ct_alloc", Binding::Kernel(7)),
        ];
        let mut object = [lookup, alloc, store].concat();
        apply(&mut object, &bindings, Some(136)).expect("bound");
        assert_eq!(object[8..16], kfunc::kfunc_call(7));
        assert_eq!(object[16..], [0x63, 0x16, 136, 0, 0, 0, 0, 0]);
        let mut object = [lookup, alloc, store].concat();
        apply(&mut object, &bindings, None).expect("bound");
        // The lookup is still asked; `r0 = 0`: the allocation finds
        // nothing; the store does nothing.
        assert_eq!(object[..8], kfunc::kfunc_call(6));
        assert_eq!(object[8..16], [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(object[16..], [0x05, 0, 0, 0, 0, 0, 0, 0]);
        // An object without the store was not built from this source.
        let mut object = [lookup, alloc].concat();
        assert!(apply(&mut object, &bindings, None).is_err());
    }
}
