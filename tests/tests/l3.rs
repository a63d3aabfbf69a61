//! Uplinks that are not Ethernet: an LTE modem in raw-IP mode, made of a
//! tun device on the router (`lte0`, no link-layer header) and a relay to
//! the mobile operator (here isp2's network, which routes it to the
//! internet); and a WireGuard tunnel to a VPN provider (`wireguard-go`,
//! MTU 1420) riding over isp1. lb sends to them by the hand-off path (XDP
//! cannot redirect into an L3 device) and translates their replies at
//! their tc ingress.
//!
//! Each test checks what the ISPs saw, and that no packet with a LAN
//! source reached them (the lab's ISP links and the modem's far end).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    daemon::Lbd,
    rawip::{End, RawIpLink},
    require_root,
    traffic::{
        http_download, tcp_flows, tcp_upload, udp_answered, udp_flows, HeldUdp, HttpFileServer,
        TcpEchoServer, TcpSinkServer, UdpEchoServer,
    },
    unique_prefix, watch_flows, watch_sources,
    wireguard::{self, Tunnel},
    FlowWatch, Lab, LabDesc, LanLeaks,
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
    // The router's LAN port finishes checksums itself, as a NIC does before
    // the wire (a veth would hand a partial one on to the client, which
    // trusts it): a merged segment from the modem that lb translated with
    // a wrong checksum then fails at the client, as on a real LAN.
    lab.exec("router", &["ethtool", "-K", "lan0", "tx", "off"])?;
    lab.exec("isp2", &["ethtool", "-K", "up0", "gro", "on"])?;
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

/// lbd balancing over isp2 (Ethernet) and the WireGuard tunnel, with an
/// ICMP probe each; `wg_extra` and `isp2_extra` lines for each.
fn wg_config(tunnel: &Tunnel, isp2_extra: &str, wg_extra: &str) -> String {
    format!(
        "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n\n\
         [[lan]]\ninterface = \"lan0\"\n\n\
         [[uplink]]\nname = \"isp2\"\ninterface = \"wan2\"\ngateway = \"100.64.2.1\"\n{isp2_extra}\n{PROBE}\n\
         [[uplink]]\nname = \"wg\"\ninterface = \"{}\"\n{wg_extra}\n{PROBE}",
        tunnel.ifname
    )
}

/// The default lab with a WireGuard tunnel from the router to the VPN
/// provider, and the counters of LAN sources reaching the ISPs and the
/// provider.
fn lab_with_tunnel() -> Result<(Lab, Tunnel, LanLeaks, FlowWatch)> {
    let mut lab = Lab::up(&LabDesc::shipped("default")?, &unique_prefix())?;
    let leaks = LanLeaks::install(&lab)?;
    let tunnel = wireguard::start(&mut lab)?;
    let vpn_leaks = watch_sources(&lab, "vpn", &tunnel.provider_ifname, "lan", "10.10.0.0/16")?;
    Ok((lab, tunnel, leaks, vpn_leaks))
}

/// The flows `watch` saw, but for the tunnel's own (from its listen port,
/// to the provider): the LAN's.
fn lan_flows(watch: &FlowWatch, lab: &Lab, tunnel: &Tunnel) -> Result<BTreeSet<(u8, u16)>> {
    let own = (17, tunnel.listen_port(lab)?);
    let mut flows = watch.seen_flows()?;
    flows.remove(&own);
    Ok(flows)
}

