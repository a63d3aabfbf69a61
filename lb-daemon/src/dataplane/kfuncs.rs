//! Binding the data plane's kfunc calls to the running kernel.
//!
//! The XDP object calls kernel functions (the conntrack lookup) through
//! placeholder instructions (`lb_common::kfunc`); before it is loaded,
//! each becomes a call of that function's id in this kernel's BTF, or,
//! where the kernel lacks it, "found nothing" (the conntrack lookup), or
//! a refusal to load (the numeric iterator, which lb cannot do without).
//! Owns that step and what it
//! found, for the logs and `lbctl status`. It never changes what a
//! program does besides those instructions.

use anyhow::Result;
use aya_obj::btf::{Btf, BtfKind};
use lb_common::kfunc::{self, Binding};

/// The object with every kfunc call bound to this kernel, and the names
/// of the kfuncs the kernel lacks (their calls find nothing).
pub fn bind(object: &[u8]) -> Result<(Vec<u8>, Vec<&'static str>)> {
    let btf = Btf::from_sys_fs();
    let mut bound = object.to_vec();
    let mut absent = Vec::new();
    for (placeholder, name) in kfunc::ALL {
        let binding = match &btf {
            Ok(btf) => match btf.id_by_type_name_kind(name, BtfKind::Func) {
                Ok(id) => Binding::Kernel(id),
                Err(_) => Binding::Absent,
            },
            Err(_) => Binding::Absent,
        };
        if binding == Binding::Absent {
            absent.push(name);
        }
        let calls = kfunc::bind(&mut bound, placeholder, binding);
        anyhow::ensure!(
            calls > 0,
            "the XDP object has no call of {name} to bind (was it built from this source?)"
        );
    }
    if let Err(e) = &btf {
        log::warn!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}");
    }
    // Without the numeric iterator the fallback buckets and the NAT port
    // search would make no turn: every new flow would be dropped. Better
    // to refuse to start, saying why.
    if let Some(name) = absent.iter().find(|n| kfunc::REQUIRED.contains(n)) {
        anyhow::bail!(
            "this kernel lacks {name} (Linux 6.4 and later have it, with BTF at \
             /sys/kernel/btf/vmlinux); lb's data plane cannot run without it"
        );
    }
    Ok((bound, absent))
}
