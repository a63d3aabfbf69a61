//! The lab harness itself, on the kernel's own forwarding (no lb loaded):
//! a routed lab carries TCP and UDP from the client to the internet server,
//! the flow watch on isp1 sees those flows, and every lab leaves nothing
//! behind, also when bringing it up fails half-way.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lb_tests::traffic::{tcp_flows, udp_flows, TcpEchoServer, UdpEchoServer};
use lb_tests::{netns, require_root, unique_prefix, watch_flows, Lab, LabDesc};

const SERVER: &str = "198.51.100.10:7000";
const FLOWS: usize = 4;
const FLOW_TIMEOUT: Duration = Duration::from_secs(3);

fn namespaces_with(prefix: &str) -> Result<Vec<String>> {
    Ok(netns::list()?
        .into_iter()
        .filter(|ns| ns.starts_with(prefix))
        .collect())
}

#[test]
fn routed_lab_forwards_and_cleans_up() -> Result<()> {
    if !require_root("routed_lab_forwards_and_cleans_up") {
        return Ok(());
    }
    let prefix = unique_prefix();
    let lab = Lab::up(&LabDesc::shipped("routed")?, &prefix)?;
    assert_eq!(namespaces_with(&prefix)?.len(), 5);

    let watch = watch_flows(&lab, "isp1", "down0")?;
    let server: SocketAddr = SERVER.parse()?;
    {
        let _tcp = TcpEchoServer::start(lab.ns("inet")?, server)?;
        let _udp = UdpEchoServer::start(lab.ns("inet")?, server)?;
        let client = lab.ns("client")?;
        let mut flows = tcp_flows(client, server, FLOWS, FLOW_TIMEOUT)?;
        flows.extend(udp_flows(client, server, FLOWS, FLOW_TIMEOUT)?);

        let seen = watch.seen_flows()?;
        for flow in &flows {
            if let Err(e) = &flow.outcome {
                panic!(
                    "{:?} flow from port {} failed: {e:#}",
                    flow.proto, flow.local_port
                );
            }
            assert!(
                seen.contains(&flow.flow()),
                "isp1 down0 did not see {flow:?}; it saw {seen:?}"
            );
        }
        assert!(
            watch.packets()? >= 2 * FLOWS as u64,
            "too few packets counted on isp1 down0"
        );
    }
    let wan1 = lab.link_stats("router", "wan1")?;
    assert!(
        wan1.tx_packets > 0 && wan1.rx_bytes > 0,
        "router wan1 counters did not move: {wan1:?}"
    );

    // A link that goes down loses its routes; set_link_up puts them back.
    lab.set_link_up("router", "wan1", false)?;
    let left = lab.exec("router", &["ip", "route", "show", "default"])?;
    ensure!(
        !left.contains("via 100.64.1.1") && left.contains("via 100.64.2.1"),
        "after wan1 down only the default route via wan2 should be left: {left:?}"
    );
    lab.set_link_up("router", "wan1", true)?;
    let default = lab.exec("router", &["ip", "route", "show", "default"])?;
    assert!(
        default.contains("via 100.64.1.1"),
        "default route not restored: {default:?}"
    );

    drop(lab);
    assert_eq!(
        namespaces_with(&prefix)?,
        Vec::<String>::new(),
        "namespaces left after drop"
    );
    assert!(
        Lab::down(&prefix)?.is_empty(),
        "down after drop found something"
    );
    Ok(())
}

#[test]
fn failed_up_removes_what_it_made() -> Result<()> {
    if !require_root("failed_up_removes_what_it_made") {
        return Ok(());
    }
    let mut desc = LabDesc::shipped("default")?;
    // The last step (routes) fails: no interface of the client is on 192.0.2.0/24.
    let client = desc
        .hosts
        .get_mut("client")
        .context("default lab has a client")?;
    client.routes.push("203.0.113.0/24 via 192.0.2.1".parse()?);
    let prefix = unique_prefix();
    let error = match Lab::up(&desc, &prefix) {
        Ok(_) => panic!("a route through an unreachable gateway was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("203.0.113.0/24 via 192.0.2.1"),
        "error does not name the route: {error}"
    );
    assert_eq!(
        namespaces_with(&prefix)?,
        Vec::<String>::new(),
        "namespaces left after a failed up"
    );
    Ok(())
}

#[test]
fn down_is_safe_when_nothing_exists() -> Result<()> {
    if !require_root("down_is_safe_when_nothing_exists") {
        return Ok(());
    }
    let prefix = unique_prefix();
    assert!(Lab::down(&prefix)?.is_empty());
    assert!(Lab::down(&prefix)?.is_empty());
    assert!(
        Lab::down("").is_err(),
        "an empty prefix would match every namespace"
    );
    Ok(())
}
