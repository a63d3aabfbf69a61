//! Volume quotas in the lab: an uplink that reaches its quota is drained
//! (its new flows go elsewhere) and the hooks hear of it; the usage and the
//! drain outlive a restart of lbd; a reload that raises the quota, or
//! removes it, puts the uplink back in service.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::{LabConfig, Lbd},
    require_root,
    stream::wait_for,
    traffic::{tcp_upload, TcpSinkServer},
    unique_prefix, Lab, LabDesc, LanLeaks,
};

const QUOTA_BYTES: u64 = 200_000;
const UPLOAD: usize = 64 * 1024;

fn config(daemon: &str, quota: &str) -> String {
    let isp1 = format!("quota = {{ bytes = \"{quota}\", period = \"day\", action = \"drain\" }}");
    LabConfig {
        daemon,
        uplinks: &[(1, &isp1), (2, "")],
        ..LabConfig::default()
    }
    .render()
}

/// Whether `file` has a line with `line` (the hooks' log).
fn logged(file: &Path, line: &str) -> bool {
    std::fs::read_to_string(file).is_ok_and(|t| t.lines().any(|l| l == line))
}

#[test]
fn a_quota_reached_drains_the_uplink_outlives_a_restart_and_a_raise_renews_it() -> Result<()> {
    if !require_root("a_quota_reached_drains_the_uplink_outlives_a_restart_and_a_raise_renews_it") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let hooks = std::env::temp_dir().join(format!("{}quota-hooks", lab.prefix()));
    let _ = std::fs::remove_file(&hooks);
    let daemon = format!(
        "state_dir = \"{{state}}\"\nhooks = [[\"/bin/sh\", \"-c\", \"echo $LB_EVENT $LB_UPLINK $LB_STATE >> {}\"]]",
        hooks.display()
    );
    let mut lbd = Lbd::start(&mut lab, &config(&daemon, "200KB"))?;
    let server: SocketAddr = "198.51.100.10:9300".parse()?;
    let _sink = TcpSinkServer::start(lab.ns("inet")?, server)?;
    let client = lab.ns("client")?.to_owned();
    let upload = || -> Result<()> {
        let got = tcp_upload(&client, server, UPLOAD, Duration::from_secs(20))?;
        ensure!(
            got == UPLOAD as u64,
            "the sink read {got} of {UPLOAD} bytes"
        );
        Ok(())
    };

    // New connections, each hashed anew, until isp1 has carried its quota
    // (half of them land on it; 64 all missing it is 2^-64).
    let mut uploads = 0;
    while !lbd.uplink("isp1")?["quota"]["reached"]
        .as_bool()
        .unwrap_or(false)
    {
        ensure!(
            uploads < 64,
            "isp1's quota not reached after {uploads} uploads"
        );
        upload()?;
        uploads += 1;
        // The usage is read once a second: wait for it to catch up.
        let carried =
            lbd.uplink_counter("isp1", "tx_bytes")? + lbd.uplink_counter("isp1", "rx_bytes")?;
        if carried >= QUOTA_BYTES {
            wait_for("the quota reached", Duration::from_secs(10), || {
                Ok(lbd.uplink("isp1")?["quota"]["reached"].as_bool() == Some(true))
            })?;
        }
    }
    let isp1 = lbd.uplink("isp1")?;
    eprintln!("after {uploads} uploads: {}", isp1["quota"]);
    let used = isp1["quota"]["used_bytes"].as_u64().context("used_bytes")?;
    ensure!(used >= QUOTA_BYTES, "reached with {used} bytes used");
    ensure!(
        isp1["admin"] == "drain" && isp1["state"] == "drain",
        "isp1 after its quota: admin {} state {}",
        isp1["admin"],
        isp1["state"]
    );
    wait_for("the hook on the quota", Duration::from_secs(10), || {
        Ok(logged(&hooks, "quota isp1 drain"))
    })?;
    let text = lbd.lbctl(&["status"])?;
    ensure!(
        text.contains("quotas: isp1"),
        "lbctl status shows no quota:\n{text}"
    );

    // Drained: new flows all leave by isp2.
    let before = lbd.uplink_counter("isp1", "new_flows")?;
    for _ in 0..8 {
        upload()?;
    }
    let after = lbd.uplink_counter("isp1", "new_flows")?;
    ensure!(
        after == before,
        "a drained isp1 took {} new flows",
        after - before
    );

    // A restart keeps the usage and the drain.
    lbd.stop_keeping(&mut lab)?;
    lbd.restart(&mut lab)?;
    let isp1 = lbd.uplink("isp1")?;
    let kept = isp1["quota"]["used_bytes"].as_u64().unwrap_or(0);
    ensure!(
        kept >= used && isp1["quota"]["reached"] == true && isp1["admin"] == "drain",
        "after a restart isp1 has {} (admin {}), before it had {used} bytes used",
        isp1["quota"],
        isp1["admin"]
    );

    // Raising the quota above what was used puts isp1 back in service.
    lbd.write_config(&lab, &config(&daemon, "100MB"))?;
    let said = lbd.lbctl(&["reload"])?;
    ensure!(said.contains("quota"), "reload said {said:?}");
    wait_for("isp1 back in service", Duration::from_secs(10), || {
        let isp1 = lbd.uplink("isp1")?;
        Ok(isp1["admin"] == "enabled" && isp1["state"] == "active")
    })?;
    wait_for("the hook on the renewal", Duration::from_secs(10), || {
        Ok(logged(&hooks, "quota isp1 enabled"))
    })?;

    // Lowered below what was used, the quota holds isp1 back again; removed
    // by a reload, it no longer does.
    lbd.write_config(&lab, &config(&daemon, "200KB"))?;
    lbd.lbctl(&["reload"])?;
    wait_for("isp1 drained again", Duration::from_secs(10), || {
        Ok(lbd.uplink("isp1")?["admin"] == "drain")
    })?;
    let without = LabConfig {
        daemon: &daemon,
        ..LabConfig::default()
    }
    .render();
    lbd.write_config(&lab, &without)?;
    let said = lbd.lbctl(&["reload"])?;
    ensure!(said.contains("back in service"), "reload said {said:?}");
    wait_for(
        "isp1 back in service without its quota",
        Duration::from_secs(10),
        || {
            let isp1 = lbd.uplink("isp1")?;
            Ok(isp1["admin"] == "enabled" && isp1["state"] == "active")
        },
    )?;
    let _ = std::fs::remove_file(&hooks);
    leaks.check()?;
    lbd.stop(&mut lab)
}
