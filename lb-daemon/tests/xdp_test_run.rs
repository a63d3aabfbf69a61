//! `lan_ingress` and `wan_ingress` on crafted packets, through the kernel's
//! `BPF_PROG_TEST_RUN`: the real verifier-approved program, the real maps,
//! no interfaces. Packets are built and checked with `etherparse`, so the
//! checksums are verified by code independent of the data plane's.
//!
//! Needs root (loading BPF); without it every test fails naming it under
//! `cargo xtask test` (`LB_REQUIRE_PREREQUISITES`), and says so and skips
//! under a plain `cargo test`.

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpHeaders, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{
    egress::{self, note, Egress, Note},
    hash,
    maps::{program, uplink_state, FragValue, RouterMacs, UplinkInfo, FRAGMENT_LIFETIME_NS},
    nat, reason,
    table::{self, Table},
    MAX_UPLINKS,
};
use lb_daemon::{
    config::FlowConfig,
    dataplane::{
        flows::FlowTables,
        pins::{Found, Pins},
        Dataplane, Family,
    },
    reconcile::bypass::Bypass,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_LAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: [u8; 4] = [10, 10, 0, 2];
const SERVER: [u8; 4] = [198, 51, 100, 10];
const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const NAT_PORTS: (u16, u16) = (20_000, 29_999);
const LOCAL_PORTS: (u16, u16) = (32_768, 60_999);

fn uplink_info(n: u8, state: u32) -> UplinkInfo {
    UplinkInfo {
        // Loopback: any existing device will do, test runs never transmit.
        ifindex: 1,
        state,
        addr: [100, 64, n, 2],
        src_mac: [0x02, 0xaa, 0, 0, n, 2],
        gw_mac: [0x02, 0xbb, 0, 0, n, 1],
        mtu: 1500,
        flags: 0,
        epoch: 0,
    }
}

/// Set (to anything but `0`) by `cargo xtask test`: a missing
/// prerequisite fails the test instead of skipping it (as in lb-tests'
/// `REQUIRE_PREREQUISITES`).
const REQUIRE_PREREQUISITES: &str = "LB_REQUIRE_PREREQUISITES";

/// Whether these tests can run: loading BPF needs root. Without it, the
/// test fails naming it when [`REQUIRE_PREREQUISITES`] is set (CI), and is
/// skipped, said past the harness's capture, when not.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a BPF_PROG_TEST_RUN test")
        .to_owned();
    let reason = format!(
        "BPF_PROG_TEST_RUN tests load programs and need root (euid is {euid}); run them with sudo"
    );
    if std::env::var_os(REQUIRE_PREREQUISITES).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test} cannot run: {reason} ({REQUIRE_PREREQUISITES} is set: a missing prerequisite fails the test)");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {reason} (with {REQUIRE_PREREQUISITES}=1, as under `cargo xtask test`, this fails)"
    );
    false
}

/// A data plane with two uplinks sharing the buckets 1:1.
struct Harness {
    dp: Dataplane,
}

impl Harness {
    fn new(states: [u32; 2]) -> Self {
        Self::on(Dataplane::load(1024).expect("load the XDP object"), states)
    }

    /// The same set-up on a data plane loaded otherwise (pinned).
    fn on(mut dp: Dataplane, states: [u32; 2]) -> Self {
        dp.set_classifier(0x1234_5678, hash::mode::FIVE_TUPLE)
            .expect("settings");
        dp.set_nat_ports(NAT_PORTS, LOCAL_PORTS).expect("nat ports");
        // Test runs arrive on loopback: it stands in for the LAN port.
        dp.add_lan(1).expect("lan");
        for (i, state) in states.iter().enumerate() {
            dp.set_uplink(i as u32, &uplink_info(i as u8 + 1, *state))
                .expect("uplink");
        }
        dp.add_bypass(ROUTER_LAN, 32).expect("bypass");
        dp.add_bypass(Ipv4Addr::new(10, 10, 0, 0), 24)
            .expect("bypass");
        let mut weights = [0u32; MAX_UPLINKS as usize];
        for (i, state) in states.iter().enumerate() {
            weights[i] = u32::from(*state == uplink_state::ACTIVE);
        }
        let mut t: Table = table::empty();
        table::rebalance(&mut t, &weights);
        dp.set_buckets(&t).expect("buckets");
        Self { dp }
    }

    /// Run `prog` once on `frame`: the verdict and the frame that came out.
    fn run(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let xdp = self.dp.xdp(prog).expect("program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = xdp.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn lan(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(program::LAN_INGRESS, frame)
    }

    fn reason(&self, r: u32) -> u64 {
        self.dp.reasons().expect("reasons")[r as usize]
    }

    /// The flow collector's view of the tables, with the default timeouts.
    fn flow_tables(&self) -> FlowTables {
        let addrs = (1..=2).map(|n| Ipv4Addr::new(100, 64, n, 2)).collect();
        self.dp
            .flow_tables(addrs, FlowConfig::default())
            .expect("flow tables")
    }
}

fn udp(src_port: u16, ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, SERVER, ttl)
        .udp(src_port, 53);
    build(b, b"query")
}

fn tcp(src_port: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .tcp(src_port, 443, 1000, 65535)
        .syn();
    build(b, b"")
}

/// A client's echo request with identifier `id`.
fn echo(id: u16) -> Vec<u8> {
    build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, SERVER, 64)
            .icmpv4_echo_request(id, 1),
        b"ping",
    )
}

fn build<B: Builder>(b: B, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    b.write_to(&mut v, payload);
    v
}

/// etherparse's final builder steps all have `write`; one trait to call it.
trait Builder {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]);
}
macro_rules! builder {
    ($($t:ty),*) => {$(
        impl Builder for etherparse::PacketBuilderStep<$t> {
            fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
                self.write(out, payload).expect("build packet");
            }
        }
    )*};
}
builder!(
    etherparse::UdpHeader,
    etherparse::TcpHeader,
    etherparse::Icmpv4Header,
    etherparse::Icmpv6Header
);

/// Check what `lan_ingress` sent: byte for byte what the reference model
/// in lb-common makes of the input with the NAT port the data plane chose,
/// and, independently, valid checksums and the right fields (etherparse).
/// Returns the NAT port.
fn assert_forwarded(input: &[u8], output: &[u8], uplink: &UplinkInfo) -> u16 {
    let pout = SlicedPacket::from_ethernet(output).expect("output parses");
    let eth = match &pout.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e.to_header(),
        other => panic!("no Ethernet header out: {other:?}"),
    };
    assert_eq!(
        eth.destination, uplink.gw_mac,
        "destination MAC is the gateway's"
    );
    assert_eq!(eth.source, uplink.src_mac, "source MAC is the uplink's");
    assert!(pout.vlan.is_none(), "no VLAN tag leaves by an uplink");
    let Some(etherparse::NetSlice::Ipv4(ip_out)) = &pout.net else {
        panic!("IPv4 out")
    };
    let hout = ip_out.header().to_header();
    assert_eq!(
        hout.source, uplink.addr,
        "source NATed to the uplink's address"
    );
    assert_eq!(
        hout.header_checksum,
        hout.calc_header_checksum(),
        "IP header checksum valid"
    );
    let nat_port = match &pout.transport {
        Some(TransportSlice::Udp(u)) => {
            let unsummed = match SlicedPacket::from_ethernet(input).map(|p| p.transport) {
                Ok(Some(TransportSlice::Udp(i))) => i.checksum() == 0,
                _ => false,
            };
            if unsummed {
                assert_eq!(
                    u.checksum(),
                    0,
                    "a UDP datagram without a checksum stays so"
                );
            } else {
                let calc = u
                    .to_header()
                    .calc_checksum_ipv4(&hout, u.payload())
                    .expect("udp checksum");
                assert_eq!(u.checksum(), calc, "UDP checksum valid");
            }
            u.source_port()
        }
        Some(TransportSlice::Tcp(t)) => {
            let calc = t
                .to_header()
                .calc_checksum_ipv4(&hout, t.payload())
                .expect("tcp checksum");
            assert_eq!(t.checksum(), calc, "TCP checksum valid");
            t.source_port()
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let h = i.header();
            assert_eq!(
                h.checksum,
                h.icmp_type.calc_checksum(i.payload()),
                "ICMP checksum valid"
            );
            u16::from_be_bytes([i.slice()[4], i.slice()[5]])
        }
        other => panic!("unexpected transport {other:?}"),
    };
    let t = nat::Outbound {
        src_mac: uplink.src_mac,
        dst_mac: uplink.gw_mac,
        nat_addr: uplink.addr,
        nat_port,
    };
    let mut model = vec![0u8; input.len()];
    let n = nat::outbound(input, &t, &mut model).expect("model translates");
    assert_eq!(output, &model[..n], "data plane and reference model agree");
    nat_port
}

/// Which uplink a forwarded frame went to, by its source MAC.
fn uplink_of(output: &[u8]) -> u8 {
    output[6 + 4]
}

#[test]
fn every_packet_of_a_flow_leaves_by_the_same_uplink_and_flows_spread() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let mut used = [0u32; 3];
    for port in 40_000..40_064u16 {
        let frame = if port % 2 == 0 {
            udp(port, 64)
        } else {
            tcp(port)
        };
        let (verdict, first) = h.lan(&frame);
        assert_eq!(verdict, XDP_REDIRECT);
        let uplink = uplink_of(&first);
        assert_forwarded(&frame, &first, &uplink_info(uplink, uplink_state::ACTIVE));
        for _ in 0..5 {
            let (verdict, again) = h.lan(&frame);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(again, first, "same flow, same uplink, same bytes");
        }
        used[uplink as usize] += 1;
    }
    assert!(
        used[1] > 10 && used[2] > 10,
        "64 flows spread over both uplinks: {used:?}"
    );
    let stats = h.dp.uplink_stats(0).expect("stats");
    assert_eq!(stats.new_flows, u64::from(used[1]));
    assert_eq!(stats.tx_packets, 6 * u64::from(used[1]));
}

#[test]
fn ip_options_and_icmp_echo_are_forwarded() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, CLIENT, SERVER).expect("header");
    ip.options = [1u8, 1, 1, 0][..].try_into().expect("options"); // NOP NOP NOP END
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(5000, 53);
    let frame = build(b, b"with options");
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_forwarded(
        &frame,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );

    let echo = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, SERVER, 64)
            .icmpv4_echo_request(77, 1),
        b"ping",
    );
    let (verdict, out) = h.lan(&echo);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_forwarded(
        &echo,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );
}

#[test]
fn vlan_tag_is_removed_on_the_way_out() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).expect("vlan id"))
        .ipv4(CLIENT, SERVER, 64)
        .udp(6000, 53);
    let frame = build(b, b"tagged");
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out.len(), frame.len() - 4);
    assert_forwarded(
        &frame,
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );
}

#[test]
fn what_the_fast_path_does_not_handle_passes_untouched() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let arp: Vec<u8> = [
        &[0xff; 6][..],
        &CLIENT_MAC,
        &[0x08, 0x06],
        &[0, 1, 8, 0, 6, 4, 0, 1],
        &CLIENT_MAC,
        &CLIENT,
        &[0; 6],
        &[10, 10, 0, 1],
    ]
    .concat();
    let ipv6 = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1, 2),
        b"v6",
    );
    let full = udp(7000, 64);
    let truncated_ip = full[..14 + 12].to_vec();
    let truncated_l4 = {
        // Cut inside the UDP header, and make the IP length agree.
        let mut f = full[..14 + 20 + 2].to_vec();
        f[16..18].copy_from_slice(&22u16.to_be_bytes());
        f
    };
    // The kernel's test run wants at least an Ethernet header; this is one
    // that announces IPv4 and carries nothing.
    let runt = full[..14].to_vec();
    let mut lying_length = full.clone();
    lying_length[16..18].copy_from_slice(&1500u16.to_be_bytes());
    // A later fragment (offset 185 x 8 bytes) whose first one never came.
    let mut fragment = full.clone();
    fragment[20] = 0x00;
    fragment[21] = 0xb9;
    let to_router = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, ROUTER_LAN.octets(), 64)
            .udp(7001, 22),
        b"",
    );
    let lan_neighbour = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, [10, 10, 0, 3], 64)
            .udp(7002, 22),
        b"",
    );
    // A new client's DHCP discover, and an mDNS announcement: never an
    // uplink's, whatever the routes say.
    let discover = build(
        PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6])
            .ipv4([0; 4], [255; 4], 64)
            .udp(68, 67),
        b"discover",
    );
    let mdns = build(
        PacketBuilder::ethernet2(CLIENT_MAC, [0x01, 0x00, 0x5e, 0, 0, 0xfb])
            .ipv4(CLIENT, [224, 0, 0, 251], 255)
            .udp(5353, 5353),
        b"announce",
    );
    let ttl_one = udp(7003, 1);
    let gre = {
        let mut f = full.clone();
        f[23] = 47;
        f
    };

    let cases: [(&str, &[u8], u32); 13] = [
        ("ARP", &arp, reason::PASS_NOT_IPV4),
        ("IPv6", &ipv6, reason::PASS_NOT_IPV4),
        (
            "truncated IPv4 header",
            &truncated_ip,
            reason::PASS_MALFORMED,
        ),
        (
            "truncated UDP header",
            &truncated_l4,
            reason::PASS_MALFORMED,
        ),
        ("Ethernet header only", &runt, reason::PASS_MALFORMED),
        (
            "IP length beyond the frame",
            &lying_length,
            reason::PASS_MALFORMED,
        ),
        (
            "later fragment, first unseen",
            &fragment,
            reason::PASS_FRAGMENT,
        ),
        ("to the router", &to_router, reason::PASS_LOCAL),
        ("to another LAN host", &lan_neighbour, reason::PASS_LOCAL),
        ("a DHCP discover", &discover, reason::PASS_LOCAL),
        ("mDNS", &mdns, reason::PASS_LOCAL),
        ("TTL 1", &ttl_one, reason::PASS_TTL),
        ("GRE", &gre, reason::PASS_UNSUPPORTED),
    ];
    for (what, frame, why) in cases {
        let before = h.reason(why);
        let (verdict, out) = h.lan(frame);
        assert_eq!(verdict, XDP_PASS, "{what}: to the kernel");
        assert_eq!(out, frame, "{what}: untouched");
        assert_eq!(
            h.reason(why),
            before + 1,
            "{what}: counted as {}",
            reason::NAMES[why as usize]
        );
    }
}

#[test]
fn no_uplink_up_drops_and_counts() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::DOWN; 2]);
    let (verdict, _) = h.lan(&udp(8000, 64));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.reason(reason::DROP_NO_UPLINK), 1);
}