#[test]
fn a_wireguard_uplink_takes_its_share_and_a_download_through_it_needs_no_pmtud() -> Result<()> {
    const FLOWS: usize = 200;
    const SIZE: usize = 20 * 1024 * 1024;
    if !require_root("a_wireguard_uplink_takes_its_share_and_a_download_through_it_needs_no_pmtud")
    {
        return Ok(());
    }
    let (mut lab, tunnel, leaks, vpn_leaks) = lab_with_tunnel()?;
    let lbd = Lbd::start(&mut lab, &wg_config(&tunnel, "", ""))?;
    lbd.wait_lifecycle("isp2", "in service", BOUND)?;
    lbd.wait_lifecycle("wg", "in service", BOUND)?;
    let wg = lbd.uplink("wg")?;
    eprintln!(
        "the tunnel's uplink: {} via {} ({})",
        wg["lifecycle"], wg["egress"]["path"], wg["egress"]["why"]
    );

    let inet = lab.ns("inet")?.to_string();
    let server: SocketAddr = format!("{SERVER_IP}:0").parse()?;
    let udp = UdpEchoServer::start(&inet, server)?;
    let watches = [
        watch_flows(&lab, "isp2", "down0")?,
        watch_flows(&lab, "vpn", &tunnel.provider_ifname)?,
    ];
    let flows = udp_flows(lab.ns("client")?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    let failed = flows.iter().filter(|f| f.outcome.is_err()).count();
    ensure!(failed == 0, "{failed} of {FLOWS} flows failed");
    let per = [
        lan_flows(&watches[0], &lab, &tunnel)?.len(),
        watches[1].seen_flows()?.len(),
    ];
    eprintln!("{FLOWS} UDP flows: isp2 {}, the tunnel {}", per[0], per[1]);
    ensure!(
        per[0] + per[1] == FLOWS,
        "the ISP and the provider saw {per:?} flows of {FLOWS}"
    );
    let share = per[1] as f64 / FLOWS as f64;
    ensure!(
        (share - 0.5).abs() <= 0.10,
        "the tunnel carried {:.1}% of flows, weights 1:1 ask for 50%",
        share * 100.0
    );
    lbd.stop(&mut lab)?;

    // The tunnel alone (isp2 its backup), and the provider's network eats
    // "fragmentation needed", as too many do: only the clamped MSS lets
    // the server's full-size segments through the tunnel.
    lab.exec(
        "vpn",
        &[
            "nft",
            "add table ip nopmtud; \
             add chain ip nopmtud out { type filter hook output priority 0; }; \
             add rule ip nopmtud out icmp type destination-unreachable icmp code frag-needed drop",
        ],
    )?;
    let lbd = Lbd::start(&mut lab, &wg_config(&tunnel, "tier = 1", ""))?;
    lbd.wait_lifecycle("wg", "in service", BOUND)?;
    let dir = lab.files_dir()?;
    let blob = dir.join("blob-wg");
    let content: Vec<u8> = (0..SIZE).map(|i| (i * 31 + i / 1021) as u8).collect();
    std::fs::write(&blob, &content).context("writing the download")?;
    let http = HttpFileServer::start(&inet, server, &blob)?;
    watches[0].clear()?;
    watches[1].clear()?;
    let got = dir.join("got-wg");
    let started = Instant::now();
    http_download(
        lab.ns("client")?,
        http.local_addr(),
        "/blob-wg",
        &got,
        3 * BOUND,
    )
    .context("downloading through the tunnel with PMTUD broken beyond it")?;
    let took = started.elapsed();
    ensure!(
        std::fs::read(&got)? == content,
        "the download through the tunnel arrived different"
    );
    let beside = lan_flows(&watches[0], &lab, &tunnel)?;
    ensure!(
        watches[1].packets()? > 0 && beside.is_empty(),
        "the download did not go through the tunnel alone: isp2 saw {beside:?}, the tunnel {} packets",
        watches[1].packets()?
    );
    eprintln!("{SIZE} bytes exact through the tunnel (MTU 1420, no PMTUD) in {took:?}");

    // A datagram too big for the tunnel, with DF: the client is told the
    // tunnel's MTU, and its kernel remembers it for the server.
    let client = lab.ns("client")?.to_string();
    let socket = lb_tests::in_netns(&client, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(udp.local_addr())?;
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: IP_MTU_DISCOVER takes an int, live for the call.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        Ok(s)
    })?;
    let told = Instant::now();
    let learned = loop {
        // 1472 bytes of payload: a 1500-byte datagram.
        let _ = socket.send(&[0x5a; 1472]);
        let route = lab.exec("client", &["ip", "-4", "route", "get", SERVER_IP])?;
        if route.contains("mtu 1420") {
            break route;
        }
        ensure!(
            told.elapsed() < BOUND,
            "the client never learned the tunnel's MTU: {}; lb told {} times; status: {}",
            route.trim(),
            lbd.reason("told_too_big")?,
            lbd.uplink("wg")?
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("the client learned: {}", learned.trim());
    ensure!(
        lbd.reason("told_too_big")? > 0,
        "lb did not count its answer"
    );
    check_leaks(&leaks, &vpn_leaks)?;
    lbd.stop(&mut lab)
}

#[test]
fn an_upstream_cut_behind_the_tunnel_moves_its_flows_and_they_come_back() -> Result<()> {
    const FLOWS: usize = 40;
    if !require_root("an_upstream_cut_behind_the_tunnel_moves_its_flows_and_they_come_back") {
        return Ok(());
    }
    let (mut lab, tunnel, leaks, vpn_leaks) = lab_with_tunnel()?;
    let lbd = Lbd::start(&mut lab, &wg_config(&tunnel, "", ""))?;
    lbd.wait_lifecycle("isp2", "in service", BOUND)?;
    lbd.wait_lifecycle("wg", "in service", BOUND)?;
    let inet = lab.ns("inet")?.to_string();
    let udp = UdpEchoServer::start(&inet, format!("{SERVER_IP}:0").parse()?)?;
    let watches = [
        watch_flows(&lab, "isp2", "down0")?,
        watch_flows(&lab, "vpn", &tunnel.provider_ifname)?,
    ];
    let held = HeldUdp::open(lab.ns("client")?, udp.local_addr(), FLOWS)?;
    held.echo_all(FLOW_TIMEOUT)?;
    let in_tunnel = watches[1].seen_flows()?.len();
    ensure!(
        in_tunnel > 0,
        "no flow of {FLOWS} took the tunnel: nothing to move"
    );

    // The provider's network stops forwarding; the tunnel itself stays up.
    lab.exec(
        "vpn",
        &[
            "nft",
            "add table ip cut; add chain ip cut forward { type filter hook forward priority 0; policy drop; }",
        ],
    )?;
    watches[0].clear()?;
    let cut = Instant::now();
    held.echo_all(3 * BOUND)
        .context("flows after the cut behind the tunnel")?;
    let moved = cut.elapsed();
    let wg = lbd.uplink("wg")?;
    eprintln!(
        "cut behind the tunnel: its {in_tunnel} flows answered through isp2 {moved:?} later; wg: {} ({})",
        wg["lifecycle"], wg["reason"]
    );
    let on_isp2 = lan_flows(&watches[0], &lab, &tunnel)?.len();
    ensure!(
        on_isp2 == FLOWS,
        "after the cut isp2 saw {on_isp2} of {FLOWS} flows"
    );
    ensure!(
        wg["lifecycle"] == "down",
        "the tunnel's uplink is not down: {wg}"
    );

    lab.exec("vpn", &["nft", "delete table ip cut"])?;
    lbd.wait_lifecycle("wg", "in service", 3 * BOUND)?;
    watches[1].clear()?;
    let flows = udp_flows(lab.ns("client")?, udp.local_addr(), FLOWS, FLOW_TIMEOUT)?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "flows failed after the tunnel came back"
    );
    ensure!(
        !watches[1].seen_flows()?.is_empty(),
        "no new flow took the tunnel after it came back"
    );
    check_leaks(&leaks, &vpn_leaks)?;
    lbd.stop(&mut lab)
}

/// A VPN-first router (the tunnel the first tier, isp2 its backup): what
/// the router itself sends unbound (its DNS forwarder, NTP) goes through
/// the tunnel, as the LAN's traffic does, while the tunnel's own packets
/// leave by isp2 beside it, also when wireguard-go sends them unbound
/// (sent into the tunnel itself, they would be lost, and the tunnel with
/// them).
#[test]
fn a_vpn_first_routers_own_traffic_goes_through_the_tunnel_and_the_tunnels_own_packets_by_a_line(
) -> Result<()> {
    const COUNT: usize = 10;
    if !require_root("a_vpn_first_routers_own_traffic_goes_through_the_tunnel_and_the_tunnels_own_packets_by_a_line") {
        return Ok(());
    }
    let (mut lab, tunnel, leaks, vpn_leaks) = lab_with_tunnel()?;
    let lbd = Lbd::start(&mut lab, &wg_config(&tunnel, "tier = 1", ""))?;
    lbd.wait_lifecycle("wg", "in service", BOUND)?;
    lbd.wait_lifecycle("isp2", "in service", BOUND)?;
    let port = tunnel.listen_port(&lab)?;
    let apart = format!("wg from UDP {port}");
    let asked = Instant::now();
    loop {
        let s = lbd.status()?;
        if s["own_path"] == "wg" && s["tunnels_own_path"] == "isp2" && s["tunnels_own"][0] == apart
        {
            break;
        }
        ensure!(
            asked.elapsed() < BOUND,
            "lbd did not route the tunnel's own packets apart (UDP {port}) and the router's \
             other traffic into the tunnel: own_path {}, tunnels_own {}, tunnels_own_path {}",
            s["own_path"],
            s["tunnels_own"],
            s["tunnels_own_path"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its rules, the tunnel's `sport PORT` among them, are read back as
    // lbd made them: no round changes them again.
    lbd.wait_steady(3, BOUND)?;
    let said = lbd.lbctl(&["status"])?;
    let paths = said.lines().find(|l| l.contains("slow path")).unwrap_or("");
    ensure!(
        paths.contains(&format!("the tunnels' own packets: isp2 ({apart})")),
        "lbctl status does not say where the tunnel's own packets go: {said}"
    );
    let inet = lab.ns("inet")?.to_string();
    let udp = UdpEchoServer::start(&inet, format!("{SERVER_IP}:0").parse()?)?;
    let SocketAddr::V4(target) = udp.local_addr() else {
        anyhow::bail!("the echo server is not on IPv4: {}", udp.local_addr());
    };
    let watches = [
        watch_flows(&lab, "isp2", "down0")?,
        watch_flows(&lab, "vpn", &tunnel.provider_ifname)?,
    ];
    let failed = udp_answered(
        lab.ns("router")?,
        std::net::Ipv4Addr::UNSPECIFIED,
        target,
        COUNT,
        FLOW_TIMEOUT,
    )?;
    ensure!(
        failed.is_empty(),
        "{} of {COUNT} of the router's own datagrams went unanswered: {failed:?}; wg: {}",
        failed.len(),
        lbd.uplink("wg")?
    );
    let (outside, inside) = (watches[0].seen_flows()?, watches[1].seen_flows()?);
    eprintln!(
        "{paths}\nthe router's own {COUNT} datagrams: {} flows in the tunnel; isp2 carried {outside:?} (the tunnel's own: UDP {port})",
        inside.len()
    );
    ensure!(
        inside.len() >= COUNT,
        "the provider saw {} flows in the tunnel, the router sent {COUNT}",
        inside.len()
    );
    ensure!(
        outside.iter().all(|&flow| flow == (17, port)),
        "isp2 carried {outside:?}: only the tunnel's own packets (UDP {port}) belong there"
    );
    check_leaks(&leaks, &vpn_leaks)?;
    lbd.stop(&mut lab)
}

/// A VPN-first router with two lines: when the line that carries the
/// tunnel's own packets loses the internet, they move to the other line at
/// once, and the tunnel comes back over it. (WireGuard sends from the
/// address it last heard its peer on: left alone, it would go on sending
/// by the dead line until a handshake of its own went unanswered.)
#[test]
fn the_tunnels_own_packets_move_to_the_other_line_when_theirs_fails() -> Result<()> {
    const FLOWS: usize = 10;
    if !require_root("the_tunnels_own_packets_move_to_the_other_line_when_theirs_fails") {
        return Ok(());
    }
    let (mut lab, tunnel, leaks, vpn_leaks) = lab_with_tunnel()?;
    let config = format!(
        "[daemon]\nsocket = \"{{socket}}\"\nbpffs = \"{{bpffs}}\"\n\n\
         [[lan]]\ninterface = \"lan0\"\n\n\
         [[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\ntier = 1\n{PROBE}\n\
         [[uplink]]\nname = \"isp2\"\ninterface = \"wan2\"\ngateway = \"100.64.2.1\"\ntier = 1\n{PROBE}\n\
         [[uplink]]\nname = \"wg\"\ninterface = \"{}\"\n{PROBE}",
        tunnel.ifname
    );
    let lbd = Lbd::start(&mut lab, &config)?;
    for name in ["isp1", "isp2", "wg"] {
        lbd.wait_lifecycle(name, "in service", BOUND)?;
    }
    let port = tunnel.listen_port(&lab)?;
    let transport = (17, port);
    let on_isp1 = watch_flows(&lab, "isp1", "down0")?;
    let on_isp2 = watch_flows(&lab, "isp2", "down0")?;
    let inet = lab.ns("inet")?.to_string();
    let udp = UdpEchoServer::start(&inet, format!("{SERVER_IP}:0").parse()?)?;
    let held = HeldUdp::open(lab.ns("client")?, udp.local_addr(), FLOWS)?;
    held.echo_all(FLOW_TIMEOUT)?;
    // The tunnel's own packets by isp1, the first of the two lines.
    let started = Instant::now();
    loop {
        let by = lbd.status()?["tunnels_own_path"].clone();
        if by == "isp1" && on_isp1.seen_flows()?.contains(&transport) {
            break;
        }
        ensure!(
            started.elapsed() < BOUND,
            "the tunnel's own packets (UDP {port}) do not go by isp1: lbd says {by}, isp1 saw {:?}",
            on_isp1.seen_flows()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let cut = Instant::now();
    lab.set_link_up("isp1", "up0", false)?;
    lbd.wait_lifecycle("isp1", "down", BOUND)?;
    loop {
        let by = lbd.status()?["tunnels_own_path"].clone();
        if by == "isp2" {
            break;
        }
        ensure!(
            cut.elapsed() < 2 * BOUND,
            "the tunnel's own packets did not move to isp2: {by}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // From now on they leave by isp2, and none by isp1 (left alone,
    // WireGuard would send by isp1 until its own handshake gave up).
    on_isp1.clear()?;
    on_isp2.clear()?;
    loop {
        let wg = lbd.uplink("wg")?;
        if wg["lifecycle"] == "in service" && on_isp2.seen_flows()?.contains(&transport) {
            break;
        }
        ensure!(
            cut.elapsed() < 6 * BOUND,
            "the tunnel did not come back over isp2: wg {} ({}), isp2 saw {:?}",
            wg["lifecycle"],
            wg["reason"],
            on_isp2.seen_flows()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stuck = on_isp1.seen_flows()?;
    eprintln!(
        "isp1 cut: the tunnel in service over isp2 {:?} after it; isp1 saw {stuck:?} after lbd moved the tunnel's own packets (UDP {port})",
        cut.elapsed()
    );
    ensure!(
        !stuck.contains(&transport),
        "the tunnel's own packets (UDP {port}) still went to isp1 after lbd moved them to isp2"
    );
    check_leaks(&leaks, &vpn_leaks)?;
    lbd.stop(&mut lab)
}

/// The operator's port forwards over the modem, as an operator writes them.
const LTE_FORWARDS: &str = r#"
table ip operator {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "lte0" udp dport 9090 dnat to 10.10.0.2:9000
        iifname "lte0" tcp dport 8080 dnat to 10.10.0.2:8000
    }
}
"#;

#[test]
fn port_forwards_and_the_routers_services_answer_through_the_modem_they_came_in_on() -> Result<()> {
    const COUNT: usize = 20;
    if !require_root(
        "port_forwards_and_the_routers_services_answer_through_the_modem_they_came_in_on",
    ) {
        return Ok(());
    }
    let (mut lab, _modem, leaks, lte_leaks) = lab_with_modem()?;
    // An answer that left by isp1 with the modem's address would show here.
    let wrong_way = watch_sources(&lab, "isp1", "down0", "lte", "10.77.0.2/32")?;
    let file = lab.files_dir()?.join("operator.nft");
    std::fs::write(&file, LTE_FORWARDS).context("writing the port forwards")?;
    let path = file.to_str().context("a UTF-8 path")?.to_string();
    lab.exec("router", &["nft", "-f", &path])?;
    let lbd = Lbd::start(&mut lab, &config("", ""))?;
    lbd.wait_lifecycle("isp1", "in service", BOUND)?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;

    let client = lab.ns("client")?.to_string();
    let _udp = UdpEchoServer::start(&client, "10.10.0.2:9000".parse()?)?;
    let _tcp = TcpEchoServer::start(&client, "10.10.0.2:8000".parse()?)?;
    // The router's own service (a TCP one: an unbound UDP server answers
    // from whatever address the main table picks, lb or not).
    let router = lab.ns("router")?.to_string();
    let _own = TcpEchoServer::start(&router, "0.0.0.0:7777".parse()?)?;

    let inet = lab.ns("inet")?.to_string();
    let from: std::net::Ipv4Addr = SERVER_IP.parse()?;
    let modem: std::net::Ipv4Addr = "10.77.0.2".parse()?;
    let mut failed = udp_answered(
        &inet,
        from,
        SocketAddrV4::new(modem, 9090),
        COUNT,
        FLOW_TIMEOUT,
    )?;
    for port in [8080, 7777] {
        let tcp = tcp_flows(&inet, SocketAddr::from((modem, port)), COUNT, FLOW_TIMEOUT)?;
        failed.extend(
            tcp.iter()
                .filter_map(|f| f.outcome.as_ref().err().map(|e| format!("{e:#}"))),
        );
    }
    ensure!(
        failed.is_empty(),
        "{} exchanges failed: {failed:?}",
        failed.len()
    );
    let strays = wrong_way.packets()?;
    ensure!(
        strays == 0,
        "{strays} packets with the modem's address left by isp1"
    );
    eprintln!("{COUNT} UDP and {COUNT} TCP exchanges through the modem's port forwards and {COUNT} TCP connections to the router's own service, each answered from the address it was sent to");
    check_leaks(&leaks, &lte_leaks)?;
    lbd.stop(&mut lab)
}

/// Bytes lb's shaper on the router's `dev` has sent (its root qdisc).
fn qdisc_sent(lab: &Lab, dev: &str) -> Result<u64> {
    let out = lab.exec(
        "router",
        &["tc", "-s", "-j", "qdisc", "show", "dev", dev, "root"],
    )?;
    let qdiscs: serde_json::Value = serde_json::from_str(&out).context("parsing tc -j")?;
    qdiscs[0]["bytes"]
        .as_u64()
        .with_context(|| format!("no bytes in `tc -s -j qdisc show dev {dev}`: {out}"))
}

#[test]
fn the_modems_shaper_holds_its_traffic_and_its_quota_drains_it() -> Result<()> {
    const QUOTA: &str = "300KB";
    const UPLOAD: usize = 512 * 1024;
    if !require_root("the_modems_shaper_holds_its_traffic_and_its_quota_drains_it") {
        return Ok(());
    }
    let (mut lab, _modem, leaks, lte_leaks) = lab_with_modem()?;
    let state = lab.files_dir()?.join("state");
    std::fs::create_dir_all(&state)?;
    let lte = format!(
        "quota = {{ bytes = \"{QUOTA}\", period = \"day\", action = \"drain\" }}\n\
         [uplink.shape]\nupload = \"200mbit\"\ndownload = \"200mbit\"\n"
    );
    let text = config("tier = 1", &lte).replace(
        "bpffs = \"{bpffs}\"\n",
        &format!(
            "bpffs = \"{{bpffs}}\"\nstate_dir = \"{}\"\n",
            state.display()
        ),
    );
    let lbd = Lbd::start(&mut lab, &text)?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;
    lb_tests::stream::wait_for("lte0's egress through lb's shaper", BOUND, || {
        Ok(lbd.uplink("lte")?["egress"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("lb's shaper")))
    })?;

    // An upload through the modem passes lb's shaper on lte0.
    let inet = lab.ns("inet")?.to_string();
    let sink = TcpSinkServer::start(&inet, format!("{SERVER_IP}:9300").parse()?)?;
    let before = qdisc_sent(&lab, "lte0")?;
    let sent = tcp_upload(lab.ns("client")?, sink.local_addr(), UPLOAD, BOUND)?;
    ensure!(sent == UPLOAD as u64, "uploaded {sent} of {UPLOAD} bytes");
    let through = qdisc_sent(&lab, "lte0")? - before;
    eprintln!("{UPLOAD} bytes up through the modem: {through} bytes through lb's shaper on lte0");
    ensure!(
        through >= UPLOAD as u64,
        "only {through} bytes passed lb's shaper on lte0 for a {UPLOAD}-byte upload"
    );

    // That was past its quota: drained, its new flows go to isp1.
    lb_tests::stream::wait_for("the modem's quota reached", BOUND, || {
        Ok(lbd.uplink("lte")?["quota"]["reached"].as_bool() == Some(true))
    })?;
    let lte = lbd.uplink("lte")?;
    ensure!(lte["state"] == "drain", "lte after its quota: {lte}");
    let new_before = lbd.uplink_counter("lte", "new_flows")?;
    let udp = UdpEchoServer::start(&inet, format!("{SERVER_IP}:0").parse()?)?;
    let flows = udp_flows(lab.ns("client")?, udp.local_addr(), 20, FLOW_TIMEOUT)?;
    ensure!(
        flows.iter().all(|f| f.outcome.is_ok()),
        "flows failed after the drain"
    );
    ensure!(
        lbd.uplink_counter("lte", "new_flows")? == new_before,
        "a drained modem took new flows"
    );
    eprintln!("the modem after its quota: {}", lte["quota"]);
    check_leaks(&leaks, &lte_leaks)?;
    lbd.stop(&mut lab)
}

#[test]
fn what_the_kernel_forwards_leaves_by_the_modem_when_it_is_the_best_uplink() -> Result<()> {
    const ESP: i32 = 50;
    if !require_root("what_the_kernel_forwards_leaves_by_the_modem_when_it_is_the_best_uplink") {
        return Ok(());
    }
    let (mut lab, _modem, leaks, lte_leaks) = lab_with_modem()?;
    // The modem is the first tier: the slow path's uplink.
    let lbd = Lbd::start(&mut lab, &config("tier = 1", ""))?;
    lbd.wait_lifecycle("lte", "in service", BOUND)?;
    let server: std::net::Ipv4Addr = SERVER_IP.parse()?;
    let listener = lb_tests::traffic::raw_socket(lab.ns("inet")?, ESP)?;
    // The slow path's routing follows a round after the uplink is in
    // service: until then the main table (isp1) has it.
    lb_tests::stream::wait_for("the slow path on the modem", BOUND, || {
        Ok(lab
            .exec("router", &["ip", "rule"])?
            .lines()
            .any(|l| l.contains("iif lan0 lookup 4001")))
    })?;
    let mut seen = Vec::new();
    let started = Instant::now();
    while seen.is_empty() {
        ensure!(
            started.elapsed() < BOUND,
            "no ESP from the client reached the server"
        );
        lb_tests::traffic::send_raw(lab.ns("client")?, ESP, server)?;
        seen = lb_tests::traffic::raw_sources(&listener, Duration::from_millis(500))?;
    }
    eprintln!("ESP from the client arrived from {seen:?}");
    ensure!(
        seen.iter().all(|s| s.to_string() == "10.77.0.2"),
        "ESP arrived from {seen:?}, not from the modem's address; rules:\n{}",
        lab.exec("router", &["ip", "rule"])?
    );
    check_leaks(&leaks, &lte_leaks)?;
    lbd.stop(&mut lab)
}
