//! Builds the XDP objects (lb-ebpf) with the pinned nightly and puts them in
//! OUT_DIR, where `dataplane` embeds lb's into `lbd`; the benchmark's is
//! named to `cargo xtask bench` (xtask's build script), which embeds it.
//!
//! The nested cargo runs from lb-ebpf/, so rustup picks the toolchain pinned
//! in lb-ebpf/rust-toolchain.toml. Variables the outer cargo sets for build
//! scripts would leak into it and break the cross build, so they are removed.

use std::{
    env,
    path::PathBuf,
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let ebpf_dir = manifest.join("../lb-ebpf");
    for watched in [
        "../lb-ebpf/src",
        "../lb-ebpf/Cargo.toml",
        "../lb-ebpf/rust-toolchain.toml",
        "../lb-ebpf/.cargo/config.toml",
        "../lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={watched}");
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf_dir).args([
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
    ]);
    cmd.arg(&target_dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            println!("cargo:warning=building the XDP object (lb-ebpf) failed ({status}); run `cargo xtask setup` to install the pinned nightly and bpf-linker");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            println!("cargo:warning=could not run cargo for lb-ebpf: {e}; run `cargo xtask setup`");
            return ExitCode::FAILURE;
        }
    }
    // `lb` is lbd's data plane; `lb-bench` holds the benchmark's programs,
    // built in the same run and handed to `cargo xtask bench` (xtask's
    // build script reads DEP_LB_DATAPLANE_BENCH_OBJECT).
    for (bin, object_name) in [("lb", "lb.bpf.o"), ("lb-bench", "lb-bench.bpf.o")] {
        let object = target_dir.join("bpfel-unknown-none/release").join(bin);
        if let Err(e) = std::fs::copy(&object, out_dir.join(object_name)) {
            println!("cargo:warning=copying {} failed: {e}", object.display());
            return ExitCode::FAILURE;
        }
    }
    println!(
        "cargo:bench_object={}",
        out_dir.join("lb-bench.bpf.o").display()
    );
    ExitCode::SUCCESS
}