#[test]
fn flows_of_a_downed_uplink_move_and_drained_ones_stay() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // Find one flow on each uplink.
    let mut on = [None, None];
    for port in 9000..9100u16 {
        let (_, out) = h.lan(&udp(port, 64));
        on[uplink_of(&out) as usize - 1].get_or_insert(port);
    }
    let (Some(p1), Some(p2)) = (on[0], on[1]) else {
        panic!("no flow on one uplink: {on:?}")
    };

    // Drain uplink 1: its flow stays.
    h.dp.set_uplink_state(0, uplink_state::DRAIN)
        .expect("drain");
    assert_eq!(
        uplink_of(&h.lan(&udp(p1, 64)).1),
        1,
        "drained uplink keeps its flow"
    );
    // Down: the flow moves to uplink 2 once the table no longer points at 1.
    h.dp.set_uplink_state(0, uplink_state::DOWN).expect("down");
    let mut t = table::empty();
    let mut w = [0u32; MAX_UPLINKS as usize];
    w[1] = 1;
    table::rebalance(&mut t, &w);
    h.dp.set_buckets(&t).expect("buckets");
    assert_eq!(
        uplink_of(&h.lan(&udp(p1, 64)).1),
        2,
        "flow of a dead uplink moves"
    );
    assert_eq!(
        uplink_of(&h.lan(&udp(p2, 64)).1),
        2,
        "flow on a live uplink stays"
    );
    assert_eq!(h.dp.uplink_stats(0).expect("stats").moved_away, 1);
}

#[test]
fn a_state_write_alone_moves_traffic_off_a_dead_uplink() {
    if !is_root() {
        return;
    }
    // The table still gives uplink 1 half the buckets; only its state says
    // down, as in the moment between the daemon's two writes (or while no
    // daemon runs at all).
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let mut pinned = None;
    for port in 9200..9300u16 {
        if uplink_of(&h.lan(&udp(port, 64)).1) == 1 {
            pinned = Some(port);
            break;
        }
    }
    let pinned = pinned.expect("a flow on uplink 1");
    h.dp.set_uplink_state(0, uplink_state::DOWN).expect("down");
    let before = h.reason(reason::DROP_NO_UPLINK);
    assert_eq!(
        uplink_of(&h.lan(&udp(pinned, 64)).1),
        2,
        "the pinned flow moves at once"
    );
    // New flows: every one leaves by uplink 2, none is dropped (with half
    // the buckets dead, 9 tries miss in 1 of 512 flows; these 100 were
    // checked not to).
    for port in 9400..9500u16 {
        let (verdict, out) = h.lan(&udp(port, 64));
        assert_eq!(verdict, XDP_REDIRECT, "port {port}");
        assert_eq!(uplink_of(&out), 2, "port {port}");
    }
    assert_eq!(h.reason(reason::DROP_NO_UPLINK), before);
}

#[test]
fn wan_ingress_counts_and_passes() {
    if !is_root() {
        return;
    }
    // Test runs arrive on loopback, which stands for uplink 2 (index 1):
    // what arrives there is counted on it, whatever becomes of it.
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let reasons_before = h.dp.reasons().expect("reasons");
    // Not addressed to the uplink (no NAT mapping can match): the kernel's.
    let stray = udp(53, 60);
    // Not IPv4 at all: an ARP request from the gateway for the uplink's
    // address, which the router must answer.
    let up = uplink_info(2, uplink_state::ACTIVE);
    let arp: Vec<u8> = [
        &[0xff; 6][..],
        &up.gw_mac,
        &[0x08, 0x06],
        &[0, 1, 8, 0, 6, 4, 0, 1],
        &up.gw_mac,
        &[100, 64, 2, 1],
        &[0; 6],
        &up.addr,
    ]
    .concat();
    for (what, frame, why) in [
        ("IPv4 not for the uplink", &stray, reason::PASS_NO_MAPPING),
        ("ARP", &arp, reason::PASS_NOT_IPV4),
    ] {
        let before = h.reason(why);
        let (verdict, out) = h.run(program::WAN_INGRESS, frame);
        assert_eq!(verdict, XDP_PASS, "{what}: to the kernel");
        assert_eq!(&out, frame, "{what}: untouched");
        assert_eq!(h.reason(why), before + 1, "{what}: counted as {why}");
    }

    let stats = h.dp.uplink_stats(1).expect("stats");
    assert_eq!(stats.rx_packets, 2, "both arrivals counted on uplink 2");
    assert_eq!(
        stats.rx_bytes,
        (stray.len() + arp.len()) as u64,
        "their whole frames' bytes counted on uplink 2"
    );
    assert_eq!(
        (stats.tx_packets, stats.replies, stats.new_flows),
        (0, 0, 0),
        "nothing sent, translated or pinned on uplink 2"
    );
    let other = h.dp.uplink_stats(0).expect("stats");
    assert_eq!(
        (other.rx_packets, other.rx_bytes),
        (0, 0),
        "nothing counted on uplink 1, where nothing arrived"
    );
    // Exactly the two passes, no other verdict.
    let reasons = h.dp.reasons().expect("reasons");
    let moved: Vec<(usize, u64)> = reasons
        .iter()
        .zip(reasons_before)
        .enumerate()
        .filter(|(_, (now, before))| *now != before)
        .map(|(r, (now, before))| (r, now - before))
        .collect();
    assert_eq!(
        moved,
        [
            (reason::PASS_NOT_IPV4 as usize, 1),
            (reason::PASS_NO_MAPPING as usize, 1)
        ],
        "no other reason counted"
    );
}

/// A reply from the server to uplink 2 (the one loopback stands for in
/// `wan_ingress` test runs), for a flow that went out with `nat_port`.
fn reply_to(proto: &str, nat_port: u16, server_port: u16) -> Vec<u8> {
    let up = uplink_info(2, uplink_state::ACTIVE);
    let b = PacketBuilder::ethernet2(up.gw_mac, up.src_mac).ipv4(SERVER, up.addr, 60);
    match proto {
        "udp" => build(b.udp(server_port, nat_port), b"answer"),
        _ => build(
            b.tcp(server_port, nat_port, 5000, 65535).syn().ack(1001),
            b"",
        ),
    }
}

/// Send `frame` out through `lan_ingress` until it leaves by uplink 2 (the
/// one `wan_ingress` test runs can answer for); returns its NAT port and
/// the frame that left.
fn out_via_uplink2(h: &mut Harness, make: impl Fn(u16) -> Vec<u8>) -> (u16, Vec<u8>, Vec<u8>) {
    out_via_uplink2_from(h, 5000, make)
}

/// As [`out_via_uplink2`], with client ports (or echo identifiers) from
/// `first` on: in the router's own range ([`LOCAL_PORTS`]) they are
/// mapped to another, which what comes back must undo.
fn out_via_uplink2_from(
    h: &mut Harness,
    first: u16,
    make: impl Fn(u16) -> Vec<u8>,
) -> (u16, Vec<u8>, Vec<u8>) {
    for port in first..first + 200 {
        let frame = make(port);
        let (verdict, out) = h.lan(&frame);
        assert_eq!(verdict, XDP_REDIRECT);
        if uplink_of(&out) == 2 {
            let nat_port = assert_forwarded(&frame, &out, &uplink_info(2, uplink_state::ACTIVE));
            return (nat_port, frame, out);
        }
    }
    panic!("no flow landed on uplink 2");
}

fn inbound_model(frame: &[u8], client_port: u16, icmp_error: bool) -> Vec<u8> {
    let t = nat::Inbound {
        src_mac: ROUTER_LAN_MAC,
        dst_mac: CLIENT_MAC,
        vlan_tci: 0,
        client_addr: CLIENT,
        client_port,
    };
    let mut out = vec![0u8; frame.len() + 4];
    let n = if icmp_error {
        nat::icmp_error_inbound(frame, &t, &mut out)
    } else {
        nat::inbound(frame, &t, &mut out)
    }
    .expect("model translates");
    out.truncate(n);
    out
}

#[test]
fn replies_are_translated_back_to_the_client() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    for proto in ["udp", "tcp"] {
        let (nat_port, frame, _) =
            out_via_uplink2(&mut h, |p| if proto == "udp" { udp(p, 64) } else { tcp(p) });
        let client_port = u16::from_be_bytes([frame[34], frame[35]]);
        assert_eq!(
            nat_port, client_port,
            "{proto}: a free client port outside the router's range is kept"
        );
        let server_port = if proto == "udp" { 53 } else { 443 };
        let reply = reply_to(proto, nat_port, server_port);
        let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
        assert_eq!(verdict, XDP_REDIRECT, "{proto} reply goes to the LAN");
        assert_eq!(
            back,
            inbound_model(&reply, client_port, false),
            "{proto}: data plane and model agree"
        );
        let p = SlicedPacket::from_ethernet(&back).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("IPv4")
        };
        let hdr = ip.header().to_header();
        assert_eq!(hdr.destination, CLIENT);
        assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
    }
    assert_eq!(h.dp.uplink_stats(1).expect("stats").replies, 2);
}

#[test]
fn when_an_uplinks_nat_ports_run_out_new_flows_are_refused_and_counted_never_mistranslated() {
    const RANGE: (u16, u16) = (20_000, 20_003);
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    h.dp.set_nat_ports(RANGE, LOCAL_PORTS).expect("nat ports");
    // Client ports in the router's own range: each flow needs a NAT port.
    let mut taken = std::collections::BTreeSet::new();
    let (mut forwarded, mut refused) = (0, Vec::new());
    let before = h.reason(reason::DROP_NAT_EXHAUSTED);
    for port in 40_000..40_040u16 {
        let frame = udp(port, 64);
        let (verdict, out) = h.lan(&frame);
        match verdict {
            XDP_REDIRECT => {
                let uplink = uplink_of(&out);
                let nat_port =
                    assert_forwarded(&frame, &out, &uplink_info(uplink, uplink_state::ACTIVE));
                assert!(
                    (RANGE.0..=RANGE.1).contains(&nat_port),
                    "flow {port}: NAT port {nat_port} outside {RANGE:?}"
                );
                assert!(
                    taken.insert((uplink, nat_port)),
                    "flow {port}: port {nat_port} of uplink {uplink} given twice"
                );
                forwarded += 1;
            }
            XDP_DROP => refused.push(port),
            other => panic!("flow {port}: verdict {other}"),
        }
    }
    let ports = usize::from(RANGE.1 - RANGE.0 + 1);
    assert!(
        forwarded <= 2 * ports,
        "{forwarded} flows for {ports} ports on each of 2 uplinks"
    );
    assert!(forwarded >= ports, "only {forwarded} flows got a port");
    assert_eq!(forwarded + refused.len(), 40);
    assert_eq!(
        h.reason(reason::DROP_NAT_EXHAUSTED) - before,
        refused.len() as u64,
        "every refusal counted as drop_nat_exhausted"
    );
    let failures: u64 = (0..2)
        .map(|i| h.dp.uplink_stats(i).expect("stats").nat_failures)
        .sum();
    assert_eq!(
        failures,
        refused.len() as u64,
        "and as its uplink's nat_failures"
    );
    // A refused flow that tries again is refused again, never given a
    // port another flow holds.
    let again = refused.first().expect("some flows were refused");
    assert_eq!(h.lan(&udp(*again, 64)).0, XDP_DROP);
}

/// `frame` (plain Ethernet) as a PPPoE session `session` on VLAN 7 has it.
fn wrap_pppoe(frame: &[u8], session: u16, ppp_proto: u16) -> Vec<u8> {
    let ip_len = (frame.len() - 14) as u16;
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00, 0x00, 0x07, 0x88, 0x64, 0x11, 0x00]);
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(&(ip_len + 2).to_be_bytes());
    out.extend_from_slice(&ppp_proto.to_be_bytes());
    out.extend_from_slice(&frame[14..]);
    out
}

#[test]
fn pppoe_and_vlan_uplinks_get_their_headers_pushed_and_popped() {
    use lb_common::{encap::Encap, maps::uplink_flags};
    const SESSION: u16 = 0x1234;
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    h.dp.set_encap(
        1,
        &Encap {
            vlan_tci: 7,
            pppoe_session: SESSION,
        },
    )
    .expect("encap");
    let wrapped = UplinkInfo {
        mtu: 1492,
        flags: uplink_flags::WRAPPED,
        ..uplink_info(2, uplink_state::ACTIVE)
    };
    h.dp.set_uplink(1, &wrapped).expect("uplink");

    for proto in ["udp", "tcp"] {
        // Out: the same translation as on plain Ethernet, in a PPPoE
        // session frame on VLAN 7 of the right length.
        let (frame, out) = (5000..5200u16)
            .map(|p| if proto == "udp" { udp(p, 64) } else { tcp(p) })
            .map(|f| {
                let (verdict, out) = h.lan(&f);
                assert_eq!(verdict, XDP_REDIRECT);
                (f, out)
            })
            .find(|(_, out)| out[12..14] == [0x81, 0x00])
            .expect("a flow on the PPPoE uplink");
        assert_eq!(&out[0..12], &[wrapped.gw_mac, wrapped.src_mac].concat()[..]);
        assert_eq!(&out[14..16], &[0x00, 0x07], "VLAN 7");
        assert_eq!(
            &out[16..20],
            &[0x88, 0x64, 0x11, 0x00],
            "a PPPoE session frame"
        );
        assert_eq!(&out[20..22], &SESSION.to_be_bytes(), "its session");
        let ip_len = out.len() - 26;
        assert_eq!(
            u16::from_be_bytes([out[22], out[23]]) as usize,
            ip_len + 2,
            "the PPPoE length counts the PPP protocol and the packet"
        );
        assert_eq!(&out[24..26], &[0x00, 0x21], "PPP: IPv4");
        let mut plain = out[..12].to_vec();
        plain.extend_from_slice(&[0x08, 0x00]);
        plain.extend_from_slice(&out[26..]);
        let nat_port = assert_forwarded(&frame, &plain, &wrapped);

        // Back: the session frame is the client's plain Ethernet frame.
        let client_port = u16::from_be_bytes([frame[34], frame[35]]);
        let server_port = if proto == "udp" { 53 } else { 443 };
        let reply = reply_to(proto, nat_port, server_port);
        let (verdict, back) = h.run(program::WAN_INGRESS, &wrap_pppoe(&reply, SESSION, 0x0021));
        assert_eq!(verdict, XDP_REDIRECT, "{proto}: the reply goes to the LAN");
        assert_eq!(
            back,
            inbound_model(&reply, client_port, false),
            "{proto}: as a plain reply would"
        );
    }
    // A VLAN-tagged WAN without PPPoE: the tag alone, both ways.
    h.dp.set_encap(
        1,
        &Encap {
            vlan_tci: 7,
            pppoe_session: 0,
        },
    )
    .expect("encap");
    let (frame, out) = (6000..6200u16)
        .map(|p| {
            let f = udp(p, 64);
            let (verdict, out) = h.lan(&f);
            assert_eq!(verdict, XDP_REDIRECT);
            (f, out)
        })
        .find(|(_, out)| out[12..14] == [0x81, 0x00])
        .expect("a flow on the tagged uplink");
    assert_eq!(&out[14..18], &[0x00, 0x07, 0x08, 0x00], "VLAN 7, IPv4");
    let mut plain = out[..12].to_vec();
    plain.extend_from_slice(&out[16..]);
    let nat_port = assert_forwarded(&frame, &plain, &wrapped);
    let reply = reply_to("udp", nat_port, 53);
    let mut tagged = reply[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&reply[12..]);
    let (verdict, back) = h.run(program::WAN_INGRESS, &tagged);
    assert_eq!(verdict, XDP_REDIRECT, "a tagged reply goes to the LAN");
    let client_port = u16::from_be_bytes([frame[34], frame[35]]);
    assert_eq!(back, inbound_model(&reply, client_port, false));
    h.dp.set_encap(
        1,
        &Encap {
            vlan_tci: 7,
            pppoe_session: SESSION,
        },
    )
    .expect("encap");

    // Another session, and LCP: the kernel's, untouched.
    let reply = reply_to("udp", 5000, 53);
    for other in [
        wrap_pppoe(&reply, SESSION + 1, 0x0021),
        wrap_pppoe(&reply, SESSION, 0xc021),
    ] {
        let (verdict, back) = h.run(program::WAN_INGRESS, &other);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(back, other, "untouched");
    }
}

