#!/bin/sh
# The lab router's dhcpcd hook (its `script`). dhcpcd configures addresses
# and routes itself; this only writes down, per uplink, the prefixes
# delegated to it, because the kernel does not say: dhcpcd's reject route
# for a delegation is `unreachable PREFIX dev lo`, whichever uplink it came
# from. It also keeps dhcpcd's stock hooks away, which would rewrite the
# host's /etc/resolv.conf.
#
# $LB_DHCP6_STATE/$interface.pd holds one PREFIX/LEN a line, the
# delegations with a valid lifetime from the last reply; it is removed
# when the lease ends. Written whole, then renamed: a reader never sees
# half a file.
state=${LB_DHCP6_STATE:?LB_DHCP6_STATE is not set (dhcpcd.conf: env LB_DHCP6_STATE=DIR)}
file="$state/$interface.pd"

case "$reason" in
    BOUND6 | RENEW6 | REBIND6 | REBOOT6)
        tmp="$file.tmp"
        : >"$tmp"
        ia=1
        # dhcpcd numbers the variables: new_dhcp6_ia_pd<IA>_prefix<N>.
        while eval "[ -n \"\${new_dhcp6_ia_pd${ia}_iaid:-}\" ]"; do
            n=1
            while eval "prefix=\${new_dhcp6_ia_pd${ia}_prefix${n}:-}" && [ -n "$prefix" ]; do
                eval "len=\${new_dhcp6_ia_pd${ia}_prefix${n}_length}"
                eval "valid=\${new_dhcp6_ia_pd${ia}_prefix${n}_vltime}"
                # A server that takes a prefix back sends it with a valid
                # lifetime of 0 beside its new one.
                if [ "$valid" != 0 ]; then
                    echo "$prefix/$len" >>"$tmp"
                fi
                n=$((n + 1))
            done
            ia=$((ia + 1))
        done
        mv "$tmp" "$file"
        ;;
    EXPIRE6 | RELEASE6 | STOP6 | NOCARRIER | DEPARTED)
        rm -f "$file"
        ;;
esac
exit 0
