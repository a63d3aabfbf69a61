#!/usr/bin/env bash
# Failover the way routers without lb commonly do it, as MikroTik's Netwatch
# with up/down scripts does: the kernel forwards (nftables PCC marks
# connections, `ip rule fwmark N table N`, masquerade per uplink), and this
# script probes once a second and rewrites routes when a probe result
# changes. The benchmark runs it in the lab's router to time its failover
# beside lb's.
#
#   netwatch.sh TARGET DEV:GATEWAY...
#
# Uplink N (the Nth DEV:GATEWAY) owns routing table N and conntrack mark N.
# Once a second, in parallel, one ICMP echo to TARGET leaves through each
# uplink (`ping -I DEV`, 1 s timeout). A probe that fails marks its uplink
# down, one that succeeds marks it up: no thresholds, no counts, so it
# reacts to the first round that sees a change. On a change, each uplink's
# table routes through itself if it is up, else through the first uplink
# that is; and the conntrack entries of the changed uplink's mark are
# deleted, since masquerade keeps a connection's address for its lifetime
# and the connection would otherwise keep its old uplink's address.
set -u

if (($# < 2)); then
    echo "usage: $0 TARGET DEV:GATEWAY..." >&2
    exit 2
fi
target=$1
shift
devs=() gateways=() up=()
for uplink in "$@"; do
    devs+=("${uplink%%:*}")
    gateways+=("${uplink#*:}")
    up+=(1)
done

route_tables() {
    local i j via
    for i in "${!devs[@]}"; do
        via=$i
        if ((!up[i])); then
            for j in "${!devs[@]}"; do
                if ((up[j])); then
                    via=$j
                    break
                fi
            done
        fi
        ip route replace default via "${gateways[via]}" dev "${devs[via]}" table $((i + 1))
    done
}

route_tables
while :; do
    probes=()
    for i in "${!devs[@]}"; do
        ping -n -q -c 1 -W 1 -I "${devs[i]}" "$target" >/dev/null 2>&1 &
        probes+=($!)
    done
    # The next round starts a second after this one, however the probes went.
    sleep 1
    changed=()
    for i in "${!devs[@]}"; do
        if wait "${probes[i]}"; then now=1; else now=0; fi
        if ((now != up[i])); then
            up[i]=$now
            changed+=("$i")
        fi
    done
    if ((${#changed[@]})); then
        route_tables
        for i in "${changed[@]}"; do
            conntrack -D --mark $((i + 1)) >/dev/null 2>&1
        done
    fi
done