#[test]
fn client_ports_the_router_may_use_are_remapped_into_the_nat_range() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let (verdict, out) = h.lan(&udp(40_000, 64));
    assert_eq!(verdict, XDP_REDIRECT);
    let port = assert_forwarded(
        &udp(40_000, 64),
        &out,
        &uplink_info(uplink_of(&out), uplink_state::ACTIVE),
    );
    assert!(
        (NAT_PORTS.0..=NAT_PORTS.1).contains(&port),
        "port {port} in the NAT range"
    );
}

#[test]
fn two_clients_with_one_source_port_get_two_mappings() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // Both clients' flows must land on uplink 2 to collide: find a port for
    // which both do.
    let second_client = [10, 10, 0, 3];
    let make = |client: [u8; 4], port: u16| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv4(client, SERVER, 64)
                .udp(port, 53),
            b"q",
        )
    };
    let mut ports = None;
    for port in 5000..6000u16 {
        let (_, a) = h.lan(&make(CLIENT, port));
        let (_, b) = h.lan(&make(second_client, port));
        if uplink_of(&a) == 2 && uplink_of(&b) == 2 {
            let up = uplink_info(2, uplink_state::ACTIVE);
            ports = Some((
                port,
                assert_forwarded(&make(CLIENT, port), &a, &up),
                assert_forwarded(&make(second_client, port), &b, &up),
            ));
            break;
        }
    }
    let (client_port, first, second) = ports.expect("a port where both clients use uplink 2");
    assert_eq!(first, client_port, "the first keeps its port");
    assert_ne!(second, first, "the second gets another mapping");
    assert!((NAT_PORTS.0..=NAT_PORTS.1).contains(&second));
    // Each reply goes back to its own client.
    for (nat_port, client) in [(first, CLIENT), (second, second_client)] {
        let (verdict, back) = h.run(program::WAN_INGRESS, &reply_to("udp", nat_port, 53));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            &back[30..34],
            &client,
            "reply to {nat_port} goes to {client:?}"
        );
        assert_eq!(u16::from_be_bytes([back[36], back[37]]), client_port);
    }
}

#[test]
fn a_frame_to_another_gateways_mac_is_left_to_the_bridge_and_pins_nothing() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // The router's MACs on the test runs' port (loopback, ifindex 1).
    let macs = RouterMacs::new([ROUTER_LAN_MAC]).expect("one MAC fits");
    h.dp.set_router_macs(1, Some(macs)).expect("router MACs");
    // A client that routes the head office's 10.50.0.0/16 through a VPN
    // box on the LAN: to the box's MAC, an address lb does not keep.
    const VPN_BOX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
    let to = |mac: [u8; 6], port: u16| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, mac)
                .ipv4(CLIENT, [10, 50, 0, 1], 64)
                .udp(port, 53),
            b"q",
        )
    };
    let before = h.reason(reason::PASS_ELSEWHERE);
    for frame in [
        to(VPN_BOX_MAC, 7000),
        to([0xff; 6], 7001),
        to([0x01, 0, 0x5e, 0, 0, 1], 7002),
    ] {
        let (verdict, out) = h.lan(&frame);
        assert_eq!(
            verdict, XDP_PASS,
            "a frame not to the router is the bridge's"
        );
        assert_eq!(out, frame, "and untouched");
    }
    assert_eq!(h.reason(reason::PASS_ELSEWHERE) - before, 3);
    assert!(
        h.flow_tables().flows().expect("flows").is_empty(),
        "no flow is pinned for them"
    );
    // The same client's frame to the router is balanced as ever.
    let frame = to(ROUTER_LAN_MAC, 7000);
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    let up = uplink_info(uplink_of(&out), uplink_state::ACTIVE);
    assert_forwarded(&frame, &out, &up);
    // A port without an entry (an older lbd wrote none) is served as
    // before.
    h.dp.set_router_macs(1, None).expect("forget");
    let frame = to(VPN_BOX_MAC, 7003);
    assert_eq!(h.lan(&frame).0, XDP_REDIRECT);
}

/// A pinned data plane under a bpffs directory of the test's own, gone
/// when it ends (also on failure).
struct PinnedRoot(std::path::PathBuf);

impl PinnedRoot {
    fn new(test: &str) -> Self {
        let root =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lb-{test}-{}", std::process::id()));
        let _ = Pins::new(&root).remove();
        Self(root)
    }

    fn pins(&self) -> Pins {
        Pins::new(&self.0)
    }
}

impl Drop for PinnedRoot {
    fn drop(&mut self) {
        let _ = self.pins().remove();
    }
}

/// `count` UDP flows from as many client ports, through a pinned data
/// plane at `root` of `max` flows: each flow's NAT port, by client port.
fn flows_through(root: &PinnedRoot, max: u32, count: u16) -> Vec<(u16, u16, u8)> {
    let pins = root.pins();
    let (_, carry) = pins.prepare(max).expect("prepare");
    assert!(carry.is_none(), "nothing to carry yet");
    let dp = Dataplane::load_pinned(max, Some(&pins)).expect("load pinned");
    let mut h = Harness::on(dp, [uplink_state::ACTIVE; 2]);
    (0..count)
        .map(|i| {
            let port = 6000 + i;
            let (verdict, out) = h.lan(&udp(port, 64));
            assert_eq!(verdict, XDP_REDIRECT);
            let up = uplink_info(uplink_of(&out), uplink_state::ACTIVE);
            (
                port,
                assert_forwarded(&udp(port, 64), &out, &up),
                uplink_of(&out),
            )
        })
        .collect()
}

/// The replies to `flows`' mappings reach their clients through `h`
/// (those of uplink 2's flows: the test runs' uplinks share loopback,
/// which the data plane takes for uplink 2's).
fn replies_reach_their_clients(h: &mut Harness, flows: &[(u16, u16, u8)]) {
    let second: Vec<_> = flows.iter().filter(|f| f.2 == 2).collect();
    assert!(!second.is_empty(), "no flow took uplink 2");
    for &&(client_port, nat_port, _) in &second {
        let reply = reply_to("udp", nat_port, 53);
        let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "the reply to {nat_port} is translated"
        );
        assert_eq!(u16::from_be_bytes([back[36], back[37]]), client_port);
    }
}

#[test]
fn an_upgrade_from_a_layout_it_migrates_keeps_the_flows_and_their_mappings() {
    if !is_root() {
        return;
    }
    let root = PinnedRoot::new("carry-layout");
    let flows = flows_through(&root, 1024, 50);
    // As an lbd of the layout before would have left it.
    let (older_layout, remade) = lb_common::maps::MIGRATES_FROM[0];
    let ours = root.0.join(format!("v{}", lb_common::maps::LAYOUT));
    let older = root.0.join(format!("v{older_layout}"));
    std::fs::rename(&ours, &older).expect("rename");
    // Layout 9's bypass trie had room for 256 prefixes.
    let small_trie = older.join("maps").join("BYPASS");
    std::fs::remove_file(&small_trie).expect("unpin the bypass trie");
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&small_trie)
        .args([
            "type", "lpm_trie", "key", "8", "value", "4", "entries", "256",
        ])
        .args(["name", "BYPASS", "flags", "1"])
        .status()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(made.success(), "bpftool map create: {made}");
    // And its IPv6 one, holding a prefix (2001:db8:77::/48) the running
    // programs keep reading.
    let small_trie6 = older.join("maps").join("BYPASS6");
    std::fs::remove_file(&small_trie6).expect("unpin the IPv6 bypass trie");
    let bpftool = |args: &[&str]| {
        let done = std::process::Command::new("bpftool")
            .args(args)
            .status()
            .expect("bpftool");
        assert!(done.success(), "bpftool {args:?}: {done}");
    };
    let trie6 = small_trie6.to_str().expect("path");
    bpftool(&[
        "map", "create", trie6, "type", "lpm_trie", "key", "20", "value", "4", "entries", "256",
        "name", "BYPASS6", "flags", "1",
    ]);
    let mut update = vec!["map", "update", "pinned", trie6, "key", "48", "0", "0", "0"];
    update.extend(["0x20", "0x01", "0x0d", "0xb8", "0", "0x77"]);
    update.extend(["0"; 10]);
    update.extend(["value", "1", "0", "0", "0"]);
    bpftool(&update);

    let pins = root.pins();
    let (found, carry) = pins.prepare(1024).expect("prepare");
    assert_eq!(found, Found::Adoptable, "the older data plane is adopted");
    assert!(
        !ours.join("maps").join("BYPASS").exists(),
        "a bypass trie with less room is made anew"
    );
    assert!(!older.exists(), "and moved");
    let carry = carry.expect("a remade flow table is carried");
    let dp = Dataplane::load_pinned(1024, Some(&pins)).expect("load pinned");
    let trie = aya::maps::MapData::from_pin(ours.join("maps").join("BYPASS"))
        .and_then(|m| m.info())
        .expect("the new bypass trie is pinned");
    assert_eq!(trie.max_entries(), lb_common::BYPASS_ENTRIES);
    let trie6 = aya::maps::MapData::from_pin(ours.join("maps").join("BYPASS6"))
        .and_then(|m| m.info())
        .expect("the new IPv6 bypass trie is pinned");
    assert_eq!(trie6.max_entries(), lb_common::BYPASS_ENTRIES);
    assert_eq!(
        dp.bypass6_prefixes().expect("BYPASS6"),
        [("2001:db8:77::".parse().expect("address"), 48)],
        "the IPv6 trie's prefixes are copied before lan_ingress6 can read it"
    );
    assert!(
        !pins.carried("BYPASS6").exists(),
        "the old IPv6 trie is let go"
    );
    let copied = carry.copy_into(&dp);
    if remade.contains(&"NAT_REV") {
        assert!(copied.contains(&("NAT_REV", 50, 0)), "{copied:?}");
    }
    // A second copy adds nothing that is there.
    assert!(carry.copy_into(&dp).iter().all(|c| c.1 == 0));
    carry.finish();
    assert!(
        !ours.join("carry").exists(),
        "the carried tables are let go"
    );
    let mut h = Harness::on(dp, [uplink_state::ACTIVE; 2]);
    replies_reach_their_clients(&mut h, &flows);
    // And each flow keeps its mapping.
    for &(client_port, nat_port, _) in &flows {
        let (_, out) = h.lan(&udp(client_port, 64));
        let up = uplink_info(uplink_of(&out), uplink_state::ACTIVE);
        assert_eq!(assert_forwarded(&udp(client_port, 64), &out, &up), nat_port);
    }
}

#[test]
fn a_new_flows_max_makes_new_tables_and_carries_the_flows_over() {
    if !is_root() {
        return;
    }
    let root = PinnedRoot::new("carry-size");
    let flows = flows_through(&root, 1024, 50);
    let pins = root.pins();
    let (found, carry) = pins.prepare(4096).expect("prepare");
    let carry = carry.expect("tables of another size are carried");
    assert_eq!(
        found,
        Found::Adoptable,
        "the rest of the data plane is adopted"
    );
    let dp = Dataplane::load_pinned(4096, Some(&pins)).expect("load pinned");
    let copied = carry.copy_into(&dp);
    assert!(
        copied.contains(&("FLOWS", 50, 0)) && copied.contains(&("NAT_REV", 50, 0)),
        "{copied:?}"
    );
    // A start that stops here finds them again.
    let (_, again) = root.pins().prepare(4096).expect("prepare");
    assert!(
        again.is_some(),
        "an interrupted start's carried tables wait"
    );
    drop(again);
    carry.finish();
    let mut h = Harness::on(dp, [uplink_state::ACTIVE; 2]);
    replies_reach_their_clients(&mut h, &flows);
    // The new size holds: the next start finds nothing to carry.
    drop(h);
    let (found, carry) = root.pins().prepare(4096).expect("prepare");
    assert_eq!(found, Found::Adoptable);
    assert!(carry.is_none(), "the tables are the configured size now");
}

#[test]
fn a_flow_moved_by_its_uplinks_new_address_still_gets_its_replies() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let (_, frame, _) = out_via_uplink2(&mut h, |p| udp(p, 64));
    // The ISP renumbers uplink 2: lbd writes its new address with the
    // epoch bumped.
    let mut renumbered = uplink_info(2, uplink_state::ACTIVE);
    renumbered.addr = [100, 64, 2, 9];
    renumbered.epoch = 1;
    h.dp.set_uplink(1, &renumbered).expect("uplink");
    // The flow's next packet takes a new mapping, under the new address
    // (its bucket is uplink 2's still).
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(
        &out[26..30],
        &renumbered.addr,
        "leaves with the new address"
    );
    let port = u16::from_be_bytes([out[34], out[35]]);
    // The reply to that mapping reaches the client: the old mapping's
    // removal took nothing of the new one's.
    let reply = build(
        PacketBuilder::ethernet2(renumbered.gw_mac, renumbered.src_mac)
            .ipv4(SERVER, renumbered.addr, 60)
            .udp(53, port),
        b"answer",
    );
    let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
    assert_eq!(verdict, XDP_REDIRECT, "the reply found no mapping");
    assert_eq!(&back[30..34], &CLIENT);
}

#[test]
fn a_reply_still_tagged_on_a_plain_uplink_is_left_to_the_kernel() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let (nat_port, _, _) = out_via_uplink2(&mut h, |p| udp(p, 64));
    // The reply to that mapping, but with an ISP's priority tag (VLAN 0)
    // in front: its headers are not where the rewrite writes.
    let up = uplink_info(2, uplink_state::ACTIVE);
    let tagged = build(
        PacketBuilder::ethernet2(up.gw_mac, up.src_mac)
            .single_vlan(etherparse::VlanId::try_new(0).expect("vlan id"))
            .ipv4(SERVER, up.addr, 60)
            .udp(53, nat_port),
        b"answer",
    );
    let (verdict, back) = h.run(program::WAN_INGRESS, &tagged);
    assert_eq!(verdict, XDP_PASS, "a tagged reply is the kernel's");
    assert_eq!(back, tagged, "and goes to it untouched");
    assert_eq!(h.reason(reason::PASS_UNSUPPORTED), 1);
    // Untagged, the same reply is lb's.
    let (verdict, _) = h.run(program::WAN_INGRESS, &reply_to("udp", nat_port, 53));
    assert_eq!(verdict, XDP_REDIRECT);
}

