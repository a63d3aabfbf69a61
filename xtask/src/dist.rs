//! `cargo xtask dist`: the Debian package (`target/dist/lb_VERSION_ARCH.deb`)
//! and, for `cargo xtask test`, the check that it installs and works.
//!
//! The package is staged as a plain tree and built with `dpkg-deb`, so
//! what goes where is all in this file: the binaries, lbd's systemd unit
//! (lb-daemon/packaging/lbd.service), man pages and completions generated from the
//! clap definitions, and the commented example configuration as the
//! conffile /etc/lb/lbd.toml. Installing enables nothing: lbd changes a
//! router's forwarding only once the operator has edited the file and
//! enabled the unit.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{cmd, root};

const PACKAGE: &str = "lb";
const UNIT: &str = "lib/systemd/system/lbd.service";
/// The configuration, a conffile: an upgrade keeps the operator's edits.
const CONFFILE: &str = "/etc/lb/lbd.toml";

/// Build the package; returns its path.
pub fn build() -> Result<PathBuf> {
    let bin = crate::build::release()?;
    let version = version()?;
    let arch = output("dpkg", &["--print-architecture"])?;
    let dist = root().join("target/dist");
    let stage = dist.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("removing the old {}", stage.display()))?;
    }

    install(&bin.join("lbd"), &stage.join("usr/sbin/lbd"), 0o755)?;
    install(&bin.join("lbctl"), &stage.join("usr/bin/lbctl"), 0o755)?;
    install(
        &root().join("lb-daemon/packaging/lbd.service"),
        &stage.join(UNIT),
        0o644,
    )?;
    install(
        &root().join("lb-daemon/examples/lbd.toml"),
        &stage.join(CONFFILE.trim_start_matches('/')),
        0o644,
    )?;
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    install(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    write(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: lb\n\nFiles: *\nLicense: MIT or Apache-2.0\n",
        0o644,
    )?;
    docs(&bin, &stage)?;

    let size_kib = du_kib(&stage)?;
    write(
        &stage.join("DEBIAN/control"),
        &format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: lb developers <lb@example.org>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6, iproute2, nftables\n\
             Section: net\n\
             Priority: optional\n\
             Description: multi-WAN load balancing and failover in XDP\n \
             lbd spreads a router's connections over its uplinks in an XDP program,\n \
             NATs and forwards them at line rate, probes every uplink and fails\n \
             over in well under a second. lbctl shows and steers it.\n"
        ),
        0o644,
    )?;
    write(
        &stage.join("DEBIAN/conffiles"),
        &format!("{CONFFILE}\n"),
        0o644,
    )?;
    // An upgrade restarts a running lbd on the new binary; it adopts the
    // pinned data plane, so no flow is dropped. Removal stops lbd and
    // removes what it owns in the kernel: without lbd nothing would fail
    // over or follow address changes.
    write(
        &stage.join("DEBIAN/postinst"),
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then\n\
         \tsystemctl daemon-reload || true\n\
         \tsystemctl try-restart lbd.service || true\n\
         fi\n",
        0o755,
    )?;
    write(
        &stage.join("DEBIAN/prerm"),
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = remove ]; then\n\
         \tif [ -d /run/systemd/system ]; then systemctl stop lbd.service || true; fi\n\
         \tif [ -f /etc/lb/lbd.toml ]; then lbd --teardown --config /etc/lb/lbd.toml || true; fi\n\
         fi\n",
        0o755,
    )?;
    write(
        &stage.join("DEBIAN/postrm"),
        "#!/bin/sh\nset -e\n\
         if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;

    let deb = dist.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let (stage_s, deb_s) = (path_str(&stage)?, path_str(&deb)?);
    cmd(
        "dpkg-deb",
        &["--root-owner-group", "-Zxz", "--build", stage_s, deb_s],
    )?;
    println!("dist: {}", deb.display());
    Ok(deb)
}

