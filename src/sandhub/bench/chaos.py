"""A chaos run: a burst of creates, uploads and execs from several clients
through a real Hub and Orchestrator (processes of their own, chaos_services.py)
while each service is killed with SIGKILL and started again, optionally a full
state disk, then the invariants:

- nothing lost: every create answered OK is found, RUNNING or FAILED with a
  reason (or TERMINATING/TERMINATED when the client deleted it);
- no duplicate: a request_id sent again (after an error, or after its OK) names
  one container, and at most one live container carries that request's label;
- no orphan: every cgroup, veth and process of the run's containers on the
  host belongs to a container the Orchestrator knows and has not called
  TERMINATED; once everything is deleted nothing is left;
- every failed call got a specific code: never INTERNAL or UNKNOWN.

`tests/chaos/test_chaos.py` runs it briefly in `make test`; `sandhub bench
soak --minutes N` (soak.py) runs it for longer and prints the figures.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from sandhub import internal_auth, rpc
from sandhub.bench import chaos_host
from sandhub.bench.chaos_services import TENANT_KEYS, ChaosServices, ProcessFigures, figures_of
from sandhub.exec.v1 import exec_pb2, exec_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

T = TypeVar("T")
UNSPECIFIC = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
RUN_LABEL = "chaos-run"
REQUEST_LABEL = "chaos-request"
FILE_BYTES = 64 * 1024
LIVE = (pb.CONTAINER_STATE_PENDING, pb.CONTAINER_STATE_RUNNING)


@dataclass(frozen=True)
class ChaosOptions:
    duration_s: float = 20.0
    """How long the clients keep creating, uploading and running."""
    clients: int = 4
    """Concurrent client tasks (split between the two tenants)."""
    kill_every_s: float = 6.0
    """A SIGKILL every this many seconds, the Orchestrator and the Hub in turn."""
    full_disk: bool = True
    """Fill the state disk (a tmpfs the run mounts), create, delete and restart on it, then free it."""
    disk_mib: int = 64
    call_timeout_s: float = 20.0
    retry_for_s: float = 30.0
    """How long a create is retried with its request_id after a retryable code."""
    seed: int = 12


@dataclass
class ChaosResult:
    creates: int = 0
    creates_failed_state: int = 0
    uploads: int = 0
    execs: int = 0
    deletes: int = 0
    resends: int = 0
    gave_up: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """``CODE`` or ``CODE REASON`` of every failed call -> count."""
    kills: dict[str, int] = field(default_factory=dict)
    figures: dict[str, dict[str, ProcessFigures | None]] = field(default_factory=dict)
    """service -> {"start": ..., "end": ...}."""
    disk: list[str] = field(default_factory=list)
    """What the full-disk phase saw."""
    violations: dict[str, list[str]] = field(default_factory=dict)
    """invariant -> what broke it; an invariant with an empty list held."""
    notes: list[str] = field(default_factory=list)
    """When an invariant broke: the tail of each service's log."""
    wall_s: float = 0.0

    def violate(self, invariant: str, what: str) -> None:
        self.violations.setdefault(invariant, []).append(what)

    def held(self) -> bool:
        return not any(self.violations.values())


INVARIANTS = ("no lost container", "no duplicate", "no orphan", "nothing left after delete",
              "specific codes", "full disk")