#[test]
fn icmp_errors_about_natted_packets_reach_the_client() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // A UDP datagram quoted as RFC 792 asks (its header and 8 bytes); a
    // TCP SYN and an echo request quoted whole, as most routers quote.
    // Each from a client port (or identifier) in the router's own range:
    // the NAT maps it to another, and the quote must get it back.
    // And a UDP datagram without a checksum (zero): it stays without.
    let unsummed = |p: u16| {
        let mut f = udp(p, 64);
        f[40..42].copy_from_slice(&[0, 0]);
        f
    };
    type Make = Box<dyn Fn(u16) -> Vec<u8>>;
    let flows: [(&str, Make, Option<usize>); 4] = [
        ("UDP", Box::new(|p| udp(p, 64)), Some(28)),
        ("UDP without a checksum", Box::new(unsummed), None),
        ("TCP", Box::new(tcp), None),
        ("echo", Box::new(echo), None),
    ];
    for (what, make, quote_len) in flows {
        let (nat_port, frame, out) = out_via_uplink2_from(&mut h, LOCAL_PORTS.0 + 1000, make);
        let port_at = if what == "echo" { 4 } else { 0 };
        let client_port = u16::from_be_bytes([frame[34 + port_at], frame[35 + port_at]]);
        assert_ne!(
            nat_port, client_port,
            "{what}: the client's port was mapped"
        );
        let up = uplink_info(2, uplink_state::ACTIVE);
        // From a router beyond the ISP, quoting what left.
        let quoted = &out[14..14 + quote_len.unwrap_or(out.len() - 14)];
        for (kind, code) in [(11u8, 0u8), (3, 4), (3, 3)] {
            let mut icmp = vec![
                kind,
                code,
                0,
                0,
                0,
                0,
                if code == 4 { 0x05 } else { 0 },
                if code == 4 { 0x78 } else { 0 },
            ];
            icmp.extend_from_slice(quoted);
            let c = lb_common::csum::checksum(&icmp, 0);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            let b =
                PacketBuilder::ethernet2(up.gw_mac, up.src_mac).ipv4([100, 65, 2, 1], up.addr, 60);
            let mut err = Vec::new();
            b.write(&mut err, etherparse::IpNumber::ICMP, &icmp)
                .expect("build");
            let (verdict, back) = h.run(program::WAN_INGRESS, &err);
            let this = format!("ICMP {kind}/{code} about {what}");
            assert_eq!(verdict, XDP_REDIRECT, "{this} goes to the client");
            assert_eq!(
                back,
                inbound_model(&err, client_port, true),
                "{this}: data plane and model agree"
            );
            // Independently: outer and quoted headers carry the client, and
            // the checksums verify.
            assert_eq!(&back[30..34], &CLIENT);
            assert_eq!(
                &back[34 + 8 + 12..34 + 8 + 16],
                &CLIENT,
                "{this}: quoted source is the client"
            );
            assert!(
                lb_common::csum::verifies(&back[34..], 0),
                "{this}: ICMP checksum"
            );
            assert!(
                lb_common::csum::verifies(&back[42..62], 0),
                "{this}: quoted IP checksum"
            );
            assert_eq!(
                u16::from_be_bytes([back[62 + port_at], back[63 + port_at]]),
                client_port,
                "{this}: the quoted source port is the client's again"
            );
            if quote_len.is_none() {
                // Quoted whole: the client gets back the very segment it
                // sent, its checksum included.
                assert_eq!(
                    &back[62..],
                    &frame[34..],
                    "{this}: the quoted segment is the client's own"
                );
            }
        }
    }
}

#[test]
fn ping_goes_out_and_its_reply_comes_back() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // An identifier in the router's own range: mapped to another going
    // out, and back to the client's coming in.
    let (nat_id, frame, _) = out_via_uplink2_from(&mut h, LOCAL_PORTS.0 + 1000, echo);
    let id = u16::from_be_bytes([frame[38], frame[39]]);
    assert_ne!(nat_id, id, "the echo identifier was mapped");
    let up = uplink_info(2, uplink_state::ACTIVE);
    let reply = build(
        PacketBuilder::ethernet2(up.gw_mac, up.src_mac)
            .ipv4(SERVER, up.addr, 60)
            .icmpv4_echo_reply(nat_id, 1),
        b"ping",
    );
    let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(back, inbound_model(&reply, id, false));
    assert_eq!(
        u16::from_be_bytes([back[38], back[39]]),
        id,
        "the reply carries the client's identifier"
    );
}

#[test]
fn wan_traffic_without_a_mapping_and_ttl_one_go_to_the_kernel() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let up = uplink_info(2, uplink_state::ACTIVE);
    let ssh = build(
        PacketBuilder::ethernet2(up.gw_mac, up.src_mac)
            .ipv4(SERVER, up.addr, 60)
            .tcp(50_000, 22, 1, 100)
            .syn(),
        b"",
    );
    let (nat_port, _, _) = out_via_uplink2(&mut h, |p| udp(p, 64));
    let mut ttl_one = reply_to("udp", nat_port, 53);
    ttl_one[22] = 1;
    let c = lb_common::csum::checksum(
        &{
            let mut x = ttl_one[14..34].to_vec();
            x[10] = 0;
            x[11] = 0;
            x
        },
        0,
    );
    ttl_one[24..26].copy_from_slice(&c.to_be_bytes());
    let truncated_error = {
        let b = PacketBuilder::ethernet2(up.gw_mac, up.src_mac).ipv4([100, 65, 2, 1], up.addr, 60);
        let mut f = Vec::new();
        b.write(
            &mut f,
            etherparse::IpNumber::ICMP,
            &[11, 0, 0, 0, 0, 0, 0, 0, 0x45, 0],
        )
        .expect("build");
        f
    };
    for (what, frame, why) in [
        ("SSH to the router", &ssh, reason::PASS_NO_MAPPING),
        ("reply with TTL 1", &ttl_one, reason::PASS_TTL),
        (
            "ICMP error with a truncated quote",
            &truncated_error,
            reason::PASS_MALFORMED,
        ),
    ] {
        let before = h.reason(why);
        let (verdict, out) = h.run(program::WAN_INGRESS, frame);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(&out, frame, "{what}: untouched");
        assert_eq!(h.reason(why), before + 1, "{what}: counted");
    }
}

#[test]
fn a_full_flow_table_evicts_and_counts_and_a_full_nat_table_passes_to_the_kernel_never_shares() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let flow = |i: u32| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv4([10, 10, (i >> 8) as u8 + 1, i as u8], SERVER, 64)
                .udp(5000, 53),
            b"q",
        )
    };
    // The harness's flow table holds 1024 flows, its NAT table twice as
    // many mappings: 2048 distinct flows fill both.
    let mappings = lb_common::maps::nat_entries(1024);
    for i in 0..mappings {
        assert_eq!(h.lan(&flow(i)).0, XDP_REDIRECT, "flow {i} forwarded");
    }
    let now = h.flow_tables().flows().expect("flows").len() as u64;
    let evicted = h.dp.pinned_flows(2).expect("pinned") - now;
    assert!(now <= 1024, "{now} flows in a 1024-entry table");
    assert_eq!(
        evicted + now,
        u64::from(mappings),
        "every flow is either in the table or counted as evicted"
    );
    // The evicted flows' mappings stay until the collector sees them
    // orphaned: one more flow finds no room, and goes to the kernel's slow
    // path, counted, rather than given a mapping a live flow still has (or
    // dropped: lbd, whose collector frees the room, may not be running).
    let passed = h.reason(reason::PASS_NAT_FULL);
    let frame = flow(mappings);
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame, "untouched");
    assert_eq!(h.reason(reason::PASS_NAT_FULL), passed + 1);
    // The collector frees the orphans, and new flows go again; the one
    // the kernel took stays the kernel's (its server knows it by the
    // kernel's port).
    h.flow_tables()
        .collect_expired(coarse_now_ns())
        .expect("collect");
    assert_eq!(h.lan(&flow(mappings + 1)).0, XDP_REDIRECT);
    let kernels = h.reason(reason::PASS_KERNEL_CONNECTION);
    assert_eq!(h.lan(&frame).0, XDP_PASS);
    assert_eq!(h.reason(reason::PASS_KERNEL_CONNECTION), kernels + 1);
}

#[test]
fn the_collector_removes_idle_flows_with_their_mappings_and_keeps_the_rest() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // 10 UDP flows, each with its reverse mapping; replies find them.
    for port in 5000..5010 {
        assert_eq!(h.lan(&udp(port, 64)).0, XDP_REDIRECT, "flow {port}");
    }
    // A reply to port 5000, through each uplink: one of them has its flow.
    let replies: Vec<Vec<u8>> = (1..=2)
        .map(|n| {
            build(
                PacketBuilder::ethernet2([0x02, 0xbb, 0, 0, n, 1], [0x02, 0xaa, 0, 0, n, 2])
                    .ipv4(SERVER, [100, 64, n, 2], 64)
                    .udp(53, 5000),
                b"answer",
            )
        })
        .collect();
    let translated = |h: &mut Harness| {
        replies
            .iter()
            .filter(|r| h.run(program::WAN_INGRESS, r).0 == XDP_REDIRECT)
            .count()
    };
    assert_eq!(translated(&mut h), 1, "the reply finds its mapping");
    let mut tables = h.flow_tables();
    let stamped: Vec<u64> = tables
        .flows()
        .expect("flows")
        .iter()
        .map(|(_, v)| v.last_seen_ns)
        .collect();
    assert_eq!(stamped.len(), 10);
    let counts = tables.count_by_uplink().expect("counts");
    assert_eq!(counts.iter().sum::<u64>(), 10, "{counts:?}");
    let newest = stamped.iter().copied().max().unwrap_or(0);
    let oldest = stamped.iter().copied().min().unwrap_or(0);

    // Just inside the UDP timeout (measured from the newest packet as seen
    // from the oldest): nothing goes.
    let udp_timeout = FlowConfig::default().udp_timeout.as_nanos() as u64;
    assert_eq!(
        tables
            .collect_expired(oldest + udp_timeout)
            .expect("collect"),
        0
    );
    assert_eq!(tables.flows().expect("flows").len(), 10);

    // Past it for all of them: every flow goes, and with it every mapping,
    // so a reply now finds nothing and goes to the kernel.
    let removed = tables
        .collect_expired(newest + udp_timeout + 1)
        .expect("collect");
    assert_eq!(removed, 10);
    assert!(tables.flows().expect("flows").is_empty());
    let before = h.reason(reason::PASS_NO_MAPPING);
    assert_eq!(translated(&mut h), 0, "a mapping outlived its flow");
    assert_eq!(h.reason(reason::PASS_NO_MAPPING), before + 2);
}

/// Split an Ethernet + IPv4 frame (no options, no VLAN) into two IPv4
/// fragments at `at` bytes of IP payload (a multiple of 8), headers and
/// checksums fixed as a router that fragments would.
fn fragments(frame: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
    const L3: usize = 14;
    const IHL: usize = 20;
    assert_eq!(at % 8, 0);
    let payload = &frame[L3 + IHL..];
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = frame[..L3 + IHL].to_vec();
        f.extend_from_slice(data);
        let total = (IHL + data.len()) as u16;
        f[L3 + 2..L3 + 4].copy_from_slice(&total.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[L3 + 6..L3 + 8].copy_from_slice(&flags.to_be_bytes());
        f[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
        let sum = ip_checksum(&f[L3..L3 + IHL]);
        f[L3 + 10..L3 + 12].copy_from_slice(&sum.to_be_bytes());
        f
    };
    (
        piece(&payload[..at], 0, true),
        piece(&payload[at..], at, false),
    )
}

fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ip_checksum(header: &[u8]) -> u16 {
    !fold(ones_complement_sum(header, 0))
}

/// Whether the UDP datagram made of the IP payloads of `pieces` (in order),
/// between `src` and `dst`, has a valid checksum.
fn udp_checksum_ok(pieces: &[&[u8]], src: [u8; 4], dst: [u8; 4]) -> bool {
    let data: Vec<u8> = pieces.iter().flat_map(|f| f[34..].to_vec()).collect();
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(data.len() as u16).to_be_bytes());
    fold(ones_complement_sum(&data, ones_complement_sum(&pseudo, 0))) == 0xffff
}

#[test]
fn fragments_follow_their_first_one_both_ways() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let payload = vec![0x5a_u8; 2000];
    let request = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, SERVER, 64)
            .udp(8800, 53),
        &payload,
    );
    let (first, later) = fragments(&request, 1480);
    // A later fragment before its first one: the kernel's.
    assert_eq!(h.lan(&later).0, XDP_PASS);
    let (verdict, out_first) = h.lan(&first);
    assert_eq!(verdict, XDP_REDIRECT);
    let (verdict, out_later) = h.lan(&later);
    assert_eq!(
        verdict, XDP_REDIRECT,
        "the later fragment follows its first"
    );
    let uplink = uplink_of(&out_first);
    assert_eq!(uplink_of(&out_later), uplink, "both by one uplink");
    let nat_addr = [100, 64, uplink, 2];
    for f in [&out_first, &out_later] {
        assert_eq!(f[26..30], nat_addr, "source translated");
        assert_eq!(ip_checksum(&f[14..34]), 0, "IP header checksum");
    }
    let nat_port = [out_first[34], out_first[35]];
    assert!(
        udp_checksum_ok(&[&out_first, &out_later], nat_addr, SERVER),
        "the reassembled datagram's UDP checksum holds after translation"
    );

    // The reply, in fragments too.
    let reply = build(
        PacketBuilder::ethernet2([0x02, 0xbb, 0, 0, uplink, 1], [0x02, 0xaa, 0, 0, uplink, 2])
            .ipv4(SERVER, nat_addr, 64)
            .udp(53, u16::from_be_bytes(nat_port)),
        &payload,
    );
    let (first, later) = fragments(&reply, 1480);
    let (verdict, back_first) = h.run(program::WAN_INGRESS, &first);
    assert_eq!(verdict, XDP_REDIRECT);
    let (verdict, back_later) = h.run(program::WAN_INGRESS, &later);
    assert_eq!(verdict, XDP_REDIRECT, "the reply's later fragment follows");
    for f in [&back_first, &back_later] {
        assert_eq!(f[30..34], CLIENT, "destination translated back");
        assert_eq!(ip_checksum(&f[14..34]), 0, "IP header checksum");
    }
    assert_eq!(back_first[36..38], 8800u16.to_be_bytes(), "client port");
    assert!(udp_checksum_ok(&[&back_first, &back_later], SERVER, CLIENT));
}