/// Man pages (gzipped, as Debian wants) and completions, from the binaries'
/// own clap definitions.
fn docs(bin: &Path, stage: &Path) -> Result<()> {
    let gen = root().join("target/dist/docs");
    if gen.exists() {
        std::fs::remove_dir_all(&gen).with_context(|| format!("removing {}", gen.display()))?;
    }
    let gen_s = path_str(&gen)?;
    cmd(path_str(&bin.join("lbd"))?, &["--generate-docs", gen_s])?;
    cmd(path_str(&bin.join("lbctl"))?, &["generate-docs", gen_s])?;
    for entry in std::fs::read_dir(&gen).with_context(|| format!("reading {}", gen.display()))? {
        let path = entry?.path();
        let Some(section) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !matches!(section, "1" | "8") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let dest = stage.join(format!("usr/share/man/man{section}/{name}"));
        install(&path, &dest, 0o644)?;
        cmd("gzip", &["-9n", path_str(&dest)?])?;
    }
    for name in ["lbd", "lbctl"] {
        let completions = gen.join("completions");
        install(
            &completions.join(format!("bash/{name}.bash")),
            &stage.join(format!("usr/share/bash-completion/completions/{name}")),
            0o644,
        )?;
        install(
            &completions.join(format!("zsh/_{name}")),
            &stage.join(format!("usr/share/zsh/vendor-completions/_{name}")),
            0o644,
        )?;
        install(
            &completions.join(format!("fish/{name}.fish")),
            &stage.join(format!("usr/share/fish/vendor_completions.d/{name}.fish")),
            0o644,
        )?;
    }
    Ok(())
}

/// Install the package on this machine, check what an operator would use,
/// and remove it again (also when a check fails).
pub fn check(deb: &Path) -> Result<()> {
    if Command::new("dpkg")
        .args(["-s", PACKAGE])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!(
            "package {PACKAGE} is already installed here; the package check installs and \
             removes it, so remove it first (dpkg -r {PACKAGE})"
        );
    }
    cmd("dpkg", &["-i", path_str(deb)?])?;
    let checked = check_installed();
    let removed = cmd("dpkg", &["--purge", PACKAGE]);
    checked?;
    removed?;
    for gone in [
        "/usr/sbin/lbd",
        "/usr/bin/lbctl",
        &format!("/{UNIT}"),
        CONFFILE,
    ] {
        ensure!(
            !Path::new(gone).exists(),
            "{gone} is still there after dpkg --purge"
        );
    }
    println!("dist: the package installs, works and removes cleanly");
    Ok(())
}

fn check_installed() -> Result<()> {
    let page = output("man", &["-w", "lbd"])?;
    ensure!(page.ends_with("man8/lbd.8.gz"), "man -w lbd found {page:?}");
    let text = output("man", &["-P", "cat", "lbd"])?;
    ensure!(
        text.contains("--teardown"),
        "man lbd does not document --teardown"
    );
    output("man", &["-w", "lbctl-explain"])?;
    let conffiles = output(
        "dpkg-query",
        &["--showformat=${Conffiles}", "--show", PACKAGE],
    )?;
    ensure!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is not a conffile: {conffiles:?}"
    );
    // The shipped example is a configuration lbd accepts.
    output("lbd", &["--check", "--config", CONFFILE])?;
    let help = output("lbctl", &["--help"])?;
    for sub in ["status", "flows", "explain", "events", "reload", "uplink"] {
        ensure!(help.contains(sub), "lbctl --help does not list {sub}");
    }
    for file in [
        "/usr/share/bash-completion/completions/lbctl",
        "/usr/share/bash-completion/completions/lbd",
        "/usr/share/zsh/vendor-completions/_lbctl",
        "/usr/share/zsh/vendor-completions/_lbd",
        "/usr/share/fish/vendor_completions.d/lbctl.fish",
        "/usr/share/fish/vendor_completions.d/lbd.fish",
    ] {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        let wanted = if file.contains("lbctl") {
            "explain"
        } else {
            "teardown"
        };
        ensure!(text.contains(wanted), "{file} does not complete {wanted}");
    }
    // Unit problems (unknown keys, a missing binary or man page) are
    // printed and fail the verify.
    cmd("systemd-analyze", &["verify", &format!("/{UNIT}")])?;
    Ok(())
}

fn version() -> Result<String> {
    let manifest = std::fs::read_to_string(root().join("lb-daemon/Cargo.toml"))
        .context("reading lb-daemon/Cargo.toml")?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_string)
        .context("lb-daemon/Cargo.toml has no version line")
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = output("du", &["-sk", path_str(dir)?])?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sk printed {out:?}"))
}

/// A command's standard output, trimmed; fails with its error output.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
