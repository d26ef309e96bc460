"""One container's routed veth, wired over rtnetlink (rtnetlink.py) in a worker thread.

Host side: ``sh-<12>`` in the network's interface group, ``NOARP``, no IPv6,
a /32 route to the container's address sent from the gateway address, and a
permanent neighbour entry for the container's MAC. Inside: ``eth0`` holding
the address as a point-to-point /32 whose peer is the gateway (that is the
only on-link destination), a permanent neighbour entry for the gateway and,
only with egress, a default route. Permanent neighbour entries on both sides
mean no ARP ever crosses the link: the host never floods, never answers a
container's probe for its other addresses, and its neighbour table's
``gc_thresh3`` (1,024 by default) does not cap the number of containers the
host can talk to (permanent entries are not counted against it).

Requests on the host: veth, alias+noarp+up, neighbour, route (one more to
replace a stale veth); inside: address, up, neighbour, default route with
egress. No process is started. Deleting the host veth takes its route, its
neighbour entry and the container's eth0 with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass

from orchestrator_service.backends.local import nettools, rtnetlink

CONTAINER_IFACE = "eth0"


def mac_of(ip: ipaddress.IPv4Address) -> str:
    """A locally administered MAC derived from the address (02:5a:a.b.c.d), so a
    reused address comes back with the same MAC."""
    return "02:5a:" + ":".join(f"{b:02x}" for b in ip.packed)


@dataclass(frozen=True)
class AttachPlan:
    veth: str
    group: int
    """The network's interface group: the firewall matches containers by it."""
    alias: str
    netns_fd: int
    """The container's network namespace, opened once: a pid could be reused."""
    ip: str
    gateway: str
    """The host's address on the containers' side (held by the network's device)."""
    egress: bool
    """Whether the container gets a default route via the gateway."""

    @property
    def mac(self) -> str:
        return mac_of(ipaddress.IPv4Address(self.ip))

    @property
    def host_mac(self) -> str:
        """Every host veth of a network has the gateway's MAC (each is a link of its own)."""
        return mac_of(ipaddress.IPv4Address(self.gateway))


def attach_veth(plan: AttachPlan) -> None:
    """Wires the veth of one container; blocks (the kernel's RTNL): run in a worker thread."""
    with rtnetlink.Rtnl.open() as host:
        if nettools.exists(plan.veth):  # left from an earlier attach of the same container
            host.delete_link(plan.veth)
        # Created down; the peer, eth0, straight into the container's namespace with its MAC.
        host.add_veth(plan.veth, mac=plan.host_mac, group=plan.group, peer_name=CONTAINER_IFACE,
                      peer_mac=plan.mac, peer_netns_fd=plan.netns_fd)
        index, peer = nettools.ifindex(plan.veth), nettools.ifindex(plan.veth, "iflink")
        # Before it is up: no IPv6 link-local address, nothing of the host reachable over v6.
        nettools.write_sysctl(f"/proc/sys/net/ipv6/conf/{plan.veth}/disable_ipv6", "1")
        # NOARP first: turning it on flushes the link's neighbour entries.
        host.set_link_up(index, alias=plan.alias, noarp=True)
        host.add_neighbour(plan.ip, plan.mac, index)
        host.add_host_route(plan.ip, index, source=plan.gateway)
    # Not lo: bwrap brings loopback up itself, maybe at this very moment, and
    # its exclusive address add fails if we won.
    with rtnetlink.Rtnl.open_in(plan.netns_fd) as inside:
        inside.add_address(peer, plan.ip, 32, peer=plan.gateway)
        inside.add_neighbour(plan.gateway, plan.host_mac, peer)
        inside.set_up(peer)
        if plan.egress:
            inside.add_default_route(plan.gateway, peer)


def delete_link(ifname: str) -> None:
    with rtnetlink.Rtnl.open() as host:
        host.delete_link(ifname)


async def until_done(work: asyncio.Future[None]) -> None:
    """Waits until ``work`` is done, however often the caller is cancelled meanwhile."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({work})
    if not work.cancelled():
        work.exception()  # seen: the caller reports the cancel, and cleans up