/// `CLOCK_MONOTONIC_COARSE` now: the data plane's clock.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn a_later_fragment_follows_its_first_one_for_the_reassembly_time_and_not_after() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let request = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv4(CLIENT, SERVER, 64)
            .udp(8800, 53),
        &[0x5a_u8; 2000],
    );
    let (first, later) = fragments(&request, 1480);
    let before = coarse_now_ns();
    assert!(
        before > 2 * FRAGMENT_LIFETIME_NS,
        "the machine is up for {before} ns only: the clock cannot show a datagram as old as \
         this test needs"
    );
    assert_eq!(h.lan(&first).0, XDP_REDIRECT);
    let after = coarse_now_ns();
    let mut table = h.dp.fragments().expect("the fragment table");
    let entries: Vec<_> = table
        .iter()
        .collect::<Result<_, _>>()
        .expect("reading the fragment table");
    let [(datagram, remembered)] = entries[..] else {
        panic!("one datagram in flight, not {}", entries.len());
    };
    assert_eq!(remembered.src_port, 8800u16.to_be_bytes());
    assert!(
        (before..=after).contains(&remembered.seen_ns),
        "first fragment seen at {} ns, sent between {before} and {after}",
        remembered.seen_ns
    );

    // The datagram's first fragment went by a little under the
    // reassembly time ago: its later one follows it still.
    let aged = |by: u64| FragValue {
        seen_ns: coarse_now_ns().saturating_sub(by),
        ..remembered
    };
    let second = 1_000_000_000;
    table
        .insert(datagram, aged(FRAGMENT_LIFETIME_NS - second), 0)
        .expect("ageing the datagram");
    assert_eq!(h.lan(&later).0, XDP_REDIRECT, "within the reassembly time");

    // A little over it: the identification may be another datagram's by
    // now, and a later fragment is the kernel's.
    table
        .insert(datagram, aged(FRAGMENT_LIFETIME_NS + second), 0)
        .expect("ageing the datagram");
    let passed = h.reason(reason::PASS_FRAGMENT);
    assert_eq!(h.lan(&later).0, XDP_PASS, "past the reassembly time");
    assert_eq!(h.reason(reason::PASS_FRAGMENT), passed + 1);
}

/// The note a handed-over frame carries (two tags behind its MAC
/// addresses), and the frame without them.
fn hand_off_of(out: &[u8]) -> (Note, Vec<u8>) {
    let word = |i: usize| u16::from_be_bytes([out[i], out[i + 1]]);
    assert_eq!(word(12), note::TPID, "the outer tag");
    assert_eq!(word(16), note::TPID, "the inner tag");
    let note = note::read(word(14), word(18)).expect("a note");
    let frame = [&out[..12], &out[12 + note::LEN..]].concat();
    (note, frame)
}

#[test]
fn a_device_whose_qdisc_counts_gets_the_same_frame_handed_to_tc() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // Uplinks and LAN are all loopback (ifindex 1) here; lb shapes it.
    h.dp.set_egress(
        1,
        Some(Egress {
            path: egress::path::QDISC,
            shaper_major: egress::SHAPER_MAJOR,
            ifindex: 0,
        }),
    )
    .expect("egress");
    let frame = udp(7100, 64);
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_PASS, "handed to tc, not redirected");
    let (note, rewritten) = hand_off_of(&out);
    let uplink = uplink_of(&rewritten);
    assert_forwarded(
        &frame,
        &rewritten,
        &uplink_info(uplink, uplink_state::ACTIVE),
    );
    assert_eq!(
        note,
        Note {
            ifindex: 1,
            uplink: u32::from(uplink) - 1,
            leaf: egress::leaf(CLIENT),
        },
        "to the uplink's device, in the client's leaf of its uplink's class"
    );

    // A reply to a LAN port whose bridge (ifindex 7) holds the shaper is
    // handed over for the port (tc sends it on to the bridge), translated
    // as ever.
    let (nat_port, sent, _) = {
        // Outbound again by the XDP path, to find a flow on uplink 2.
        h.dp.set_egress(1, None).expect("egress");
        let found = out_via_uplink2(&mut h, |p| udp(p, 64));
        h.dp.set_egress(
            1,
            Some(Egress {
                path: egress::path::QDISC,
                shaper_major: egress::SHAPER_MAJOR,
                ifindex: 7,
            }),
        )
        .expect("egress");
        found
    };
    let client_port = u16::from_be_bytes([sent[34], sent[35]]);
    let reply = reply_to("udp", nat_port, 53);
    let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
    assert_eq!(verdict, XDP_PASS);
    let (note, rewritten) = hand_off_of(&back);
    assert_eq!(rewritten, inbound_model(&reply, client_port, false));
    assert_eq!(
        note,
        Note {
            ifindex: 1,
            uplink: 1,
            leaf: egress::leaf(CLIENT),
        }
    );

    // Back on the XDP path once the entry goes.
    h.dp.set_egress(1, None).expect("egress");
    assert_eq!(h.lan(&udp(7100, 64)).0, XDP_REDIRECT);
}

#[test]
fn a_frame_tagged_as_a_note_from_outside_is_dropped_and_counted() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // A frame with a note's outer tag, as a LAN host or the ISP could
    // forge it: were it passed, lb's tc program would send it on.
    let forged = |frame: &[u8]| {
        let n = Note {
            ifindex: 1,
            uplink: 0,
            leaf: 0,
        };
        let [outer, inner] = note::tags(&n).expect("fits");
        let tpid = note::TPID.to_be_bytes();
        let tags = [&tpid[..], &outer.to_be_bytes(), &tpid, &inner.to_be_bytes()].concat();
        [&frame[..12], &tags, &frame[12..]].concat()
    };
    let before = h.reason(reason::DROP_RESERVED_VLAN);
    assert_eq!(h.lan(&forged(&udp(7200, 64))).0, XDP_DROP);
    let reply = reply_to("udp", 20_000, 53);
    assert_eq!(h.run(program::WAN_INGRESS, &forged(&reply)).0, XDP_DROP);
    assert_eq!(h.reason(reason::DROP_RESERVED_VLAN) - before, 2);
    // A real tag (any other VID) is not one.
    let mut tagged = forged(&udp(7200, 64));
    tagged[14..16].copy_from_slice(&100u16.to_be_bytes());
    assert_ne!(h.lan(&tagged).0, XDP_DROP);
}

/// Run `f` on a thread of its own in a new, empty network namespace (with
/// its loopback up), which goes when the thread ends: test runs then see
/// that namespace's conntrack, and nothing touches the host's.
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends with `f`.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        run_here(&["ip", "link", "set", "lo", "up"]);
        f();
    })
    .join()
    .expect("the test thread panicked");
}

/// Run a command in the calling thread's namespaces; it must succeed.
/// Make the kernel track connections in this thread's namespace: a rule
/// that needs conntrack does.
fn track_connections_here() {
    run_here(&["nft", "add table ip t"]);
    run_here(&[
        "nft",
        "add chain ip t out { type filter hook output priority 0; ct state new counter; }",
    ]);
}

fn run_here(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (installed by `cargo xtask setup`)",
                args[0]
            )
        });
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_connection_conntrack_holds_is_left_to_the_kernel_and_remembered() {
    if !is_root() {
        return;
    }
    in_new_netns(|| {
        // One datagram over loopback is then a connection. Between two
        // addresses put on it: loopback's own 127/8 never comes from a LAN
        // and is the kernel's before any conntrack lookup.
        track_connections_here();
        let (server, client) = ([192, 0, 2, 1], [192, 0, 2, 2]);
        for addr in ["192.0.2.1/32", "192.0.2.2/32"] {
            run_here(&["ip", "addr", "add", addr, "dev", "lo"]);
        }
        let socket = std::net::UdpSocket::bind((Ipv4Addr::from(client), 40_000)).expect("bind");
        socket
            .send_to(b"in", (Ipv4Addr::from(server), 9000))
            .expect("send");

        let mut h = Harness::new([uplink_state::ACTIVE; 2]);
        // The server's answer, as it would reach lan_ingress: conntrack
        // holds it as the reply direction of the connection above.
        let reply = |src_port| {
            build(
                PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                    .ipv4(server, client, 64)
                    .udp(src_port, 40_000),
                b"out",
            )
        };
        let frame = reply(9000);
        for _ in 0..2 {
            let (verdict, out) = h.lan(&frame);
            assert_eq!(verdict, XDP_PASS, "a kernel connection's packet passes");
            assert_eq!(out, frame, "and is not touched");
        }
        assert_eq!(h.reason(reason::PASS_KERNEL_CONNECTION), 2);
        // Remembered in the flow table, so that later packets need no
        // lookup.
        let key = lb_common::maps::FlowKey {
            src_addr: server,
            dst_addr: client,
            src_port: 9000u16.to_be_bytes(),
            dst_port: 40_000u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let flow = h.flow_tables().get(&key).expect("read FLOWS");
        assert_eq!(flow.map(|f| f.uplink), Some(lb_common::KERNEL_OWNED));
        // Another port of the same hosts is no connection of the kernel's:
        // a new flow of the fast path.
        let (verdict, _) = h.lan(&reply(9001));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(h.reason(reason::PASS_KERNEL_CONNECTION), 2);
    });
}

#[test]
fn a_client_port_the_router_uses_to_the_same_server_is_not_kept() {
    if !is_root() {
        return;
    }
    in_new_netns(|| {
        // The router's own socket (a WireGuard or NTP one, on a fixed port)
        // talks from each uplink's address and port 5000 to the server's
        // port 53; conntrack holds those connections.
        track_connections_here();
        let server = Ipv4Addr::from(SERVER);
        run_here(&["ip", "addr", "add", &format!("{server}/32"), "dev", "lo"]);
        for n in 1..=2 {
            let own = Ipv4Addr::from(uplink_info(n, uplink_state::ACTIVE).addr);
            run_here(&["ip", "addr", "add", &format!("{own}/32"), "dev", "lo"]);
            let socket = std::net::UdpSocket::bind((own, 5000)).expect("bind");
            socket.send_to(b"own", (server, 53)).expect("send");
        }

        let mut h = Harness::new([uplink_state::ACTIVE; 2]);
        // A client from the same port to the same server: another port,
        // or the server's answers to the router would be the client's.
        let (verdict, out) = h.lan(&udp(5000, 64));
        assert_eq!(verdict, XDP_REDIRECT);
        let nat_port = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (NAT_PORTS.0..=NAT_PORTS.1).contains(&nat_port),
            "client port 5000 left as {nat_port}, over the router's own connection"
        );
        // A port the router does not use is kept.
        let (verdict, out) = h.lan(&udp(5001, 64));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), 5001);
    });
}

#[test]
fn a_syn_sent_again_moves_to_another_uplink_once() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    h.dp.set_resteer_syn(true).expect("resteer on");
    let syn = tcp(4321);
    let (verdict, out) = h.lan(&syn);
    assert_eq!(verdict, XDP_REDIRECT);
    let first = uplink_of(&out);
    // No answer came, and the client sends its SYN again: it moves.
    let (_, out) = h.lan(&syn);
    let second = uplink_of(&out);
    assert_ne!(second, first, "a SYN sent again moves to another uplink");
    // Still no answer (late, or lost): it stays where it went, and its
    // mapping there waits for the answer.
    for _ in 0..3 {
        let (_, out) = h.lan(&syn);
        assert_eq!(uplink_of(&out), second, "a SYN moves once, never back");
    }
}

/// A table that gives every bucket to `uplink` (or to none).
fn table_of(uplink: Option<u32>) -> Table {
    let mut weights = [0u32; MAX_UPLINKS as usize];
    if let Some(u) = uplink {
        weights[u as usize] = 1;
    }
    let mut t: Table = table::empty();
    table::rebalance(&mut t, &weights);
    t
}

/// Policy `index` sends new flows to `uplink` only (none: it takes none),
/// falling back as `fallback` says.
fn set_policy(h: &mut Harness, index: u32, uplink: Option<u32>, fallback: u32) {
    let t = table_of(uplink);
    let policy = lb_common::policy::Policy {
        takers: lb_daemon::dataplane::takers(&t),
        fallback,
        ..Default::default()
    };
    h.dp.set_policy(Family::V4, index, Some(&t), policy)
        .expect("policy");
}

/// The rules of [`the_rules_place_new_flows_by_first_match_ports_sets_dscp_and_fallback`],
/// with `server_net` the third rule's destination.
fn policy_config(server_net: &str) -> lb_daemon::config::Config {
    let text = format!(
        r#"
[[lan]]
interface = "lan0"
[[uplink]]
name = "a"
interface = "wan0"
[[uplink]]
name = "b"
interface = "wan1"
[[policy]]
name = "one"
uplinks = ["b"]
fallback = "drop"
[[policy]]
name = "two"
uplinks = ["a"]
fallback = "unreachable"
# DSCP EF goes to the kernel, whatever else it is.
[[rule]]
dscp = "EF"
policy = "kernel"
# UDP to 50-60: policy one.
[[rule]]
proto = "udp"
dst_port = "50-60"
policy = "one"
# TCP to the server's network: policy two.
[[rule]]
proto = "tcp"
dst = ["{server_net}", "203.0.113.0/24"]
policy = "two"
# Shadowed by the one before for TCP to the server's network.
[[rule]]
proto = "tcp"
policy = "one"
"#
    );
    lb_daemon::config::parse(&text, "lbd.toml").expect("a valid configuration")
}

/// lbd's compiler and converge write the rules (bit vectors, port
/// entries, the prefix trie) as the data plane reads them: first match,
/// port ranges, prefixes, DSCP to the kernel, fallbacks; a reload writes
/// a new generation, flips to it and removes the old one's prefixes.
#[test]
fn the_rules_place_new_flows_by_first_match_ports_sets_dscp_and_fallback() {
    use lb_common::policy::{fallback, DST_SIDE};
    use lb_daemon::reconcile::policies::Policies;
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // Policy 1: uplink 2 only, dropping when it cannot; policy 2: uplink
    // 1 only, answering "unreachable" when it cannot.
    set_policy(&mut h, 1, Some(1), fallback::DROP);
    set_policy(&mut h, 2, Some(0), fallback::UNREACHABLE);
    let mut policies = Policies::default();
    let first = h.dp.rule_generation();
    let written = policies
        .converge(&policy_config("198.51.100.0/24"), &mut h.dp)
        .expect("rules");
    assert_eq!(written, 2, "two destination prefixes");
    assert_ne!(h.dp.rule_generation(), first, "a new generation is live");
    let live = h.dp.rule_generation();
    let again = policies
        .converge(&policy_config("198.51.100.0/24"), &mut h.dp)
        .expect("rules");
    assert_eq!(again, 0, "the same rules again write nothing");
    assert_eq!(h.dp.rule_generation(), live, "and flip nothing");

    for port in 9600..9632u16 {
        assert_eq!(
            uplink_of(&h.lan(&udp(port, 64)).1),
            2,
            "UDP to 53: port {port}"
        );
        assert_eq!(
            uplink_of(&h.lan(&tcp(port)).1),
            1,
            "TCP to the set: port {port}"
        );
    }
    // DSCP: TOS 0xb8 is EF.
    let mut ef = udp(9700, 64);
    ef[15] = 0xb8;
    let ip_check = ip_checksum(&{
        let mut hdr = ef[14..34].to_vec();
        hdr[10] = 0;
        hdr[11] = 0;
        hdr
    });
    ef[24..26].copy_from_slice(&ip_check.to_be_bytes());
    let before = h.reason(reason::PASS_POLICY_KERNEL);
    assert_eq!(h.lan(&ef).0, XDP_PASS, "EF is the kernel's");
    assert_eq!(h.reason(reason::PASS_POLICY_KERNEL), before + 1);
    assert_eq!(h.lan(&ef).0, XDP_PASS, "and remembered as such");

    // Policy 1 loses its uplink: its new flows are dropped and counted,
    // pinned ones stay.
    set_policy(&mut h, 1, None, fallback::DROP);
    let before = h.reason(reason::DROP_POLICY);
    assert_eq!(h.lan(&udp(9800, 64)).0, XDP_DROP);
    assert_eq!(h.reason(reason::DROP_POLICY), before + 1);
    assert_eq!(
        uplink_of(&h.lan(&udp(9600, 64)).1),
        2,
        "a pinned flow stays"
    );
    assert_eq!(h.dp.policy_stats(1).expect("stats").dropped, 1);

    // Policy 2 loses its uplink: a new connection is told "host
    // unreachable" on the port it came from.
    set_policy(&mut h, 2, None, fallback::UNREACHABLE);
    let syn = tcp(9801);
    let (verdict, out) = h.lan(&syn);
    assert_eq!(verdict, XDP_REDIRECT, "back out of its port");
    let icmp = SlicedPacket::from_ethernet(&out).expect("an Ethernet frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = icmp.net else {
        panic!("not IPv4: {out:?}");
    };
    assert_eq!(ip.header().destination(), CLIENT);
    assert_eq!(
        ip.header().source(),
        SERVER,
        "no LAN address known: the server's"
    );
    assert_eq!(ip.header().protocol(), etherparse::IpNumber::ICMP);
    assert_eq!(ip_checksum(&out[14..34]), 0, "IPv4 checksum verifies");
    assert_eq!((out[34], out[35]), (3, 1), "destination unreachable, host");
    assert_eq!(&out[42..62], &syn[14..34], "the SYN's header is quoted");
    assert_eq!(&out[0..6], &CLIENT_MAC, "back to the client");
    assert_eq!(h.dp.policy_stats(2).expect("stats").unreachable, 1);

    // A reload moves the server's network out of rule 3: new TCP
    // connections to it fall to rule 4 (policy 1, uplink 2, live again).
    set_policy(&mut h, 1, Some(1), fallback::DROP);
    let old = h.dp.rule_generation();
    let server = Ipv4Addr::from(SERVER);
    assert!(h
        .dp
        .prefix_rules(old, DST_SIDE, server.into())
        .expect("lookup")
        .is_some());
    policies
        .converge(&policy_config("192.0.2.0/24"), &mut h.dp)
        .expect("rules again");
    assert_ne!(h.dp.rule_generation(), old, "flipped");
    assert_eq!(
        h.dp.prefix_rules(old, DST_SIDE, server.into())
            .expect("lookup"),
        None,
        "the old generation's prefixes are gone"
    );
    assert_eq!(uplink_of(&h.lan(&tcp(9900)).1), 2, "rule 4 now");
    assert_eq!(
        policies
            .converge(&policy_config("192.0.2.0/24"), &mut h.dp)
            .expect("unchanged"),
        0,
        "an unchanged reload writes nothing"
    );
}

