//! `cargo xtask`: the single front door for building, trying and testing lb.
//!
//! Each subcommand lives in its own module; this file only parses the
//! command line. See the README for what each one does.

mod bench;
mod build;
mod dist;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test lb", disable_version_flag = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: the pinned nightly with rust-src, bpf-linker,
    /// the Debian packages the labs use, and a bpffs mount.
    Setup,
    /// Build the XDP object and the lbd/lbctl binaries (release).
    Build,
    /// Build the Debian package (target/dist/lb_VERSION_ARCH.deb): lbd,
    /// lbctl, the systemd unit, man pages and completions.
    Dist,
    /// Build, bring up the lab, start lbd in it, and wait for Ctrl-C.
    Run {
        /// Lab file from tests/labs (without .toml).
        #[arg(long, default_value = run::DEFAULT_LAB)]
        lab: String,
    },
    /// Bring the interactive lab up or down, without the daemon.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Everything CI runs: fmt, clippy, unit, BPF test-run and lab tests.
    Test,
    /// Per-packet cost, lab forwarding rate against the kernel's way, and
    /// failover time against a Netwatch-style script; writes BENCHMARKS.md.
    Bench(bench::Args),
}

#[derive(Subcommand)]
enum LabAction {
    /// Bring the lab up (namespaces named lb-*).
    Up {
        #[arg(long, default_value = run::DEFAULT_LAB)]
        lab: String,
    },
    /// Tear the lab down; safe to run twice or after a crash.
    Down,
    /// Fail an ISP in the running lab, to watch lb fail over (`lbctl
    /// status`, `lbctl events --follow`): `upstream` cuts the ISP from the
    /// internet while its gateway still answers; `carrier` takes the
    /// router's uplink's carrier away.
    Fail {
        /// isp1, isp2, ...
        isp: String,
        #[arg(value_enum, default_value = "upstream")]
        how: run::Failure,
    },
    /// Undo `lab fail`: the ISP's links come back up.
    Restore { isp: String },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Setup => setup::run(),
        Command::Build => build::release().map(|_| ()),
        Command::Dist => dist::build().map(|_| ()),
        Command::Run { lab } => run::run(&lab),
        Command::Lab {
            action: LabAction::Up { lab },
        } => run::lab_up(&lab),
        Command::Lab {
            action: LabAction::Down,
        } => run::lab_down(),
        Command::Lab {
            action: LabAction::Fail { isp, how },
        } => run::lab_fail(&isp, how),
        Command::Lab {
            action: LabAction::Restore { isp },
        } => run::lab_restore(&isp),
        Command::Test => test::run(),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Run a command in the workspace root, failing with its name if it fails.
pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    use anyhow::Context;
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("could not start {program}"))?;
    anyhow::ensure!(
        status.success(),
        "`{program} {}` failed ({status})",
        args.join(" ")
    );
    Ok(())
}
