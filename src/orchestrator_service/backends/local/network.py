"""Container networking for the local backend: one host bridge, one IP per container.

Each container (a bwrap sandbox with its own network namespace) gets a veth
pair: the host end is a port of the bridge, the other end is ``eth0`` inside
the container, holding the container's address with a default route via the
bridge. The host reaches a container at ``ip:port`` like a pod IP.

Isolation, enforced in three layers:

- Bridge port isolation (``isolated on`` on every container port): the kernel
  bridge never forwards between two isolated ports, so containers cannot see
  each other even at layer 2 (no ARP either). This works without any firewall.
- An nftables ``bridge`` table drops bridged frames between two sandhub ports
  (names ``sh-*``), in case a port lost its isolated flag.
- An nftables ``inet`` table (IPv4 and IPv6), hooked at input and forward:
  * input: from the bridge, only replies to connections the host opened
    (conntrack established/related) reach the host; anything else addressed
    to any host address (the bridge IP, eth0's IP, ...) is dropped.
  * forward: bridge to bridge is dropped (this is what containers-to-containers
    looks like when br_netfilter hands bridged traffic to the IP hooks); new
    connections forwarded *into* the bridge (from other hosts, other bridges)
    are dropped; from the bridge to anywhere else is dropped unless
    ``allow_egress`` (every container) or the container's address is in the
    table's ``egress`` set (``attach(egress=True)``), and then masqueraded.
  Connections the host opens to a container are locally generated traffic
  (output hook), which these rules leave alone. What a container may not
  reach fails at once instead of hanging: without egress it has no default
  route (ENETUNREACH), and the host rejects rather than drops. So a DNS lookup
  (``python -m http.server`` does one at start) errors out in microseconds
  rather than after the resolver's 20 s.

The rules live in tables of their own (``inet sandhub_<bridge>`` and ``bridge
sandhub_<bridge>``), replaced atomically by ``setup`` and deleted by
``teardown``; nothing else of the host's firewall is touched. nftables tables
coexist with iptables (legacy or nft backend): a drop in any table is final.

Per container, attach and detach speak rtnetlink themselves (rtnetlink.py:
two requests on the host, three to replace a stale veth, and two or three
inside the container's namespace; no process started); an egress permission
is one ``nft`` run. Setting up and tearing down the bridge and its tables,
once per Orchestrator, go through ``ip -batch -`` and ``nft -f -``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass

from orchestrator_service.backends.local import rtnetlink

VETH_PREFIX = "sh-"
"""Host-side veth names are this plus 12 characters derived from the container id."""

ALIAS_PREFIX = "sandhub"
"""Host veths carry the interface alias ``sandhub:<bridge>:<container id>``."""

CONTAINER_IFACE = "eth0"
TOOL_TIMEOUT_S = 10.0
_SEARCH_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")
_IFNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
_STANDARD_ID = re.compile(r"^cnt-([a-z0-9]{12})$")
_SYS_NET = "/sys/class/net"


class NetworkError(Exception):
    """A network change failed; the message carries the tool's stderr."""


class AddressesExhausted(NetworkError):
    """Every container address of the subnet is taken."""


@dataclass(frozen=True)
class NetworkConfig:
    bridge: str = "sandhub0"
    """Name of the host bridge every container is attached to (at most 15
    characters, letters, digits, ``_.-``). One bridge per orchestrator; tests
    use another name so they do not disturb a running server."""

    subnet: str = "10.88.0.0/16"
    """IPv4 subnet of container addresses. Its first host address belongs to
    the bridge (the containers' gateway), the rest are handed out by
    ``HostNetwork.allocate``. Must not overlap a network the host uses."""

    allow_egress: bool = False
    """Whether containers may open connections to anything beyond the host
    (masqueraded behind the host's addresses). Turning it on also turns on
    the host's ``net.ipv4.ip_forward``. Containers never reach the host
    itself nor each other, whatever this says."""

    def __post_init__(self) -> None:
        if not _IFNAME.match(self.bridge):
            raise ValueError(f"bridge: {self.bridge!r} is not a valid interface name (max 15 chars)")
        try:
            net = ipaddress.ip_network(self.subnet, strict=True)
        except ValueError as e:
            raise ValueError(f"subnet: {e}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"subnet: {self.subnet!r} is not IPv4")
        if net.prefixlen > 30:
            raise ValueError(f"subnet: {self.subnet!r} is too small (at most /30)")


@dataclass(frozen=True)
class _Tools:
    ip: str
    nft: str


def _find(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SEARCH_PATH))
    if not found:
        raise NetworkError(f"`{name}` not found; install the {package} package")
    return found


