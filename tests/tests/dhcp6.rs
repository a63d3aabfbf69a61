//! IPv6 in the DHCP lab as ISPs give it, on the kernel's own forwarding
//! (no lbd): the router takes an address, a default route and a /56 from
//! each ISP through real DHCPv6 and RAs, the LAN carries a /64 of isp1's
//! /56, the client reaches the internet server from its SLAAC address, and
//! the router's kernel shows every delegation. When isp1 renumbers, the LAN
//! follows.
//!
//! These check the lab itself (what lbd will be run against), so each
//! prints how long the real parts took.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    dhcp6::{self, Dhcp6},
    require_root, unique_prefix, Lab, LabDesc,
};
use serde::Deserialize;

/// `ping -6` from the client to the internet server, from `source`,
/// until one answer or five seconds.
fn ping_server(lab: &Lab, source: Ipv6Addr) -> Result<()> {
    let (source, server) = (source.to_string(), dhcp6::SERVER.to_string());
    let args = [
        "ping", "-6", "-n", "-c", "1", "-w", "5", "-I", &source, &server,
    ];
    let out = lab.output("client", &args)?;
    ensure!(
        out.status.success(),
        "the client could not ping {server} from {source}: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The router's own choice for a packet from the LAN to the server.
fn router_egress(lab: &Lab, source: Ipv6Addr) -> Result<String> {
    #[derive(Deserialize)]
    struct Chosen {
        dev: String,
    }
    let (source, server) = (source.to_string(), dhcp6::SERVER.to_string());
    let args = [
        "ip", "-j", "-6", "route", "get", &server, "from", &source, "iif", "br-lan",
    ];
    let json = lab.exec("router", &args)?;
    let chosen: Vec<Chosen> = serde_json::from_str(&json)
        .with_context(|| format!("parsing `{}`: {json}", args.join(" ")))?;
    chosen
        .into_iter()
        .next()
        .map(|c| c.dev)
        .with_context(|| format!("`{}` chose nothing", args.join(" ")))
}

/// What every uplink of `v6` must look like on the router and its ISP.
fn check_uplinks(lab: &Lab, v6: &Dhcp6) -> Result<()> {
    let in_kernel = dhcp6::kernel_delegations(lab)?;
    for up in &v6.uplinks {
        let n = up.n;
        ensure!(
            dhcp6::wan_subnet(n).contains(IpAddr::V6(up.address)),
            "wan{n}'s address {} is not of {}",
            up.address,
            dhcp6::wan_subnet(n)
        );
        let isp_ll = dhcp6::link_local(lab, &format!("isp{n}"), "down0")?;
        ensure!(
            up.gateway == isp_ll,
            "wan{n}'s default route goes via {}, not isp{n}'s {isp_ll}",
            up.gateway
        );
        let generation = v6
            .servers
            .iter()
            .find(|s| s.0 == n)
            .map(|s| s.2)
            .with_context(|| format!("isp{n} runs no DHCPv6 server"))?;
        let pool = dhcp6::pd_pool(n, generation);
        ensure!(
            up.delegation.prefix_len == 56 && dhcp6::within(up.delegation, pool),
            "isp{n} delegated {}, not a /56 of {pool}",
            up.delegation
        );
        // The kernel shows each delegation, unattributed; the hook says
        // whose it is.
        ensure!(
            in_kernel.contains(&up.delegation),
            "the router's kernel has no reject route for wan{n}'s {}: it has {in_kernel:?}",
            up.delegation
        );
        ensure!(
            dhcp6::recorded_delegations(lab, n)? == [up.delegation],
            "dhcpcd's hook did not record {} for wan{n}",
            up.delegation
        );
    }
    ensure!(
        in_kernel.len() == v6.uplinks.len(),
        "the router has reject routes {in_kernel:?} for {} delegations",
        v6.uplinks.len()
    );
    Ok(())
}

#[test]
fn the_lan_takes_isp1s_prefix_and_reaches_the_internet() -> Result<()> {
    if !require_root("the_lan_takes_isp1s_prefix_and_reaches_the_internet") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let started = Instant::now();
    let v6 = dhcp6::start(&mut lab, &[1, 2, 3])?;
    eprintln!("IPv6 up in {:?}: {v6:#?}", started.elapsed());

    check_uplinks(&lab, &v6)?;
    let isp1 = v6.uplink(dhcp6::LAN_UPLINK)?;
    ensure!(
        dhcp6::within(v6.lan, isp1.delegation),
        "the LAN's {} is not of isp1's {}",
        v6.lan,
        isp1.delegation
    );
    ensure!(
        isp1.delegation.contains(IpAddr::V6(v6.client_address)),
        "the client's {} is not under isp1's {}",
        v6.client_address,
        isp1.delegation
    );
    // wan2's and wan3's delegations are held, not used on the LAN.
    let lan_addresses = dhcp6::global_addresses(&lab, "router", "br-lan")?;
    ensure!(
        lan_addresses.len() == 1,
        "br-lan should carry one prefix, it has {lan_addresses:?}"
    );

    ensure!(
        router_egress(&lab, v6.client_address)? == "wan1",
        "the router does not send the LAN's traffic out through wan1"
    );
    ping_server(&lab, v6.client_address)?;

    // The harness puts a dual-stack link back as described: the kernel
    // drops an interface's IPv6 addresses when it goes down.
    lab.set_link_up("isp1", "up0", false)?;
    lab.set_link_up("isp1", "up0", true)?;
    ping_server(&lab, v6.client_address)?;
    Ok(())
}

#[test]
fn renumbering_moves_the_lan_to_the_new_prefix() -> Result<()> {
    if !require_root("renumbering_moves_the_lan_to_the_new_prefix") {
        return Ok(());
    }
    let mut lab = Lab::up(&LabDesc::shipped("dhcp")?, &unique_prefix())?;
    let mut v6 = dhcp6::start(&mut lab, &[1, 2])?;
    let (old, old_lan, old_client) = (v6.uplink(1)?.delegation, v6.lan, v6.client_address);
    let isp2 = v6.uplink(2)?.delegation;

    let started = Instant::now();
    let new = dhcp6::renumber(&mut lab, &mut v6, 1)?;
    eprintln!(
        "isp1 renumbered {old} to {new} in {:?}; the LAN {old_lan} to {}, the client {old_client} to {}",
        started.elapsed(),
        v6.lan,
        v6.client_address
    );

    ensure!(
        dhcp6::within(new, dhcp6::pd_pool(1, 2)),
        "isp1's new delegation {new} is not of its new pool {}",
        dhcp6::pd_pool(1, 2)
    );
    let in_kernel = dhcp6::kernel_delegations(&lab)?;
    ensure!(
        in_kernel.contains(&new) && !in_kernel.contains(&old) && in_kernel.contains(&isp2),
        "after renumbering the router's reject routes are {in_kernel:?} (new {new}, old {old}, wan2's {isp2})"
    );
    // The ISP routes the new /56 to the router, and the old one no more.
    let isp_routes: Vec<_> = dhcp6::routes(&lab, "isp1")?
        .into_iter()
        .filter(|r| r.protocol.as_deref() == Some("dhcp"))
        .map(|r| r.prefix())
        .collect::<Result<_>>()?;
    ensure!(
        isp_routes == [new],
        "isp1 routes {isp_routes:?} to the router, not just {new}"
    );
    check_uplinks(&lab, &v6)?;
    ping_server(&lab, v6.client_address)?;
    Ok(())
}