/// A UDP datagram of `total` bytes of IPv4 (header included), with DF set
/// or not.
fn big_udp(src_port: u16, total: usize, df: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .udp(src_port, 4000);
    with_df(build(b, &vec![0x5a; total - 28]), df)
}

/// `frame` (IPv4, untagged) with DF as `df` says, whatever the builder
/// chose, and its header checksum made again.
fn with_df(mut frame: Vec<u8>, df: bool) -> Vec<u8> {
    frame[20] = if df { 0x40 } else { 0 };
    frame[24] = 0;
    frame[25] = 0;
    let check = ip_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
    frame
}

#[test]
fn a_df_packet_too_big_for_its_uplink_is_answered_fragmentation_needed() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    for n in 1..=2u8 {
        let info = UplinkInfo {
            mtu: 1420,
            ..uplink_info(n, uplink_state::ACTIVE)
        };
        h.dp.set_uplink(u32::from(n - 1), &info).expect("uplink");
    }
    // Fits: forwarded.
    assert_eq!(h.lan(&big_udp(7000, 1420, true)).0, XDP_REDIRECT);

    let big = big_udp(7001, 1500, true);
    let before = h.reason(reason::TOLD_TOO_BIG);
    let (verdict, out) = h.lan(&big);
    assert_eq!(verdict, XDP_REDIRECT, "answered at once, out of its port");
    assert_eq!(h.reason(reason::TOLD_TOO_BIG), before + 1);
    let icmp = SlicedPacket::from_ethernet(&out).expect("an Ethernet frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = icmp.net else {
        panic!("not IPv4: {out:?}");
    };
    assert_eq!(ip.header().destination(), CLIENT);
    assert_eq!(ip_checksum(&out[14..34]), 0, "IPv4 checksum verifies");
    assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
    assert_eq!(
        u16::from_be_bytes([out[40], out[41]]),
        1420,
        "the uplink's MTU"
    );
    assert_eq!(
        fold(ones_complement_sum(&out[34..], 0)),
        0xffff,
        "ICMP checksum verifies"
    );
    assert_eq!(
        &out[42..62],
        &big[14..34],
        "the datagram's header is quoted"
    );
    assert_eq!(&out[0..6], &CLIENT_MAC, "back to the client");
}

/// Without DF, XDP cannot fragment; the kernel does. A UDP datagram goes
/// to it untouched, its connection written into conntrack first as the
/// fast path translates its flow (its uplink's address, its NAT port),
/// marked with that uplink: the kernel's NAT then gives the fragments
/// the flow's source, and lbd's table routes them out of the flow's
/// uplink. A later big datagram finds the connection there.
#[test]
fn a_datagram_too_big_without_df_is_handed_over_with_its_translation() {
    use lb_daemon::observe::conntrack::{self, Tuple};
    if !is_root() {
        return;
    }
    in_new_netns(|| {
        track_connections_here();
        let mut h = Harness::new([uplink_state::ACTIVE; 2]);
        assert_eq!(
            h.dp.no_hand_over(),
            None,
            "this kernel cannot have a datagram handed over"
        );
        for n in 1..=2u8 {
            let info = UplinkInfo {
                mtu: 1420,
                ..uplink_info(n, uplink_state::ACTIVE)
            };
            h.dp.set_uplink(u32::from(n - 1), &info).expect("uplink");
        }
        let big = big_udp(7002, 1500, false);
        for sent in 1..=2 {
            let (verdict, out) = h.lan(&big);
            assert_eq!(verdict, XDP_PASS, "the kernel fragments it");
            assert_eq!(out, big, "untouched");
            assert_eq!(h.reason(reason::HANDED_TOO_BIG), sent);
        }
        assert_eq!(h.reason(reason::PASS_TOO_BIG), 0);
        let key = lb_common::maps::FlowKey {
            src_addr: CLIENT,
            dst_addr: SERVER,
            src_port: 7002u16.to_be_bytes(),
            dst_port: 4000u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        let tuple = Tuple {
            src: Ipv4Addr::from(CLIENT).into(),
            dst: Ipv4Addr::from(SERVER).into(),
            src_port: 7002,
            dst_port: 4000,
            proto: 17,
        };
        // Conntrack holds the connection as the flow table has the flow.
        let as_flow = |h: &Harness| {
            let flow = h
                .flow_tables()
                .get(&key)
                .expect("read FLOWS")
                .expect("the datagram made a flow");
            let conn = conntrack::lookup(&tuple)
                .expect("ask conntrack")
                .expect("conntrack has the handed-over connection");
            let uplink_addr = Ipv4Addr::new(100, 64, flow.uplink as u8 + 1, 2);
            assert_eq!(conn.original, tuple);
            assert_eq!(
                (conn.reply.dst, conn.reply.dst_port),
                (uplink_addr.into(), u16::from_be_bytes(flow.nat_port)),
                "translated as the flow is: {conn:?}"
            );
            assert_eq!(
                (conn.reply.src, conn.reply.src_port),
                (tuple.dst, tuple.dst_port),
                "its destination kept"
            );
            assert_eq!(conn.mark, lb_common::marks::handed(flow.uplink));
            flow.uplink
        };
        let first = as_flow(&h);

        // The flow's uplink goes down: the flow moves, and its next big
        // datagram finds the connection translated for the old uplink. It
        // is timed out and written anew, for the new one.
        h.dp.set_uplink_state(first, uplink_state::DOWN)
            .expect("uplink down");
        let (verdict, _) = h.lan(&big);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(h.reason(reason::HANDED_TOO_BIG), 3);
        let moved = as_flow(&h);
        assert_ne!(moved, first, "the flow moved");

        // TCP has no such hand-over (its connection's state is the
        // kernel's to follow): the kernel's slow path has it, as before.
        let tcp = {
            let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv4(CLIENT, SERVER, 64)
                .tcp(7003, 80, 1, 65_535)
                .syn();
            with_df(build(b, &vec![0x5a; 1500 - 40]), false)
        };
        assert_eq!(h.lan(&tcp).0, XDP_PASS);
        assert_eq!(h.reason(reason::PASS_TOO_BIG), 1);
        assert_eq!(h.reason(reason::HANDED_TOO_BIG), 3);
    });
}

#[test]
fn a_syn_leaving_by_a_narrower_uplink_has_its_mss_clamped() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    narrow_uplinks(&mut h, 1);
    let syn = |port: u16| {
        let ip = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC).ipv4(CLIENT, SERVER, 64);
        syn_with_mss(ip, port, 1460)
    };
    let mut seen = [false; 2];
    for port in 8000..8100u16 {
        let (verdict, out) = h.lan(&syn(port));
        assert_eq!(verdict, XDP_REDIRECT);
        let uplink = uplink_of(&out);
        let mss = mss_of(&out);
        let sliced = SlicedPacket::from_ethernet(&out).expect("a frame");
        let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not TCP");
        };
        let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("not IPv4");
        };
        let check = tcp
            .calc_checksum_ipv4(ip.header().source(), ip.header().destination())
            .expect("checksum");
        assert_eq!(check, tcp.checksum(), "the TCP checksum verifies");
        if uplink == 1 {
            assert_eq!(mss, Some(1380), "clamped to 1420 - 40 on uplink 1");
        } else {
            assert_eq!(mss, Some(1460), "uplink 2 does not clamp");
        }
        seen[usize::from(uplink - 1)] = true;
    }
    assert_eq!(seen, [true, true], "both uplinks took SYNs");
}

// ---------------------------------------------------------------------------
// IPv6: NPTv6 per flow. The LAN carries uplink 1's delegated /64; flows
// leaving by uplink 1 go untranslated, by uplink 2 with uplink 2's prefix.

const LAN6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const ISP2_6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0,
];
const SERVER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn gw6_mac(n: u8) -> [u8; 6] {
    [0x02, 0xcc, 0, 0, n, 1]
}

/// The harness, with IPv6 balanced 1:1 over both uplinks.
fn harness6() -> Harness {
    use lb_common::{maps::Uplink6, npt::Npt};
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let to = [LAN6, ISP2_6];
    for (i, prefix) in to.iter().enumerate() {
        let six = Uplink6 {
            state: uplink_state::ACTIVE,
            gw_mac: gw6_mac(i as u8 + 1),
            ipv6_mtu: 0,
            _pad: [0; 4],
            out: Npt::new(LAN6, *prefix, 64).expect("npt"),
            back: Npt::new(*prefix, LAN6, 64).expect("npt"),
        };
        h.dp.set_uplink6(i as u32, &six).expect("uplink6");
    }
    let mut t = table::empty();
    let mut w = [0u32; MAX_UPLINKS as usize];
    w[0] = 1;
    w[1] = 1;
    table::rebalance(&mut t, &w);
    h.dp.set_buckets6(&t).expect("buckets6");
    h.dp.set_ipv6(true).expect("ipv6 on");
    h
}

fn udp6(src: [u8; 16], src_port: u16, hop_limit: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv6(src, SERVER6, hop_limit)
        .udp(src_port, 53);
    build(b, b"query6")
}

/// RFC 6296 section 3.2 for a /64, written out on its own (not
/// lb_common::npt): the new prefix, and the first interface-identifier
/// word takes the difference of the two prefixes' ones'-complement sums.
fn npt_reference(addr: [u8; 16], from: [u8; 16], to: [u8; 16]) -> [u8; 16] {
    let sum = |a: &[u8]| fold(ones_complement_sum(a, 0));
    let (s_from, s_to) = (sum(&from[..8]), sum(&to[..8]));
    // from - to, in ones' complement: from + !to.
    let adjustment = fold(u32::from(s_from) + u32::from(!s_to));
    let word = u16::from_be_bytes([addr[8], addr[9]]);
    let mut new = fold(u32::from(word) + u32::from(adjustment));
    if new == 0xffff {
        new = 0;
    }
    let mut out = addr;
    out[..8].copy_from_slice(&to[..8]);
    out[8..10].copy_from_slice(&new.to_be_bytes());
    out
}

/// Whether the L4 checksum of an untagged IPv6 frame is valid.
fn l4_checksum_ok6(frame: &[u8]) -> bool {
    let (src, dst, nh) = (&frame[22..38], &frame[38..54], frame[20]);
    let l4 = &frame[54..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, nh]);
    fold(ones_complement_sum(l4, ones_complement_sum(&pseudo, 0))) == 0xffff
}

fn addr6(frame: &[u8], at: usize) -> [u8; 16] {
    frame[at..at + 16].try_into().expect("16 bytes")
}

/// Send frames made by `make` until one leaves by uplink `n`; the frame
/// and what left.
fn out6_via(h: &mut Harness, n: u8, make: impl Fn(u16) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    for port in 7000..7200u16 {
        let frame = make(port);
        let (verdict, out) = h.lan(&frame);
        assert_eq!(verdict, XDP_REDIRECT, "an IPv6 flow is forwarded");
        if out[0..6] == gw6_mac(n) {
            return (frame, out);
        }
    }
    panic!("no IPv6 flow landed on uplink {n}");
}

/// Both uplinks at MTU 1420, uplink `clamping` (1 or 2) clamping MSS.
fn narrow_uplinks(h: &mut Harness, clamping: u8) {
    use lb_common::maps::uplink_flags;
    for n in 1..=2u8 {
        let info = UplinkInfo {
            mtu: 1420,
            flags: if n == clamping {
                uplink_flags::CLAMP_MSS
            } else {
                0
            },
            ..uplink_info(n, uplink_state::ACTIVE)
        };
        h.dp.set_uplink(u32::from(n - 1), &info).expect("uplink");
    }
}

/// A SYN from port `port` to 443 over `ip`, announcing MSS `mss` first.
fn syn_with_mss(ip: etherparse::PacketBuilderStep<IpHeaders>, port: u16, mss: u16) -> Vec<u8> {
    let b = ip
        .tcp(port, 443, 1000, 65535)
        .syn()
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(mss),
            etherparse::TcpOptionElement::WindowScale(7),
        ])
        .expect("options");
    build(b, b"")
}

/// The MSS a TCP frame announces, if any.
fn mss_of(frame: &[u8]) -> Option<u16> {
    let sliced = SlicedPacket::from_ethernet(frame).expect("a frame");
    let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP");
    };
    tcp.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    })
}