def veth_name(container_id: str) -> str:
    """The host-side veth of a container: ``sh-`` + 12 characters, 15 in all.

    For standard ids (``cnt-`` + 12 of [a-z0-9]) those are the id's own 12
    characters, so the name is readable; any other id is hashed."""
    m = _STANDARD_ID.match(container_id)
    suffix = m.group(1) if m else hashlib.blake2s(container_id.encode(), digest_size=6).hexdigest()
    return VETH_PREFIX + suffix


def _mac(ip: ipaddress.IPv4Address) -> str:
    """A locally administered MAC derived from the address (02:5a:a.b.c.d), so a
    reused address comes back with the same MAC and no neighbour cache goes stale."""
    return "02:5a:" + ":".join(f"{b:02x}" for b in ip.packed)


def _exists(ifname: str) -> bool:
    return os.path.exists(os.path.join(_SYS_NET, ifname))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _master(ifname: str) -> str:
    """The bridge ``ifname`` is a port of, or ""."""
    try:
        return os.path.basename(os.readlink(os.path.join(_SYS_NET, ifname, "master")))
    except OSError:
        return ""


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # e.g. IPv6 disabled on the host: nothing to turn off
    except OSError as e:
        raise NetworkError(f"cannot write {path}: {e}") from e


async def _run(argv: list[str], script: str = "", *, timeout_s: float = TOOL_TIMEOUT_S) -> None:
    """Runs one tool with ``script`` on stdin; raises NetworkError on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.pathsep.join(_SEARCH_PATH), "LC_ALL": "C"},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), timeout_s)
    except BaseException:
        # Timed out or cancelled: end our own child, by its pid.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()
        raise NetworkError(f"{os.path.basename(argv[0])} failed ({proc.returncode}): {detail}")


@dataclass(frozen=True)
class _AttachPlan:
    veth: str
    bridge: str
    alias: str
    netns_fd: int
    """The container's network namespace, opened once: a pid could be reused."""
    ip: str
    prefixlen: int
    mac: str
    gateway: str
    """"": no default route."""


def _ifindex(ifname: str, attribute: str = "ifindex") -> int:
    """The index of a host interface (``iflink``: of a veth's peer, in the peer's namespace)."""
    try:
        with open(os.path.join(_SYS_NET, ifname, attribute)) as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        raise NetworkError(f"{ifname}: no {attribute} ({e})") from None


def _attach(plan: _AttachPlan) -> None:
    """The veth of one container, over rtnetlink (see rtnetlink.py); in a worker thread."""
    with rtnetlink.Rtnl.open() as host:
        if _exists(plan.veth):  # left from an earlier attach of the same container
            host.delete_link(plan.veth)
        # Created down, on the bridge; the peer, eth0, straight into the
        # container's namespace with its MAC.
        host.add_veth(plan.veth, peer_name=CONTAINER_IFACE, peer_mac=plan.mac, peer_netns_fd=plan.netns_fd,
                      master_index=_ifindex(plan.bridge))
        index, peer = _ifindex(plan.veth), _ifindex(plan.veth, "iflink")
        # Isolated before it is up: there is no moment it could forward.
        host.set_bridge_port(index, alias=plan.alias, isolated=True)
    # Not lo: bwrap brings loopback up itself, maybe at this very moment, and
    # its exclusive address add fails if we won.
    with rtnetlink.Rtnl.open_in(plan.netns_fd) as inside:
        inside.add_address(peer, plan.ip, plan.prefixlen)
        inside.set_up(peer)
        if plan.gateway:
            inside.add_default_route(plan.gateway, peer)


