//! `cargo xtask build`: the XDP object and the user-space binaries.
//!
//! lb-daemon's build script builds lb-ebpf with the pinned nightly and
//! embeds the object in lbd, so one cargo invocation does both.

use std::path::PathBuf;

use anyhow::Result;

use crate::{cmd, root};

/// Build lbd and lbctl in release mode; returns the directory they are in.
pub fn release() -> Result<PathBuf> {
    crate::setup::run()?;
    cmd(
        "cargo",
        &["build", "--release", "--package", "lb-daemon", "--bins"],
    )?;
    let dir = root().join("target/release");
    println!(
        "build: {} and {} (the XDP object is embedded in lbd)",
        dir.join("lbd").display(),
        dir.join("lbctl").display()
    );
    Ok(dir)
}