/// An IPv6 SYN leaving by a narrower uplink that clamps has its MSS
/// lowered to that uplink's MTU less 60 bytes of headers, its TCP
/// checksum still valid after the prefix translation (uplink 2
/// translates); by an uplink that does not clamp, it leaves as it came.
#[test]
fn an_ipv6_syn_leaving_by_a_narrower_uplink_has_its_mss_clamped() {
    if !is_root() {
        return;
    }
    let mut h = harness6();
    narrow_uplinks(&mut h, 2);
    let syn = |port: u16| {
        let ip = PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC).ipv6(CLIENT6, SERVER6, 64);
        syn_with_mss(ip, port, 1440)
    };
    let mut seen = [false; 2];
    for port in 8000..8100u16 {
        let (verdict, out) = h.lan(&syn(port));
        assert_eq!(verdict, XDP_REDIRECT);
        let by = (1..=2u8)
            .find(|&n| out[0..6] == gw6_mac(n))
            .expect("forwarded by an uplink");
        assert!(l4_checksum_ok6(&out), "the TCP checksum verifies");
        let mss = mss_of(&out);
        if by == 2 {
            assert_eq!(mss, Some(1360), "clamped to 1420 - 60 on uplink 2");
            assert_eq!(
                addr6(&out, 22),
                npt_reference(CLIENT6, LAN6, ISP2_6),
                "and translated"
            );
        } else {
            assert_eq!(mss, Some(1440), "uplink 1 does not clamp");
        }
        seen[usize::from(by - 1)] = true;
    }
    assert_eq!(seen, [true, true], "both uplinks took SYNs");
}

/// An IPv6 packet too big for its flow's uplink is answered at once with
/// ICMPv6 "Packet Too Big" and that uplink's MTU, out of the port it came
/// in on (IPv6 routers never fragment): the kernel would route it by its
/// own rules, maybe out of the other uplink, and never tell the client.
#[test]
fn an_ipv6_packet_too_big_for_its_uplink_is_answered_packet_too_big() {
    if !is_root() {
        return;
    }
    const MTUS: [u16; 2] = [1400, 1450];
    let mut h = harness6();
    for n in 1..=2u8 {
        let info = UplinkInfo {
            mtu: MTUS[usize::from(n - 1)],
            ..uplink_info(n, uplink_state::ACTIVE)
        };
        h.dp.set_uplink(u32::from(n - 1), &info).expect("uplink");
    }
    let sized = |port: u16, len: usize| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv6(CLIENT6, SERVER6, 64)
                .udp(port, 443),
            &vec![0x5a; len - 48],
        )
    };
    // Fits (1400 bytes of IPv6): forwarded, by the uplink whose MTU the
    // answer must carry.
    let (verdict, out) = h.lan(&sized(7300, 1400));
    assert_eq!(verdict, XDP_REDIRECT);
    let by = (1..=2u8)
        .find(|&n| out[0..6] == gw6_mac(n))
        .expect("forwarded by an uplink");
    let mtu = u32::from(MTUS[usize::from(by - 1)]);

    let big = sized(7300, 1500);
    let (verdict, out) = h.lan(&big);
    assert_eq!(verdict, XDP_REDIRECT, "answered at once, out of its port");
    assert_eq!(h.reason(reason::TOLD_TOO_BIG), 1);
    assert_eq!(h.reason(reason::PASS_TOO_BIG), 0);
    assert_eq!(out[0..6], CLIENT_MAC, "back to the client");
    assert_eq!(out[6..12], ROUTER_LAN_MAC);
    assert_eq!(out[12..14], [0x86, 0xdd]);
    assert_eq!(out[20], 58, "ICMPv6");
    assert_eq!(addr6(&out, 38), CLIENT6, "to the client");
    assert_eq!(addr6(&out, 22), SERVER6, "from where it was going");
    assert_eq!((out[54], out[55]), (2, 0), "Packet Too Big");
    assert_eq!(
        u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
        mtu,
        "the MTU of the flow's own uplink"
    );
    assert_eq!(&out[62..110], &big[14..62], "the packet's start, quoted");
    assert_eq!(out.len(), 110, "headers and a 48-byte quote");
    assert!(l4_checksum_ok6(&out), "ICMPv6 checksum valid");

    // A tagged frame cannot be answered here: the kernel's, untouched.
    let mut tagged = big.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let (verdict, out) = h.lan(&tagged);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, tagged);
    assert_eq!(h.reason(reason::PASS_TOO_BIG), 1);
    assert_eq!(h.reason(reason::TOLD_TOO_BIG), 1);

    // The uplink's IPv6 MTU below its link's (a router advertisement's MTU
    // option): a packet that fits the link but not it is answered with it.
    let prefix = [LAN6, ISP2_6][usize::from(by - 1)];
    let six = lb_common::maps::Uplink6 {
        state: uplink_state::ACTIVE,
        gw_mac: gw6_mac(by),
        ipv6_mtu: 1300,
        _pad: [0; 4],
        out: lb_common::npt::Npt::new(LAN6, prefix, 64).expect("npt"),
        back: lb_common::npt::Npt::new(prefix, LAN6, 64).expect("npt"),
    };
    h.dp.set_uplink6(u32::from(by - 1), &six).expect("uplink6");
    let (verdict, out) = h.lan(&sized(7300, 1350));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out[0..6], CLIENT_MAC, "answered, not forwarded");
    assert_eq!(
        u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
        1300,
        "the uplink's IPv6 MTU"
    );
    assert_eq!(h.reason(reason::TOLD_TOO_BIG), 2);
}

#[test]
fn ipv6_flows_spread_and_leave_translated_by_the_other_uplink() {
    if !is_root() {
        return;
    }
    let mut h = harness6();
    let mut by = [0u32; 2];
    for port in 7000..7400u16 {
        let frame = udp6(CLIENT6, port, 64);
        let (verdict, out) = h.lan(&frame);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out[12..14], [0x86, 0xdd], "still IPv6");
        assert_eq!(out[21], 63, "hop limit decremented");
        assert!(l4_checksum_ok6(&out), "UDP checksum valid as it leaves");
        let src = addr6(&out, 22);
        if out[0..6] == gw6_mac(1) {
            by[0] += 1;
            assert_eq!(src, CLIENT6, "the LAN's own uplink: untranslated");
            assert_eq!(out[6..12], uplink_info(1, 0).src_mac);
        } else {
            assert_eq!(out[0..6], gw6_mac(2), "to uplink 2's IPv6 next hop");
            by[1] += 1;
            assert_eq!(src, npt_reference(CLIENT6, LAN6, ISP2_6), "RFC 6296");
            assert_eq!(
                fold(ones_complement_sum(&src, 0)),
                fold(ones_complement_sum(&CLIENT6, 0)),
                "checksum-neutral"
            );
        }
        // The same flow again: the same way out.
        let (_, again) = h.lan(&frame);
        assert_eq!(again, out, "a flow keeps its uplink");
    }
    assert!(
        by[0] > 120 && by[1] > 120,
        "400 flows spread over two uplinks 1:1: {by:?}"
    );
}

#[test]
fn ipv6_replies_echo_and_packet_too_big_come_back_to_the_client() {
    if !is_root() {
        return;
    }
    let mut h = harness6();
    // wan_ingress test runs arrive on loopback, uplink 2's device.
    let up = uplink_info(2, uplink_state::ACTIVE);
    let public = npt_reference(CLIENT6, LAN6, ISP2_6);

    // TCP: out, the SYN-ACK back.
    let tcp6 = |port: u16| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv6(CLIENT6, SERVER6, 64)
                .tcp(port, 443, 1000, 65535)
                .syn(),
            b"",
        )
    };
    let (frame, _) = out6_via(&mut h, 2, tcp6);
    let port = u16::from_be_bytes([frame[54], frame[55]]);
    let reply = build(
        PacketBuilder::ethernet2(gw6_mac(2), up.src_mac)
            .ipv6(SERVER6, public, 60)
            .tcp(443, port, 5000, 65535)
            .syn()
            .ack(1001),
        b"",
    );
    let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
    assert_eq!(verdict, XDP_REDIRECT, "the SYN-ACK goes to the LAN");
    assert_eq!(back[0..6], CLIENT_MAC);
    assert_eq!(back[6..12], ROUTER_LAN_MAC);
    assert_eq!(addr6(&back, 38), CLIENT6, "back to the LAN's prefix");
    assert_eq!(back[21], 59, "hop limit decremented");
    assert!(l4_checksum_ok6(&back), "TCP checksum valid as it arrives");

    // Packet Too Big from a router on the way, quoting the packet as it
    // left: outer destination and quoted source become the client's.
    let mut quoted = frame[14..].to_vec();
    quoted[8..24].copy_from_slice(&public);
    quoted[7] = 63;
    let router: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
    let ptb = build(
        PacketBuilder::ethernet2(gw6_mac(2), up.src_mac)
            .ipv6(router, public, 60)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 }),
        &quoted,
    );
    assert!(l4_checksum_ok6(&ptb), "the test's own error is valid");
    let (verdict, back) = h.run(program::WAN_INGRESS, &ptb);
    assert_eq!(verdict, XDP_REDIRECT, "Packet Too Big reaches the client");
    assert_eq!(addr6(&back, 38), CLIENT6, "outer destination");
    assert_eq!(addr6(&back, 54 + 8 + 8), CLIENT6, "quoted source");
    assert_eq!(back[54], 2, "still Packet Too Big");
    assert_eq!(back[58..62], 1280u32.to_be_bytes(), "its MTU kept");
    assert!(l4_checksum_ok6(&back), "ICMPv6 checksum still valid");

    // Echo: the identifier is the flow's port.
    let echo = |id: u16| {
        build(
            PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
                .ipv6(CLIENT6, SERVER6, 64)
                .icmpv6_echo_request(id, 1),
            b"ping6",
        )
    };
    let (frame, out) = out6_via(&mut h, 2, echo);
    assert!(l4_checksum_ok6(&out), "echo request valid as it leaves");
    let id = u16::from_be_bytes([frame[58], frame[59]]);
    let reply = build(
        PacketBuilder::ethernet2(gw6_mac(2), up.src_mac)
            .ipv6(SERVER6, public, 60)
            .icmpv6_echo_reply(id, 1),
        b"ping6",
    );
    let (verdict, back) = h.run(program::WAN_INGRESS, &reply);
    assert_eq!(verdict, XDP_REDIRECT, "the echo reply goes to the LAN");
    assert_eq!(addr6(&back, 38), CLIENT6);
    assert!(l4_checksum_ok6(&back));

    // Nothing of this flow: the router's own, the kernel's.
    let stranger = build(
        PacketBuilder::ethernet2(gw6_mac(2), up.src_mac)
            .ipv6(SERVER6, public, 60)
            .udp(53, 40_000),
        b"?",
    );
    let before = h.reason(reason::PASS_NO_MAPPING);
    assert_eq!(h.run(program::WAN_INGRESS, &stranger).0, XDP_PASS);
    assert_eq!(h.reason(reason::PASS_NO_MAPPING), before + 1);
}

#[test]
fn ipv6_the_fast_path_does_not_take_passes_and_foreign_sources_drop() {
    if !is_root() {
        return;
    }
    let mut h = harness6();
    let link_local: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let ula: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let cases: [(&str, Vec<u8>, u32, u32); 3] = [
        (
            "link-local source",
            udp6(link_local, 7000, 64),
            XDP_PASS,
            reason::PASS_LOCAL,
        ),
        (
            "hop limit 1",
            udp6(CLIENT6, 7000, 1),
            XDP_PASS,
            reason::PASS_TTL,
        ),
        (
            "a ULA source",
            udp6(ula, 7000, 64),
            XDP_DROP,
            reason::DROP_FOREIGN_SOURCE,
        ),
    ];
    for (what, frame, verdict, why) in cases {
        let before = h.reason(why);
        let (got, out) = h.lan(&frame);
        assert_eq!(got, verdict, "{what}");
        assert_eq!(h.reason(why), before + 1, "{what}: counted");
        if verdict == XDP_PASS {
            assert_eq!(out, frame, "{what}: untouched");
        }
    }
    // IPv6 not balanced (lbd knows no LAN prefix): the kernel's, as
    // without lb.
    h.dp.set_ipv6(false).expect("ipv6 off");
    let frame = udp6(CLIENT6, 7001, 64);
    let before = h.reason(reason::PASS_NOT_IPV4);
    assert_eq!(h.lan(&frame), (XDP_PASS, frame));
    assert_eq!(h.reason(reason::PASS_NOT_IPV4), before + 1);
}

#[test]
fn ipv6_flows_move_off_an_uplink_whose_ipv6_died_and_ipv4_stays() {
    if !is_root() {
        return;
    }
    use lb_common::{maps::Uplink6, npt::Npt};
    let mut h = harness6();
    let (frame, _) = out6_via(&mut h, 2, |p| udp6(CLIENT6, p, 64));
    // Uplink 2's IPv6 goes down (its IPv4 does not): one state write.
    let down = Uplink6 {
        state: uplink_state::DOWN,
        gw_mac: gw6_mac(2),
        ipv6_mtu: 0,
        _pad: [0; 4],
        out: Npt::new(LAN6, ISP2_6, 64).expect("npt"),
        back: Npt::new(ISP2_6, LAN6, 64).expect("npt"),
    };
    h.dp.set_uplink6(1, &down).expect("uplink6");
    let (verdict, out) = h.lan(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out[0..6], gw6_mac(1), "the flow moved to uplink 1");
    assert_eq!(addr6(&out, 22), CLIENT6, "untranslated there");
    // New IPv6 flows all go to uplink 1; IPv4 still spreads.
    let mut v4 = [0u32; 2];
    for port in 7300..7400u16 {
        assert_eq!(h.lan(&udp6(CLIENT6, port, 64)).1[0..6], gw6_mac(1));
        v4[uplink_of(&h.lan(&udp(port, 64)).1) as usize - 1] += 1;
    }
    assert!(v4[0] > 0 && v4[1] > 0, "IPv4 keeps both uplinks: {v4:?}");
    assert_eq!(h.dp.uplink_stats(1).expect("stats").moved_away, 1);
}

/// A UDP datagram from the client to `dst`, port `dst_port`.
fn udp6_to(dst: [u8; 16], src_port: u16, dst_port: u16) -> Vec<u8> {
    build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv6(CLIENT6, dst, 64)
            .udp(src_port, dst_port),
        b"rule6",
    )
}

