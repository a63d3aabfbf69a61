//! With the `bench` feature, `cargo xtask bench` embeds the benchmark's XDP
//! object, which lb-daemon's build script builds beside lbd's own and names
//! in `DEP_LB_DATAPLANE_BENCH_OBJECT`. Without it, nothing to do: the default
//! xtask builds without the eBPF toolchain.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LB_DATAPLANE_BENCH_OBJECT");
    if std::env::var_os("CARGO_FEATURE_BENCH").is_none() {
        return;
    }
    match std::env::var("DEP_LB_DATAPLANE_BENCH_OBJECT") {
        Ok(path) => println!("cargo:rustc-env=LB_BENCH_OBJECT={path}"),
        Err(_) => println!(
            "cargo:warning=lb-daemon's build script named no benchmark object (DEP_LB_DATAPLANE_BENCH_OBJECT)"
        ),
    }
}
