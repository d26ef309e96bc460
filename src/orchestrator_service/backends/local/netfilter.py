"""The nftables rules of one container network, as `nft -f` scripts (pure, no I/O).

Containers are matched by interface group (``iifgroup``/``oifgroup``): every
host veth of the network and the network's own device carry the group
number, set in the same rtnetlink request that creates the veth, so adding a
container changes no rule and no set. One table, ``inet sandhub_<name>``
(IPv4 and IPv6), hooked at:

- prerouting: a packet from a container whose source address would not be
  routed back out of the interface it came in on is dropped (reverse-path
  check): a container can only speak with its own address.
- input: from a container, only replies to connections the host opened
  (conntrack established/related) reach the host; anything else addressed
  to any host address is rejected.
- forward: container to container is dropped, on whichever veth either one
  sits (every pair of containers crosses the host's routing: there is no
  shared link); new connections forwarded *into* a container (from other
  hosts, other networks) are dropped; from a container to anywhere else is
  rejected unless ``allow_egress`` or the container's address is in the
  ``egress`` set, and then masqueraded.

Connections the host opens to a container are locally generated traffic
(output hook), which these rules leave alone. The table is replaced
atomically by ``setup`` and deleted by ``teardown``; nothing else of the
host's firewall is touched. nftables tables coexist with iptables (legacy or
nft backend): a drop in any table is final. The ``bridge`` table of earlier
versions (one shared bridge) is deleted with it.
"""

from __future__ import annotations

import ipaddress


def ruleset(*, table: str, group: int, subnet: ipaddress.IPv4Network, allow_egress: bool) -> str:
    """The script that (re)creates the network's table atomically."""
    g = f"{group:#x}"
    if allow_egress:
        egress = f"        iifgroup {g} accept\n"
    else:
        egress = (
            f'        iifgroup {g} ip saddr @egress accept comment "egress allowed per container"\n'
            f'        iifgroup {g} counter reject with icmpx type admin-prohibited comment "no egress"\n'
        )
    masquerade = subnet if allow_egress else "@egress"
    return (
        # "add table; delete table; table {...}" in one transaction:
        # idempotent whether or not the table existed.
        f"{delete(table)}"
        f"table inet {table} {{\n"
        f"    set egress {{\n"
        f"        type ipv4_addr; comment \"containers allowed to reach beyond the host\"\n"
        f"    }}\n"
        f"    chain prerouting {{\n"
        f"        type filter hook prerouting priority raw; policy accept;\n"
        f'        iifgroup {g} fib saddr . iif oif missing counter drop comment "not the container\'s own address"\n'
        f"    }}\n"
        f"    chain input {{\n"
        f"        type filter hook input priority filter; policy accept;\n"
        f"        iifgroup {g} ct state established,related accept\n"
        f'        iifgroup {g} counter reject with icmpx type admin-prohibited comment "containers never reach the host"\n'
        f"    }}\n"
        f"    chain forward {{\n"
        f"        type filter hook forward priority filter; policy accept;\n"
        f'        iifgroup {g} oifgroup {g} counter drop comment "no container to container"\n'
        f"        oifgroup {g} ct state established,related accept\n"
        f'        oifgroup {g} counter drop comment "no new connections into containers"\n'
        f"{egress}"
        f"    }}\n"
        f"    chain postrouting {{\n"
        f"        type nat hook postrouting priority srcnat; policy accept;\n"
        f"        ip saddr {masquerade} oifgroup != {g} masquerade\n"
        f"    }}\n"
        f"}}\n"
    )


def delete(table: str) -> str:
    """The script that deletes the network's tables (also the ``bridge`` one
    of earlier versions), whether or not they exist."""
    return (
        f"table inet {table}\ndelete table inet {table}\n"
        f"table bridge {table}\ndelete table bridge {table}\n"
    )
