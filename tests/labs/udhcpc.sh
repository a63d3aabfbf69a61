#!/bin/sh
# The lab router's DHCP client hook. busybox's udhcpc runs it with an event
# ($1) and the lease in its environment; it does with a lease what OpenWrt's
# netifd does: the address on the interface, and a default route through
# the lease's router in table ${LB_DHCP_TABLE:-main}. Nothing else: no DNS,
# no other routes.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ;;
    bound | renew)
        want="$ip/$mask"
        have=$(ip -4 -o addr show dev "$interface" | awk '{ print $4 }')
        if [ "$have" != "$want" ]; then
            ip -4 addr flush dev "$interface"
            ip addr add "$want" dev "$interface"
        fi
        for gateway in ${router:-}; do
            ip route replace default via "$gateway" dev "$interface" table "${LB_DHCP_TABLE:-main}"
            break
        done
        ;;
esac
exit 0
