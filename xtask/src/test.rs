//! `cargo xtask test`: everything CI runs, in order of cost: formatting,
//! lints, unit tests, BPF test-run tests, then the namespace lab tests.
//! A test whose prerequisite is missing fails here, naming it
//! ([`lb_tests::REQUIRE_PREREQUISITES`]); it never passes by skipping.

use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::{cmd, root};

pub fn run() -> Result<()> {
    crate::setup::run()?;
    println!("test: formatting");
    cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    println!("test: clippy");
    cmd(
        "cargo",
        &[
            "clippy",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // Lab tests start the daemon from target/debug; build it first.
    cmd("cargo", &["build", "--package", "lb-daemon", "--bins"])?;
    println!("test: unit, BPF test-run and lab tests");
    // Every test binary runs, whatever an earlier one said; a test whose
    // prerequisite (root, a lab's tool) is missing fails instead of
    // skipping.
    let status = Command::new("cargo")
        .args(["test", "--no-fail-fast", "--", "--test-threads", "2"])
        .env(lb_tests::REQUIRE_PREREQUISITES, "1")
        .current_dir(root())
        .status()
        .context("could not start cargo")?;
    ensure!(
        status.success(),
        "`cargo test --no-fail-fast` failed ({status}): see the failures above"
    );
    // The benchmark's own tests (its frames and stamps), with the feature
    // that builds it.
    cmd(
        "cargo",
        &["test", "--package", "xtask", "--features", "bench"],
    )?;
    println!("test: the Debian package");
    let deb = crate::dist::build()?;
    crate::dist::check(&deb)?;
    println!("test: all passed");
    Ok(())
}
