//! Uplinks that are not Ethernet: an LTE modem in raw-IP mode, made of a
//! tun device on the router (`lte0`, no link-layer header) and a relay to
//! the mobile operator (here isp2's network, which routes it to the
//! internet). lb sends to it by the hand-off path (XDP cannot redirect into
//! an L3 device) and translates its replies at its tc ingress.
//!
//! Each test checks what the ISPs saw, and that no packet with a LAN
//! source reached them (the lab's ISP links and the modem's far end).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::Lbd,
    rawip::{End, RawIpLink},
    require_root,
    traffic::{http_download, udp_flows, HeldUdp, HttpFileServer, UdpEchoServer},
    unique_prefix, watch_flows, watch_sources, FlowWatch, Lab, LabDesc, LanLeaks,
};

const SERVER_IP: &str = "198.51.100.10";
const FLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// A bound for a test that must end, not a speed target.
const BOUND: Duration = Duration::from_secs(15);
/// The modem's network, the router's end .2.
const LTE_ROUTER: &str = "10.77.0.2/30";
const LTE_OPERATOR: &str = "10.77.0.1/30";
const LTE_NET: &str = "10.77.0.0/30";
const PROBE: &str = "[[uplink.probe]]\nkind = \"icmp\"\ntarget = \"198.51.100.10\"\n";

/// The default lab with a raw-IP modem on the router (`lte0`) whose far
/// end is in isp2's network; isp2's network routes the modem's addresses,
/// as an operator does.
fn lab_with_modem() -> Result<(Lab, RawIpLink, LanLeaks, FlowWatch)> {
    let lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let modem = RawIpLink::start(
        &lab,
        End {
            host: "router",
            ifname: "lte0",
            address: LTE_ROUTER,
        },
        End {
            host: "isp2",
            ifname: "ltenet",
            address: LTE_OPERATOR,
        },
        1500,
    )?;
    lab.exec(
        "inet",
        &["ip", "route", "add", LTE_NET, "via", "100.65.2.1"],
    )?;
    let lte_leaks = watch_sources(&lab, "isp2", "ltenet", "lan", "10.10.0.0/16")?;
    Ok((lab, modem, leaks, lte_leaks))
}

/// lbd balancing over isp1 (Ethernet) and the modem, with `lte_extra`
/// lines for the modem's uplink.
fn config(isp1_extra: &str, lte_extra: &str) -> String {
    format!(
        "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n\n\
         [[lan]]\ninterface = \"lan0\"\n\n\
         [[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n{isp1_extra}\n{PROBE}\n\
         [[uplink]]\nname = \"lte\"\ninterface = \"lte0\"\n{lte_extra}\n{PROBE}"
    )
}

fn check_leaks(leaks: &LanLeaks, lte_leaks: &FlowWatch) -> Result<()> {
    leaks.check()?;
    let leaked = lte_leaks.packets()?;
    ensure!(
        leaked == 0,
        "{leaked} packets with a LAN source reached the modem's network"
    );
    Ok(())
}

