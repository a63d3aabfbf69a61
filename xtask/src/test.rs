//! `cargo xtask test`: everything CI runs, in order of cost: formatting,
//! lints, unit tests, BPF test-run tests, then the namespace lab tests.

use anyhow::Result;

use crate::cmd;

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
    cmd("cargo", &["test", "--", "--test-threads", "2"])?;
    println!("test: the Debian package");
    let deb = crate::dist::build()?;
    crate::dist::check(&deb)?;
    println!("test: all passed");
    Ok(())
}