async def _until_done(work: asyncio.Future[None]) -> None:
    """Waits until ``work`` is done, however often the caller is cancelled meanwhile."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({work})
    if not work.cancelled():
        work.exception()  # seen: the caller reports the cancel, and cleans up


def _delete_link(ifname: str) -> None:
    with rtnetlink.Rtnl.open() as host:
        host.delete_link(ifname)


class HostNetwork:
    """The host side of container networking: the bridge, its firewall, the veths."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self._tools: _Tools | None = None
        net = ipaddress.IPv4Network(config.subnet)
        self._net = net
        self._gateway = net.network_address + 1
        self._first = int(net.network_address) + 2
        self._last = int(net.broadcast_address) - 1
        self._table = "sandhub_" + re.sub(r"[^A-Za-z0-9_]", "_", config.bridge)
        self._alias_prefix = f"{ALIAS_PREFIX}:{config.bridge}:"

    @property
    def gateway(self) -> str:
        """The bridge's address, the containers' default gateway."""
        return str(self._gateway)

    @property
    def prefixlen(self) -> int:
        return self._net.prefixlen

    def tools(self) -> _Tools:
        if self._tools is None:
            self._tools = _Tools(
                ip=_find("ip", "iproute2"),
                nft=_find("nft", "nftables"),
            )
        return self._tools

    # -- host setup ---------------------------------------------------------

    async def setup(self) -> None:
        """Creates (or refreshes) the bridge and installs the firewall tables.

        Idempotent: an existing bridge is kept (its address and up state are
        re-asserted), the nftables tables are replaced atomically."""
        tools = self.tools()
        br = self.config.bridge
        # Rules first (they match by name, the bridge need not exist yet), so
        # the bridge is never up without them.
        await _run([tools.nft, "-f", "-"], self.ruleset())
        if _exists(br):
            if not os.path.isdir(os.path.join(_SYS_NET, br, "bridge")):
                raise NetworkError(f"{br} exists and is not a bridge")
        else:
            # A fixed MAC: otherwise the bridge takes the lowest MAC of its
            # ports and changes it as containers come and go, which would
            # leave the containers' ARP entry for the gateway stale.
            await _run([tools.ip, "link", "add", "name", br, "address", _mac(self._gateway), "type", "bridge"])
        # No IPv6 on the bridge: the host then drops every IPv6 packet from
        # containers (they only have link-local v6 on eth0). Answer ARP only
        # for the bridge's own address, so containers cannot probe for the
        # host's other addresses.
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{br}/arp_ignore", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{br}/arp_announce", "2")
        await _run(
            [tools.ip, "-batch", "-"],
            f"addr replace {self._gateway}/{self.prefixlen} dev {br}\nlink set dev {br} up\n",
        )
        if self.config.allow_egress:
            _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")

    def ruleset(self) -> str:
        """The nft script that (re)creates this bridge's two tables atomically."""
        br = self.config.bridge
        t = self._table
        egress = (
            f'        iifname "{br}" accept\n'
            if self.config.allow_egress
            else f'        iifname "{br}" ip saddr @egress accept comment "egress allowed per container"\n'
            f'        iifname "{br}" counter reject with icmpx type admin-prohibited comment "no egress"\n'
        )
        masquerade = self._net if self.config.allow_egress else "@egress"
        nat = (
            f"    chain postrouting {{\n"
            f"        type nat hook postrouting priority srcnat; policy accept;\n"
            f'        ip saddr {masquerade} oifname != "{br}" masquerade\n'
            f"    }}\n"
        )
        return (
            # "add table; delete table; table {...}" in one transaction:
            # idempotent whether or not the table existed.
            f"table inet {t}\n"
            f"delete table inet {t}\n"
            f"table inet {t} {{\n"
            f"    set egress {{\n"
            f"        type ipv4_addr; comment \"containers allowed to reach beyond the host\"\n"
            f"    }}\n"
            f"    chain input {{\n"
            f"        type filter hook input priority filter; policy accept;\n"
            f'        iifname "{br}" ct state established,related accept\n'
            f'        iifname "{br}" counter reject with icmpx type admin-prohibited comment "containers never reach the host"\n'
            f"    }}\n"
            f"    chain forward {{\n"
            f"        type filter hook forward priority filter; policy accept;\n"
            f'        iifname "{br}" oifname "{br}" counter drop comment "no container to container"\n'
            f'        oifname "{br}" ct state established,related accept\n'
            f'        oifname "{br}" counter drop comment "no new connections into the bridge"\n'
            f"{egress}"
            f"    }}\n"
            f"{nat}"
            f"}}\n"
            f"table bridge {t}\n"
            f"delete table bridge {t}\n"
            f"table bridge {t} {{\n"
            f"    chain forward {{\n"
            f"        type filter hook forward priority filter; policy accept;\n"
            f'        iifname "{VETH_PREFIX}*" oifname "{VETH_PREFIX}*" counter drop\n'
            f"    }}\n"
            f"}}\n"
        )

    async def teardown(self) -> None:
        """Removes the firewall tables, this bridge's container veths and the
        bridge. Idempotent. Leaves ``ip_forward`` as it is (others may rely
        on it)."""
        tools = self.tools()
        t = self._table
        await _run(
            [tools.nft, "-f", "-"],
            f"table inet {t}\ndelete table inet {t}\ntable bridge {t}\ndelete table bridge {t}\n",
        )
        lines = [f"link del dev {name}" for name in self.leftovers()]
        if _exists(self.config.bridge):
            lines.append(f"link del dev {self.config.bridge}")
        if lines:
            try:
                # -force: go on past a veth that vanished meanwhile.
                await _run([tools.ip, "-force", "-batch", "-"], "\n".join(lines) + "\n")
            except NetworkError:
                if _exists(self.config.bridge) or self.leftovers():
                    raise

    # -- addresses ----------------------------------------------------------

    def allocate(self, taken: set[str]) -> str:
        """The lowest free container address of the subnet, given those in use.

        Skips the network, bridge and broadcast addresses. The caller records
        the result (and passes it back in ``taken`` from then on, also after a
        restart); releasing is just leaving it out of ``taken``."""
        used: set[int] = set()
        for s in taken:
            try:
                used.add(int(ipaddress.IPv4Address(s)))
            except ValueError:
                continue
        for n in range(self._first, self._last + 1):
            if n not in used:
                return str(ipaddress.IPv4Address(n))
        raise AddressesExhausted(
            f"no free container address in {self._net} on {self.config.bridge}: "
            f"all {self._last - self._first + 1} are taken"
        )

    def _check_ip(self, ip: str) -> ipaddress.IPv4Address:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise ValueError(f"ip: {ip!r} is not an IPv4 address") from None
        if not self._first <= int(addr) <= self._last:
            raise ValueError(f"ip: {ip} is not a container address of {self._net}")
        return addr

    # -- containers ---------------------------------------------------------

    async def attach(self, *, container_id: str, pid: int, ip: str, egress: bool = False) -> None:
        """Gives the network namespace of ``pid`` an ``eth0`` with ``ip`` on the bridge.

        ``pid`` must be a process inside the container's network namespace
        (the sandbox's pid-1, not the bwrap parent). A veth of the same
        container left from an earlier attach is replaced. On failure nothing
        is left behind and NetworkError is raised. ``egress`` lets this one
        container reach beyond the host (see ``allow_egress``), until ``detach``."""
        if not _CONTAINER_ID.match(container_id):
            raise ValueError(f"container_id: {container_id!r} has unexpected characters")
        addr = self._check_ip(ip)
        try:
            netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetworkError(f"pid {pid} does not exist") from None
        veth = veth_name(container_id)
        try:
            if os.fstat(netns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
                raise NetworkError(f"pid {pid} is in the host's network namespace, not a container's")
            plan = _AttachPlan(
                veth=veth, bridge=self.config.bridge, alias=f"{self._alias_prefix}{container_id}",
                netns_fd=netns_fd, ip=str(addr), prefixlen=self.prefixlen, mac=_mac(addr),
                # Without egress there is no default route at all: a connection
                # beyond the subnet fails at once (ENETUNREACH) instead of being
                # dropped on the way; the firewall stays as the second line.
                gateway=str(self._gateway) if egress or self.config.allow_egress else "",
            )
            # The requests block in the kernel (RTNL), so they run in a worker
            # thread, which a cancel can't stop: a cancelled caller waits for
            # it before cleaning up (else the veth could appear after the cleanup).
            work = asyncio.ensure_future(asyncio.to_thread(_attach, plan))
            try:
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    await _until_done(work)
                    raise
                if egress:
                    await self.allow_egress(ip)
            except BaseException as e:
                with contextlib.suppress(OSError):
                    await asyncio.shield(asyncio.to_thread(_delete_link, veth))
                if isinstance(e, (NetworkError, OSError)):
                    raise NetworkError(f"attach {container_id} ({ip}): {e}") from e
                raise
        finally:
            os.close(netns_fd)  # the thread is done with it by now

    async def allow_egress(self, ip: str) -> None:
        """Lets the container at ``ip`` open connections beyond the host."""
        self._check_ip(ip)
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        await _run([self.tools().nft, "add", "element", "inet", self._table, "egress", f"{{ {ip} }}"])

    async def detach(self, *, container_id: str, ip: str = "") -> None:
        """Deletes the container's host veth (its peer goes with it) and its
        egress permission. Idempotent.

        The veth goes by itself when the container's namespace is gone; the
        egress permission does not, so pass ``ip`` whenever it is known."""
        if ip:
            self._check_ip(ip)
            # "delete element" fails when it is not there: destroy does not,
            # but needs nft >= 1.0.8; a failed delete of an absent one is fine.
            with contextlib.suppress(NetworkError):
                await _run([self.tools().nft, "delete", "element", "inet", self._table, "egress", f"{{ {ip} }}"])
        await self.remove_veth(veth_name(container_id))

    async def remove_veth(self, veth: str) -> None:
        """Deletes one host veth by name, if it exists."""
        if not _exists(veth):
            return
        try:
            await asyncio.to_thread(_delete_link, veth)
        except OSError as e:
            raise NetworkError(f"delete {veth}: {e}") from e

    def leftovers(self) -> list[str]:
        """Host veths of this bridge's containers that exist now, sorted.

        Recognised by their alias (``sandhub:<bridge>:<id>``) or by being a
        ``sh-*`` port of the bridge. After a crash, compare with the records:
        a veth of a container that is no longer recorded is an orphan."""
        try:
            names = os.listdir(_SYS_NET)
        except OSError:
            return []
        found = []
        for name in names:
            if not name.startswith(VETH_PREFIX):
                continue
            alias = _read(os.path.join(_SYS_NET, name, "ifalias"))
            if alias.startswith(self._alias_prefix) or _master(name) == self.config.bridge:
                found.append(name)
        return sorted(found)

    def container_of(self, veth: str) -> str:
        """The container id recorded in a host veth's alias, or "" if none."""
        alias = _read(os.path.join(_SYS_NET, veth, "ifalias"))
        return alias[len(self._alias_prefix):] if alias.startswith(self._alias_prefix) else ""