class Clients:
    """The callers: their channels to the Hub and the Orchestrator, what
    they were answered, and the counts."""

    def __init__(self, services: ChaosServices, options: ChaosOptions, result: ChaosResult, run: str) -> None:
        self.services, self.options, self.result, self.run = services, options, result, run
        self.hub = grpc.aio.insecure_channel(services.hub_address)
        self.orch = grpc.aio.insecure_channel(services.orchestrator_address)
        self.containers = pb_grpc.OrchestratorServiceStub(self.hub)
        self.exec = exec_pb2_grpc.ExecServiceStub(self.hub)
        self.operator = pb_grpc.OrchestratorServiceStub(self.orch)
        self.operator_md = internal_auth.metadata(services.token)
        self.created: dict[str, tuple[str, str]] = {}
        """request_id -> (container id, API key) of every create answered OK."""
        self.deleted: set[str] = set()
        self.delete_unanswered: set[str] = set()
        """Deletes retried until the deadline without an answer: they may or may not have happened."""
        self.stop = asyncio.Event()

    async def close(self) -> None:
        await self.hub.close()
        await self.orch.close()

    def md(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    def failed(self, what: str, e: grpc.aio.AioRpcError) -> None:
        reason = rpc.error_reason(e)
        self.result.errors[f"{e.code().name}{' ' + reason if reason else ''}"] += 1
        if e.code() in UNSPECIFIC:
            self.result.violate("specific codes", f"{what}: {e.code().name} {reason} {(e.details() or '')[:160]}")

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T | grpc.aio.AioRpcError:
        try:
            return await fn()
        except grpc.aio.AioRpcError as e:
            self.failed(what, e)
            return e

    async def retried(self, what: str, fn: Callable[[], Awaitable[T]]) -> tuple[T | grpc.aio.AioRpcError, bool]:
        """Calls, again with backoff on retryable codes (as a real client
        would), until an answer or the run's retry time is up: the last
        outcome, and whether it took more than one try."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.retry_for_s
        wait = 0.2
        tries = 0
        while True:
            got = await self.call(what, fn)
            tries += 1
            if not isinstance(got, grpc.aio.AioRpcError) or got.code() not in RETRYABLE or loop.time() > deadline:
                return got, tries > 1
            await asyncio.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, 2.0)

    # -- one client's work ---------------------------------------------------------

    async def create(self, key: str, request_id: str) -> pb.Container | None:
        """Creates, retrying with the same request_id on retryable codes."""
        req = pb.CreateContainerRequest(request_id=request_id, wait_until_running=True,
                                        labels={RUN_LABEL: self.run, REQUEST_LABEL: request_id})
        got, retried = await self.retried("CreateContainer", lambda: self.containers.CreateContainer(
            req, metadata=self.md(key), timeout=self.options.call_timeout_s))
        if isinstance(got, grpc.aio.AioRpcError):
            self.result.gave_up += 1
            return None
        c = got.container
        if retried and c.state != pb.CONTAINER_STATE_RUNNING:  # issue 12, item 5
            self.result.violate("no lost container", f"request {request_id} retried after an error: "
                                f"{pb.ContainerState.Name(c.state)} {c.state_reason}, not a working container")
        return self.answered(key, request_id, c)

    def answered(self, key: str, request_id: str, c: pb.Container) -> pb.Container:
        before = self.created.get(request_id)
        if before is not None and before[0] != c.container_id:
            self.result.violate("no duplicate", f"request {request_id}: {before[0]}, then {c.container_id}")
        if before is None:
            self.created[request_id] = (c.container_id, key)
            self.result.creates += 1
            if c.state != pb.CONTAINER_STATE_RUNNING:
                self.result.creates_failed_state += 1
                if not c.state_reason:
                    self.result.violate("no lost container", f"{c.container_id} answered {pb.ContainerState.Name(c.state)} "
                                                             "without a reason")
        return c

    async def work(self, key: str, c: pb.Container, rng: random.Random) -> None:
        data = rng.randbytes(FILE_BYTES)

        async def put() -> exec_pb2.PutFilesResponse:
            async def messages() -> AsyncIterator[exec_pb2.PutFilesRequest]:
                yield exec_pb2.PutFilesRequest(start=exec_pb2.PutFilesStart(
                    container_id=c.container_id, format=exec_pb2.ARCHIVE_FORMAT_RAW))
                yield exec_pb2.PutFilesRequest(file=exec_pb2.FileHeader(path="chaos.bin", mode=0o644,
                                                                                  size=len(data)))
                for i in range(0, len(data), 16 * 1024):
                    yield exec_pb2.PutFilesRequest(data=data[i:i + 16 * 1024])

            response: exec_pb2.PutFilesResponse = await self.exec.PutFiles(
                messages(), metadata=self.md(key), timeout=self.options.call_timeout_s)
            return response

        uploaded = not isinstance(await self.call("PutFiles", put), grpc.aio.AioRpcError)
        self.result.uploads += uploaded
        for argv in (["cat", "/work/chaos.bin"], ["ls", "/"]):
            run = exec_pb2.RunRequest(container_id=c.container_id, command=exec_pb2.Command(argv=argv))
            got = await self.call("Run", lambda: self.exec.Run(run, metadata=self.md(key),
                                                               timeout=self.options.call_timeout_s))
            if isinstance(got, grpc.aio.AioRpcError):
                continue
            self.result.execs += 1
            if argv[0] == "cat" and uploaded and got.stdout != data:
                self.result.violate("no lost container", f"{c.container_id}: the uploaded file read back differently")

    async def client(self, n: int) -> None:
        rng = random.Random(self.options.seed * 1000 + n)
        keys = list(TENANT_KEYS)
        key = keys[n % len(keys)]
        i = 0
        while not self.stop.is_set():
            i += 1
            request_id = f"{self.run}-{n}-{i}"
            c = await self.create(key, request_id)
            if c is None or c.state != pb.CONTAINER_STATE_RUNNING:
                continue
            if rng.random() < 0.25:  # the same request again: the same container
                self.result.resends += 1
                await self.create(key, request_id)
            await self.work(key, c, rng)
            if rng.random() < 0.3:
                await self.delete(key, c.container_id)

    async def delete(self, key: str, container_id: str) -> None:
        """Deletes, retrying on retryable codes (a delete whose answer was
        lost may still have happened: it is idempotent)."""
        got, _ = await self.retried("DeleteContainer", lambda: self.containers.DeleteContainer(
            pb.DeleteContainerRequest(container_id=container_id), metadata=self.md(key),
            timeout=self.options.call_timeout_s))
        if isinstance(got, grpc.aio.AioRpcError):
            if got.code() in RETRYABLE:  # out of time: it may have happened
                self.delete_unanswered.add(container_id)
        else:
            self.deleted.add(container_id)
            self.result.deletes += 1

    # -- what the Orchestrator knows --------------------------------------------------

    async def every_container(self) -> dict[str, pb.Container]:
        """Every container of the run, every tenant's (the operator's view),
        TERMINATED ones too (a plain list leaves them out), retried while the
        Orchestrator comes back."""
        found = await self._listed(pb.CONTAINER_STATE_TERMINATED)
        found.update(await self._listed(pb.CONTAINER_STATE_UNSPECIFIED))
        return found

    async def _listed(self, state: pb.ContainerState) -> dict[str, pb.Container]:
        req = pb.ListContainersRequest(label_selector=f"{RUN_LABEL}={self.run}", state=state, page_size=1000)
        found: dict[str, pb.Container] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            try:
                resp = await self.operator.ListContainers(req, metadata=self.operator_md, timeout=30)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
                continue
            found.update((c.container_id, c) for c in resp.containers)
            if not resp.next_page_token:
                return found
            req.page_token = resp.next_page_token


async def chaos_monkey(services: ChaosServices, clients: Clients, options: ChaosOptions) -> None:
    """Kills the Orchestrator and the Hub in turn with SIGKILL, each started again at once."""
    order = ["orchestrator", "hub"]
    turn = 0
    while True:
        try:
            await asyncio.wait_for(clients.stop.wait(), options.kill_every_s)
            return
        except TimeoutError:
            pass
        name = order[turn % len(order)]
        turn += 1
        await services.restart(name)


async def full_disk_phase(services: ChaosServices, clients: Clients, result: ChaosResult) -> None:
    """Creates, a delete and an Orchestrator restart on a full state disk: each
    answers a specific code (RESOURCE_EXHAUSTED/UNAVAILABLE, never INTERNAL) or
    works; once space is freed, a create retried with its request_id works
    and the deleted container goes."""
    key = next(iter(TENANT_KEYS))
    victim = await clients.create(key, f"{clients.run}-disk-victim")
    written = services.fill_disk()
    result.disk.append(f"filled with {written / 2**20:.1f} MiB")
    request_id = f"{clients.run}-disk-1"
    req = pb.CreateContainerRequest(request_id=request_id, wait_until_running=True,
                                    labels={RUN_LABEL: clients.run, REQUEST_LABEL: request_id})
    for attempt in range(3):
        got = await clients.call("CreateContainer (disk full)", lambda: clients.containers.CreateContainer(
            req, metadata=clients.md(key), timeout=20))
        if isinstance(got, grpc.aio.AioRpcError):
            result.disk.append(f"create {attempt + 1}: {got.code().name} {rpc.error_reason(got)}")
            if got.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                result.violate("full disk", f"create on a full disk: {got.code().name} {rpc.error_reason(got)}")
        else:
            result.disk.append(f"create {attempt + 1}: OK {pb.ContainerState.Name(got.container.state)}")
            clients.answered(key, request_id, got.container)
    if victim is not None:
        got = await clients.call("DeleteContainer (disk full)", lambda: clients.containers.DeleteContainer(
            pb.DeleteContainerRequest(container_id=victim.container_id), metadata=clients.md(key), timeout=20))
        if isinstance(got, grpc.aio.AioRpcError):
            result.disk.append(f"delete: {got.code().name} {rpc.error_reason(got)}")
            result.violate("full disk", f"delete on a full disk: {got.code().name} (teardown needs no space)")
        else:
            clients.deleted.add(victim.container_id)
            result.disk.append(f"delete: OK {pb.ContainerState.Name(got.container.state)}")
    try:
        await services.restart("orchestrator")
        result.disk.append("orchestrator restarted on the full disk")
    except RuntimeError as e:
        result.violate("full disk", f"the Orchestrator does not start on a full disk: {e}")
        services.free_disk()
        await services.start("orchestrator")
    services.free_disk()
    again = await clients.create(key, request_id)
    if again is None or again.state != pb.CONTAINER_STATE_RUNNING:
        state = "no answer" if again is None else pb.ContainerState.Name(again.state)
        result.violate("full disk", f"after freeing space, the create retried with its request_id: {state}")
    else:
        result.disk.append("after freeing space the retried create is RUNNING")


async def check_known_and_host(services: ChaosServices, clients: Clients, result: ChaosResult) -> None:
    """Nothing lost, no duplicate, no orphan: once the clients stopped."""
    known = await clients.every_container()
    for request_id, (cid, _) in sorted(clients.created.items()):
        c = known.get(cid)
        if cid in clients.delete_unanswered and cid not in clients.deleted:
            continue  # its delete may or may not have happened: either is right
        if cid in clients.deleted:
            if c is not None and c.state in LIVE:
                result.violate("no lost container", f"{cid}: deleted, still {pb.ContainerState.Name(c.state)}")
            continue
        if c is None:
            result.violate("no lost container", f"{cid} ({request_id}): answered OK, now unknown")
        elif c.state == pb.CONTAINER_STATE_FAILED and not c.state_reason:
            result.violate("no lost container", f"{cid}: FAILED without a reason")
        elif c.state not in (pb.CONTAINER_STATE_RUNNING, pb.CONTAINER_STATE_FAILED):
            result.violate("no lost container", f"{cid}: {pb.ContainerState.Name(c.state)} "
                                                f"({c.state_reason}) though nobody deleted it")
    running = [(cid, key) for cid, key in clients.created.values()
               if cid not in clients.deleted and cid in known and known[cid].state == pb.CONTAINER_STATE_RUNNING]
    for cid, key in running[:3]:  # after the last crash of both, a RUNNING container still runs commands
        await still_runs(clients, cid, key, result)
    per_request = Counter(c.labels.get(REQUEST_LABEL, "") for c in known.values() if c.state in LIVE)
    for request_id, n in per_request.items():
        if n > 1:
            result.violate("no duplicate", f"request {request_id}: {n} live containers")
    traces = chaos_host.scan(cgroup_parent=services.cgroup_parent, veth_alias_prefix=services.veth_alias_prefix,
                             known_ids=known)
    gone = {cid for cid, c in known.items() if c.state == pb.CONTAINER_STATE_TERMINATED}
    orphans = traces.container_ids() - (set(known) - gone)
    for line in traces.of(orphans):
        result.violate("no orphan", line + (" (TERMINATED)" if line.split(":")[0] in gone else " (unknown)"))


async def still_runs(clients: Clients, cid: str, key: str, result: ChaosResult) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    req = exec_pb2.RunRequest(container_id=cid, command=exec_pb2.Command(argv=["ls", "/work"]))
    while True:
        got = await clients.call("Run (after the restarts)", lambda: clients.exec.Run(
            req, metadata=clients.md(key), timeout=clients.options.call_timeout_s))
        if not isinstance(got, grpc.aio.AioRpcError):
            if got.exit_status.exit_code != 0:
                result.violate("no lost container", f"{cid}: `ls /work` exits {got.exit_status.exit_code} after the "
                                                    f"restarts: {got.stderr[:120]!r}")
            return
        if got.code() not in RETRYABLE or loop.time() > deadline:
            result.violate("no lost container", f"{cid}: RUNNING, but Run answers {got.code().name} "
                                                f"{rpc.error_reason(got)} after the restarts")
            return
        await asyncio.sleep(0.5)


async def delete_everything(services: ChaosServices, clients: Clients, result: ChaosResult) -> None:
    """Deletes every container of the run; then nothing of them is left."""
    known = await clients.every_container()
    keys = {tenant: key for key, tenant in TENANT_KEYS.items()}
    for cid, c in known.items():
        if c.state in (*LIVE, pb.CONTAINER_STATE_FAILED):
            await clients.call("DeleteContainer", lambda: clients.containers.DeleteContainer(
                pb.DeleteContainerRequest(container_id=cid), metadata=clients.md(keys[c.tenant]), timeout=30))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        known = await clients.every_container()
        left = {cid for cid, c in known.items() if c.state != pb.CONTAINER_STATE_TERMINATED}
        traces = chaos_host.scan(cgroup_parent=services.cgroup_parent,
                                 veth_alias_prefix=services.veth_alias_prefix, known_ids=known)
        if (not left and not traces.container_ids()) or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    for cid in sorted(left):
        result.violate("nothing left after delete", f"{cid}: still {pb.ContainerState.Name(known[cid].state)} "
                                                    f"({known[cid].state_reason})")
    for line in traces.of(traces.container_ids()):
        result.violate("nothing left after delete", line)


def take_figures(services: ChaosServices) -> dict[str, ProcessFigures | None]:
    return {name: figures_of(services.pid(name)) for name in ("orchestrator", "hub")}


async def run_chaos(options: ChaosOptions, *, progress: Callable[[str], None] = lambda _: None) -> ChaosResult:
    result = ChaosResult()
    for name in INVARIANTS:
        result.violations[name] = []
    started = time.monotonic()
    services = ChaosServices(disk_mib=options.disk_mib if options.full_disk else 0)
    clients: Clients | None = None
    try:
        await services.start("orchestrator")
        await services.start("hub")
        clients = Clients(services, options, result, run=f"chaos{int(time.time()) % 100000}")
        start_figures = take_figures(services)
        progress(f"burst: {options.clients} clients for {options.duration_s:g} s, a SIGKILL every "
                 f"{options.kill_every_s:g} s")
        tasks = [asyncio.ensure_future(clients.client(n)) for n in range(options.clients)]
        monkey = asyncio.ensure_future(chaos_monkey(services, clients, options))
        await asyncio.sleep(options.duration_s)
        clients.stop.set()
        await monkey
        await asyncio.gather(*tasks)
        # The last word goes to a crash: both services killed and started again.
        await services.restart("orchestrator")
        await services.restart("hub")
        if options.full_disk:
            progress("full state disk")
            await full_disk_phase(services, clients, result)
        progress("checking: nothing lost, no duplicate, no orphan")
        await check_known_and_host(services, clients, result)
        end_figures = take_figures(services)
        result.figures = {name: {"start": start_figures[name], "end": end_figures[name]}
                          for name in start_figures}
        progress("deleting everything")
        await delete_everything(services, clients, result)
        for name, fig in take_figures(services).items():
            result.figures[name]["after_delete"] = fig  # a leak stays; what live containers hold goes
        await clients.close()
        clients = None
        await services.stop()
    finally:
        if clients is not None:
            await clients.close()
        await services.stop()
        result.kills = dict(services.kills)
        if not result.held():
            result.notes += [f"{name} log (last lines):\n{services.log_tail(name, 15)}" for name in ("orchestrator", "hub")]
            named = sorted(set(re.findall(r"\bcnt-[a-z0-9]+\b", "\n".join(
                line for lines in result.violations.values() for line in lines))))
            result.notes += [f"orchestrator log naming {cid}:\n{services.log_lines_naming('orchestrator', cid)}"
                             for cid in named[:5]]
        await services.remove()
        result.wall_s = time.monotonic() - started
    return result


def text(result: ChaosResult) -> str:
    lines = [f"chaos run: {result.wall_s:.1f} s; SIGKILLs: "
             + ", ".join(f"{k} {v}" for k, v in result.kills.items()),
             f"done: {result.creates} creates ({result.creates_failed_state} answered not RUNNING), "
             f"{result.resends} resent, {result.uploads} uploads, {result.execs} execs, {result.deletes} deletes, "
             f"{result.gave_up} creates given up",
             "errors by code: " + (", ".join(f"{k} {v}" for k, v in result.errors.most_common()) or "none")]
    for name, fig in result.figures.items():
        start, end, after = fig.get("start"), fig.get("end"), fig.get("after_delete")
        lines.append(f"{name}: RSS {_kib(start)} at start -> {_kib(end)} at end -> {_kib(after)} after deleting "
                     f"everything; open fds {_fds(start)} -> {_fds(end)} -> {_fds(after)}")
    lines += [f"full disk: {line}" for line in result.disk]
    for name, broken in result.violations.items():
        lines.append(f"{'held  ' if not broken else 'BROKEN'} {name}" + (f" ({len(broken)})" if broken else ""))
        lines += [f"    {b}" for b in broken[:10]]
    return "\n".join(lines)


def _fds(f: ProcessFigures | None) -> str:
    return str(f.open_fds) if f else "-"


def _kib(f: ProcessFigures | None) -> str:
    return f"{f.rss_kib / 1024:.0f} MiB" if f else "-"


def to_json(result: ChaosResult) -> dict[str, Any]:
    return {
        "wall_s": round(result.wall_s, 1), "kills": result.kills, "creates": result.creates,
        "creates_not_running": result.creates_failed_state, "resends": result.resends, "uploads": result.uploads,
        "execs": result.execs, "deletes": result.deletes, "gave_up": result.gave_up,
        "errors": dict(result.errors), "disk": result.disk,
        "figures": {n: {k: (vars(v) if v else None) for k, v in f.items()} for n, f in result.figures.items()},
        "invariants": {n: {"held": not v, "violations": v} for n, v in result.violations.items()},
    }