/// IPv6 flows are placed by the same rules as IPv4 ones, on each
/// policy's IPv6 side: a rule naming an IPv6 prefix matches IPv6 flows
/// in it, a rule naming IPv4 prefixes only never matches one, "icmp"
/// matches ICMPv6, and a policy whose IPv6 side takes nothing falls back
/// for IPv6 while its IPv4 side still takes flows.
#[test]
fn ipv6_flows_follow_the_rules_on_each_policys_ipv6_side() {
    use lb_common::policy::fallback;
    use lb_daemon::reconcile::policies::Policies;
    if !is_root() {
        return;
    }
    let mut h = harness6();
    let set6 = |h: &mut Harness, uplink: Option<u32>, fallback: u32| {
        let t = table_of(uplink);
        let policy = lb_common::policy::Policy {
            takers: lb_daemon::dataplane::takers(&t),
            fallback,
            ..Default::default()
        };
        h.dp.set_policy(Family::V6, 1, Some(&t), policy)
            .expect("IPv6 policy");
    };
    // Policy 1 takes IPv4 by uplink 1 and IPv6 by uplink 2: which side a
    // flow used shows in where it leaves.
    set_policy(&mut h, 1, Some(0), fallback::DROP);
    set6(&mut h, Some(1), fallback::DROP);
    let mut net = SERVER6;
    net[8..].fill(0);
    let server_net = std::net::Ipv6Addr::from(net);
    let text = |fallback: &str| {
        format!(
            r#"
[[lan]]
interface = "lan0"
[[uplink]]
name = "a"
interface = "wan0"
[[uplink]]
name = "b"
interface = "wan1"
[[policy]]
name = "one"
uplinks = ["b"]
fallback = "{fallback}"
# IPv4 only: never an IPv6 flow's.
[[rule]]
dst = "10.99.0.0/16"
policy = "kernel"
# ICMP, of either family: the kernel's.
[[rule]]
proto = "icmp"
policy = "kernel"
# UDP to the server's /64 and one IPv4 network: policy one.
[[rule]]
proto = "udp"
dst = ["{server_net}/64", "203.0.113.0/24"]
policy = "one"
"#
        )
    };
    let config = |fallback: &str| {
        lb_daemon::config::parse(&text(fallback), "lbd.toml").expect("a valid configuration")
    };
    let mut policies = Policies::default();
    let written = policies
        .converge(&config("drop"), &mut h.dp)
        .expect("rules");
    assert_eq!(written, 3, "two IPv4 prefixes and one IPv6");

    // UDP to the server's /64: policy one's IPv6 side, uplink 2 alone.
    for port in 8000..8040u16 {
        let (verdict, out) = h.lan(&udp6_to(SERVER6, port, 53));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out[0..6], gw6_mac(2), "policy one's IPv6 side: port {port}");
        assert_eq!(addr6(&out, 22), npt_reference(CLIENT6, LAN6, ISP2_6));
    }
    assert_eq!(h.dp.policy_stats(1).expect("stats").new_flows, 40);
    // Elsewhere: the default policy, both uplinks.
    let mut other = SERVER6;
    other[5] = 0xee;
    let mut by = [0u32; 2];
    for port in 8100..8200u16 {
        let (verdict, out) = h.lan(&udp6_to(other, port, 53));
        assert_eq!(verdict, XDP_REDIRECT);
        by[usize::from(out[0..6] == gw6_mac(2))] += 1;
    }
    assert!(
        by[0] > 20 && by[1] > 20,
        "the default policy spreads: {by:?}"
    );
    // ICMPv6 echo: "icmp" is the kernel's, counted and remembered.
    let echo = build(
        PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
            .ipv6(CLIENT6, SERVER6, 64)
            .icmpv6_echo_request(77, 1),
        b"ping6",
    );
    let before = h.reason(reason::PASS_POLICY_KERNEL);
    assert_eq!(h.lan(&echo).0, XDP_PASS, "ICMPv6 echo to the kernel");
    assert_eq!(h.reason(reason::PASS_POLICY_KERNEL), before + 1);
    assert_eq!(h.lan(&echo).0, XDP_PASS, "and remembered");
    assert_eq!(h.reason(reason::PASS_POLICY_KERNEL), before + 1);

    // Policy one's IPv6 side loses its uplink: new IPv6 flows of it are
    // dropped and counted (its fallback), pinned ones stay; its IPv4
    // side is untouched.
    set6(&mut h, None, fallback::DROP);
    assert_eq!(
        h.dp.live_policies(Family::V6) & 2,
        0,
        "no longer live for IPv6"
    );
    assert_ne!(h.dp.live_policies(Family::V4) & 2, 0, "still live for IPv4");
    let before = h.reason(reason::DROP_POLICY);
    assert_eq!(h.lan(&udp6_to(SERVER6, 8300, 53)).0, XDP_DROP);
    assert_eq!(h.reason(reason::DROP_POLICY), before + 1);
    let (verdict, out) = h.lan(&udp6_to(SERVER6, 8000, 53));
    assert_eq!(verdict, XDP_REDIRECT, "a pinned flow stays");
    assert_eq!(out[0..6], gw6_mac(2));

    // With `fallback = unreachable` the client is told: ICMPv6 address
    // unreachable, from where it was going, back out of its port.
    set6(&mut h, None, fallback::UNREACHABLE);
    policies
        .converge(&config("unreachable"), &mut h.dp)
        .expect("rules");
    let refused = udp6_to(SERVER6, 8400, 53);
    let before = h.reason(reason::DROP_POLICY_UNREACHABLE);
    let (verdict, out) = h.lan(&refused);
    assert_eq!(verdict, XDP_REDIRECT, "the error goes back out of the port");
    assert_eq!(h.reason(reason::DROP_POLICY_UNREACHABLE), before + 1);
    assert_eq!(out[0..6], CLIENT_MAC, "to the client");
    assert_eq!(out[12..14], [0x86, 0xdd]);
    assert_eq!(out[20], 58, "ICMPv6");
    assert_eq!(addr6(&out, 22), SERVER6);
    assert_eq!(addr6(&out, 38), CLIENT6);
    assert_eq!(
        (out[54], out[55]),
        (1, 3),
        "destination unreachable, address"
    );
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "header and 8 bytes quoted");
    assert_eq!(
        &out[62..110],
        &refused[14..62],
        "the datagram's start is quoted"
    );
    assert!(l4_checksum_ok6(&out), "ICMPv6 checksum verifies");
}

/// An uplink whose interface index is past the array's slots
/// (`lb_common::IFINDEX_SLOTS`) is found in the hash map instead: its
/// replies are translated back all the same, and once its index is
/// forgotten they are the kernel's.
#[test]
fn an_uplink_with_a_large_interface_index_has_its_replies_translated() {
    if !is_root() {
        return;
    }
    in_new_netns(|| {
        let big = lb_common::IFINDEX_SLOTS + 904;
        run_here(&[
            "ip",
            "link",
            "add",
            "big0",
            "index",
            &big.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "big1",
        ]);
        run_here(&["ip", "link", "set", "big0", "up"]);
        let mut h = Harness::new([uplink_state::ACTIVE; 2]);
        h.dp.set_uplink(
            1,
            &UplinkInfo {
                ifindex: big,
                ..uplink_info(2, uplink_state::ACTIVE)
            },
        )
        .expect("uplink 2 on big0");
        let (nat_port, frame, _) = out_via_uplink2(&mut h, |p| udp(p, 64));
        let client_port = u16::from_be_bytes([frame[34], frame[35]]);
        // The xdp_md the run starts from: data, data_end, data_meta,
        // ingress_ifindex, rx_queue_index, egress_ifindex.
        let reply = reply_to("udp", nat_port, 53);
        let on_big = |h: &mut Harness| {
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(reply.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&big.to_ne_bytes());
            let mut out = vec![0u8; reply.len() + 256];
            let xdp = h.dp.xdp(program::WAN_INGRESS).expect("program");
            let result = xdp
                .test_run(TestRunOptions {
                    data_in: Some(&reply),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })
                .expect("BPF_PROG_TEST_RUN on big0");
            out.truncate(result.data_size_out as usize);
            (result.return_value, out)
        };
        let (verdict, back) = on_big(&mut h);
        assert_eq!(verdict, XDP_REDIRECT, "the reply on big0 goes to the LAN");
        assert_eq!(back, inbound_model(&reply, client_port, false));
        h.dp.forget_uplink_ifindex(big).expect("forget big0");
        let before = h.reason(reason::PASS_UNKNOWN_UPLINK);
        assert_eq!(on_big(&mut h).0, XDP_PASS, "no uplink on big0 any more");
        assert_eq!(h.reason(reason::PASS_UNKNOWN_UPLINK), before + 1);
    });
}

#[test]
fn an_adopted_bypass_trie_converges_from_what_it_holds_and_a_full_one_blocks_no_other_prefix() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    // The earlier lbd's: the LAN, the router's address there, and an
    // uplink address of an old lease, which the new lbd no longer wants.
    let old_lease = (Ipv4Addr::new(100, 64, 1, 3), 32);
    h.dp.add_bypass(old_lease.0, old_lease.1).expect("bypass");
    let held: BTreeSet<(Ipv4Addr, u8)> =
        h.dp.bypass_prefixes()
            .expect("read BYPASS")
            .into_iter()
            .collect();
    assert!(held.contains(&old_lease) && held.contains(&(ROUTER_LAN, 32)));
    let mut bypass = Bypass::adopted(held);
    let lan = (Ipv4Addr::new(10, 10, 0, 0), 24);
    let wanted: BTreeSet<_> = [lan, (ROUTER_LAN, 32), (Ipv4Addr::new(100, 64, 1, 2), 32)].into();
    let (added, done) = bypass.converge(wanted.clone(), &mut h.dp);
    done.expect("converge");
    assert_eq!(
        added,
        [(Ipv4Addr::new(100, 64, 1, 2), 32)],
        "only the new one is added"
    );
    let now: BTreeSet<_> =
        h.dp.bypass_prefixes()
            .expect("read BYPASS")
            .into_iter()
            .collect();
    assert_eq!(
        now, wanted,
        "the old lease's address went, the new one came"
    );

    // More than the trie holds: what fits is written, the rest is said,
    // and every prefix that fits is there.
    let room = lb_common::BYPASS_ENTRIES;
    let many: BTreeSet<_> = (0..room + 44)
        .map(|i| (Ipv4Addr::from(0x0a40_0000 + (i << 8)), 24))
        .chain(wanted)
        .collect();
    let (added, said) = bypass.converge(many.clone(), &mut h.dp);
    let now: BTreeSet<_> =
        h.dp.bypass_prefixes()
            .expect("read BYPASS")
            .into_iter()
            .collect();
    assert!(said.is_err(), "a full trie is said");
    assert!(
        !added.is_empty(),
        "what fitted is said as added, beside the error"
    );
    assert!(
        now.len() >= room as usize - 8 && now.is_subset(&many),
        "{} prefixes written",
        now.len()
    );
    assert_eq!(
        bypass.prefixes(),
        &now,
        "lbd's books say what the trie holds"
    );
}

/// The client's "port unreachable" to `to`, quoting `reply` (a frame as
/// the client got it) whole.
fn client_port_unreachable(to: [u8; 4], reply: &[u8]) -> Vec<u8> {
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&reply[14..]);
    let c = lb_common::csum::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut err = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, ROUTER_LAN_MAC)
        .ipv4(CLIENT, to, 64)
        .write(&mut err, etherparse::IpNumber::ICMP, &icmp)
        .expect("build");
    err
}

#[test]
fn a_clients_icmp_error_about_a_reply_leaves_by_its_flows_uplink_translated() {
    if !is_root() {
        return;
    }
    let mut h = Harness::new([uplink_state::ACTIVE; 2]);
    let up = uplink_info(2, uplink_state::ACTIVE);
    type Make = Box<dyn Fn(u16) -> Vec<u8>>;
    let flows: [(&str, Make, u16); 2] = [
        ("UDP", Box::new(|p| udp(p, 64)), 53),
        ("TCP", Box::new(tcp), 443),
    ];
    for (what, make, server_port) in flows {
        let (nat_port, frame, _) = out_via_uplink2_from(&mut h, LOCAL_PORTS.0 + 2000, make);
        let client_port = u16::from_be_bytes([frame[34], frame[35]]);
        // The remote end's answer as it reached the client, quoted whole
        // by the client's "port unreachable" (its socket has gone).
        let reply = if what == "UDP" {
            build(
                PacketBuilder::ethernet2(ROUTER_LAN_MAC, CLIENT_MAC)
                    .ipv4(SERVER, CLIENT, 63)
                    .udp(server_port, client_port),
                b"a late answer",
            )
        } else {
            build(
                PacketBuilder::ethernet2(ROUTER_LAN_MAC, CLIENT_MAC)
                    .ipv4(SERVER, CLIENT, 63)
                    .tcp(server_port, client_port, 7, 65535)
                    .syn()
                    .ack(1001),
                b"",
            )
        };
        let err = client_port_unreachable(SERVER, &reply);

        let (verdict, sent) = h.lan(&err);
        let this = format!("the client's ICMP error about a {what} reply");
        assert_eq!(verdict, XDP_REDIRECT, "{this} leaves by an uplink");
        assert_eq!(&sent[0..6], &up.gw_mac, "{this}: to uplink 2's gateway");
        assert_eq!(&sent[6..12], &up.src_mac, "{this}: from uplink 2's MAC");
        assert_eq!(&sent[26..30], &up.addr, "{this}: from uplink 2's address");
        assert_eq!(&sent[30..34], &SERVER, "{this}: to the remote end");
        assert_eq!(sent[22], 63, "{this}: one hop older");
        assert_eq!(
            &sent[34 + 8 + 16..34 + 8 + 20],
            &up.addr,
            "{this}: the quote's destination is the flow's mapping"
        );
        assert_eq!(
            u16::from_be_bytes([sent[64], sent[65]]),
            nat_port,
            "{this}: the quoted destination port is the NAT port"
        );
        assert!(
            lb_common::csum::verifies(&sent[14..34], 0),
            "{this}: IP checksum"
        );
        assert!(
            lb_common::csum::verifies(&sent[34..], 0),
            "{this}: ICMP checksum"
        );
        assert!(
            lb_common::csum::verifies(&sent[42..62], 0),
            "{this}: quoted IP checksum"
        );
        // The quoted segment's own checksum, against its new pseudo-header:
        // the remote end recognises what it sent.
        let quoted_l4 = &sent[62..];
        let proto = if what == "UDP" { 17u8 } else { 6 };
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&SERVER);
        pseudo.extend_from_slice(&up.addr);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(quoted_l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(quoted_l4);
        assert!(
            lb_common::csum::verifies(&pseudo, 0),
            "{this}: quoted {what} checksum"
        );
    }
    // An error about a flow of lb's, but to another address than its
    // remote end: the kernel's (which relates it to nothing).
    {
        let (_, frame, _) = out_via_uplink2_from(&mut h, LOCAL_PORTS.0 + 3000, |p| udp(p, 64));
        let client_port = u16::from_be_bytes([frame[34], frame[35]]);
        let reply = build(
            PacketBuilder::ethernet2(ROUTER_LAN_MAC, CLIENT_MAC)
                .ipv4(SERVER, CLIENT, 63)
                .udp(53, client_port),
            b"!",
        );
        let elsewhere = client_port_unreachable([203, 0, 113, 9], &reply);
        let (verdict, out) = h.lan(&elsewhere);
        assert_eq!(
            (verdict, out),
            (XDP_PASS, elsewhere),
            "an error sent elsewhere than its flow's remote end: the kernel's, untouched"
        );
    }
    // An error about nothing lb carries is the kernel's.
    let reply = build(
        PacketBuilder::ethernet2(ROUTER_LAN_MAC, CLIENT_MAC)
            .ipv4(SERVER, CLIENT, 63)
            .udp(9999, 4242),
        b"?",
    );
    let err = client_port_unreachable(SERVER, &reply);
    let before = h.reason(reason::PASS_NO_MAPPING);
    let (verdict, out) = h.lan(&err);
    assert_eq!(
        (verdict, out),
        (XDP_PASS, err),
        "no flow: the kernel's, untouched"
    );
    assert_eq!(h.reason(reason::PASS_NO_MAPPING), before + 1);
}