#[test]
fn flows_spread_over_an_ethernet_and_a_raw_ip_uplink_and_a_download_is_exact() -> Result<()> {
    const FLOWS: usize = 200;
    const SIZE: usize = 20 * 1024 * 1024;
    if !require_root("flows_spread_over_an_ethernet_and_a_raw_ip_uplink_and_a_download_is_exact") {
        return Ok(());
    }
    let (mut lab, modem, leaks, lte_leaks) = lab_with_modem()?;
    let lbd = Lbd::start(&mut lab, &config("", ""))?;
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;
    let lte = lbd.uplink("lte")?;
    eprintln!("the modem's uplink: {lte}");

    let inet = lab.ns("inet")?.to_string();
    let server: SocketAddr = format!("{SERVER_IP}:0").parse()?;
    let udp = UdpEchoServer::start(&inet, server)?;
    let watches = [
        watch_flows(&lab, "isp1", "down0")?,
        watch_flows(&lab, "isp2", "ltenet")?,
    ];
    let flows = udp_flows(lab.ns("client")?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    let failed: Vec<String> = flows
        .iter()
        .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {FLOWS} flows failed: {:?}",
        failed.len(),
        failed.first()
    );
    // Behind NAT the ISPs see NAT ports: distinct per uplink, so what each
    // saw is what it carried.
    let per = [
        watches[0].seen_flows()?.len(),
        watches[1].seen_flows()?.len(),
    ];
    eprintln!("{FLOWS} UDP flows: isp1 {}, the modem {}", per[0], per[1]);
    ensure!(
        per[0] + per[1] == FLOWS,
        "the ISPs saw {per:?} flows of {FLOWS}"
    );
    let share = per[1] as f64 / FLOWS as f64;
    ensure!(
        (share - 0.5).abs() <= 0.10,
        "the modem carried {:.1}% of flows, weights 1:1 ask for 50%",
        share * 100.0
    );
    lbd.stop(&mut lab)?;

    // The modem alone (isp1 its backup): a download through it.
    let lbd = Lbd::start(&mut lab, &config("tier = 1", ""))?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;
    let dir = lab.files_dir()?;
    let blob = dir.join("blob-lte");
    let content: Vec<u8> = (0..SIZE).map(|i| (i * 13 + i / 977) as u8).collect();
    std::fs::write(&blob, &content).context("writing the download")?;
    let http = HttpFileServer::start(&inet, server, &blob)?;
    watches[0].clear()?;
    watches[1].clear()?;
    let got = dir.join("got-lte");
    let started = Instant::now();
    http_download(
        lab.ns("client")?,
        http.local_addr(),
        "/blob-lte",
        &got,
        BOUND,
    )?;
    let took = started.elapsed();
    ensure!(
        std::fs::read(&got)? == content,
        "the download through the modem arrived different"
    );
    ensure!(
        watches[1].packets()? > 0 && watches[0].packets()? == 0,
        "the download did not go through the modem alone: isp1 {} packets, the modem {}",
        watches[0].packets()?,
        watches[1].packets()?
    );
    eprintln!("{SIZE} bytes exact through the modem in {took:?}");
    drop(modem);
    check_leaks(&leaks, &lte_leaks)?;
    lbd.stop(&mut lab)
}

#[test]
fn the_modems_carrier_loss_moves_its_flows_at_once_and_its_return_takes_new_ones() -> Result<()> {
    const FLOWS: usize = 40;
    if !require_root(
        "the_modems_carrier_loss_moves_its_flows_at_once_and_its_return_takes_new_ones",
    ) {
        return Ok(());
    }
    let (mut lab, modem, leaks, lte_leaks) = lab_with_modem()?;
    let lbd = Lbd::start(&mut lab, &config("", ""))?;
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;
    let inet = lab.ns("inet")?.to_string();
    let udp = UdpEchoServer::start(&inet, format!("{SERVER_IP}:0").parse()?)?;
    let watches = [
        watch_flows(&lab, "isp1", "down0")?,
        watch_flows(&lab, "isp2", "ltenet")?,
    ];
    let held = HeldUdp::open(lab.ns("client")?, udp.local_addr(), FLOWS)?;
    held.echo_all(FLOW_TIMEOUT)?;
    let on_modem = watches[1].seen_flows()?.len();
    ensure!(
        on_modem > 0,
        "no flow of {FLOWS} took the modem: nothing to move"
    );

    // The modem loses its network.
    watches[0].clear()?;
    watches[1].clear()?;
    let cut = Instant::now();
    modem.set_carrier(false)?;
    held.echo_all(BOUND)
        .context("flows after the modem's carrier loss")?;
    let moved = cut.elapsed();
    let status = lbd.uplink("lte")?;
    eprintln!(
        "the modem's carrier lost: its {on_modem} flows answered through isp1 {moved:?} later; lte: {} ({})",
        status["lifecycle"], status["reason"]
    );
    ensure!(
        watches[1].packets()? == 0 && watches[0].seen_flows()?.len() == FLOWS,
        "after the modem's carrier loss: isp1 saw {} flows, the modem {} packets",
        watches[0].seen_flows()?.len(),
        watches[1].packets()?
    );
    ensure!(
        status["reason"]
            .as_str()
            .is_some_and(|r| r.contains("carrier")),
        "lte went down for another reason: {status}"
    );

    // Back: it proves itself, then takes new flows again.
    modem.set_carrier(true)?;
    lbd.wait_lifecycle("lte", "in service", 3 * BOUND)?;
    watches[1].clear()?;
    let flows = udp_flows(lab.ns("client")?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "flows failed after the modem came back"
    );
    ensure!(
        !watches[1].seen_flows()?.is_empty(),
        "no new flow took the modem after it came back"
    );
    check_leaks(&leaks, &lte_leaks)?;
    lbd.stop(&mut lab)
}
