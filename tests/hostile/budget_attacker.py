"""A hostile tenant's load, run as its own process by test_budgets.py so its
client-side CPU and memory don't count as the Hub's (which runs in the test
process).

    python -m tests.hostile.budget_attacker PORT KEY MODE N [ARG]

MODE is ``watch`` (N Watch streams held open; with ARG, a container id,
changes to it made in a loop for them to see), ``run`` (N workers each
looping a Run that prints ARG bytes) or ``calls`` (N workers looping
GetContainer on container ARG). It prints one JSON line when the load is in
place ({"ready": ...counts}), keeps it up until stdin closes, then prints the
final counts as a JSON line and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

import grpc
from google.protobuf import duration_pb2

from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc


def _outcome(e: grpc.aio.AioRpcError) -> str:
    return str(e.code().name)


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def _watch(channel: grpc.aio.Channel, md: Any, n: int, churn: str, counts: Counter[str], ready: asyncio.Event) -> None:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    settled = 0

    async def one() -> None:
        nonlocal settled
        call = stub.WatchContainers(pb.WatchContainersRequest(send_initial=True), metadata=md)
        first = True
        try:
            async for event in call:
                if first and event.type == pb.WATCH_EVENT_TYPE_SYNCED:
                    counts["OK"] += 1
                    first = False
                    settled += 1
                    if settled == n:
                        ready.set()
        except grpc.aio.AioRpcError as e:
            if first:
                counts[_outcome(e)] += 1
                settled += 1
                if settled == n:
                    ready.set()

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    if churn:
        # Changes to fan out: every extend is an event for each of the watches.
        await ready.wait()
        ex = pb_grpc.OrchestratorServiceStub(channel)
        extend_by = duration_pb2.Duration(nanos=1000)

        async def extend() -> None:
            while True:
                await ex.ExtendContainer(pb.ExtendContainerRequest(container_id=churn, extend_by=extend_by), metadata=md)
                counts["events"] += 1

        tasks.append(asyncio.ensure_future(extend()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def _runs(channel: grpc.aio.Channel, md: Any, n: int, size: int, counts: Counter[str], ready: asyncio.Event) -> None:
    stub = xpb_grpc.ExecServiceStub(channel)
    created = await pb_grpc.OrchestratorServiceStub(channel).CreateContainer(
        pb.CreateContainerRequest(wait_until_running=True), metadata=md)
    cid = created.container.container_id
    # The sleep keeps each Run's output held in the Hub a while, so the
    # concurrent Runs' output piles up (a Run's cap is ~2 MiB per stream).
    request = xpb.RunRequest(container_id=cid, command=xpb.Command(shell=f"head -c {size} /dev/zero; sleep 0.5"),
                             max_output_bytes=size)
    done = 0

    async def worker() -> None:
        nonlocal done
        while True:
            try:
                r = await stub.Run(request, metadata=md)
                counts["TRUNCATED" if r.stdout_truncated else "OK"] += 1
                counts["bytes"] += len(r.stdout)
            except grpc.aio.AioRpcError as e:
                counts[_outcome(e)] += 1
                await asyncio.sleep(0.05)
            done += 1
            if done >= n:
                ready.set()

    await asyncio.gather(*(worker() for _ in range(n)))


async def _calls(channel: grpc.aio.Channel, md: Any, n: int, cid: str, counts: Counter[str], ready: asyncio.Event) -> None:
    stub = pb_grpc.OrchestratorServiceStub(channel)
    done = 0

    async def worker() -> None:
        nonlocal done
        while True:
            try:
                await stub.GetContainer(pb.GetContainerRequest(container_id=cid), metadata=md)
                counts["OK"] += 1
            except grpc.aio.AioRpcError as e:
                counts[_outcome(e)] += 1
                await asyncio.sleep(0.01)
            done += 1
            if done >= n:
                ready.set()

    await asyncio.gather(*(worker() for _ in range(n)))


async def main(port: int, key: str, mode: str, n: int, arg: str) -> None:
    md = (("authorization", f"Bearer {key}"),)
    counts: Counter[str] = Counter()
    ready = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", 64 << 20),
    ]) as channel:
        if mode == "watch":
            attack = asyncio.ensure_future(_watch(channel, md, n, arg, counts, ready))
        elif mode == "run":
            attack = asyncio.ensure_future(_runs(channel, md, n, int(arg), counts, ready))
        else:
            attack = asyncio.ensure_future(_calls(channel, md, n, arg, counts, ready))
        await asyncio.wait([attack, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if attack.done():
            attack.result()  # raises what went wrong
        print(json.dumps({"ready": dict(counts)}), flush=True)
        await _stdin_closed()
        attack.cancel()
    print(json.dumps({"final": dict(counts)}), flush=True)


if __name__ == "__main__":
    port, key, mode, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    asyncio.run(main(port, key, mode, n, sys.argv[5] if len(sys.argv) > 5 else ""))
