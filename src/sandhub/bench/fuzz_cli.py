"""`sandhub bench fuzz`: the request fuzzer, longer than the tests run it.

By default it starts a Hub and an Orchestrator of its own (local backend,
private network device and subnet, temp state) in this process and fuzzes
them; with ``--hub`` it fuzzes a Hub that is already serving (give
``--hub-pid`` to watch that process's memory). Prints requests by RPC and by
status code, the failures (each replayable with ``--seed S --index I``), the
Hub's RSS at start, peak and end, and the duration; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
from typing import Any

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 6
API_KEY = "fuzz-bench"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(sub: Any) -> None:
    f = sub.add_parser("fuzz", help="send random and boundary requests of every RPC to a Hub and check that "
                                    "none ends INTERNAL, hangs or grows its memory")
    f.add_argument("--seed", type=int, default=1, help="seed of the generated requests (default 1)")
    f.add_argument("--requests", type=_positive_int, default=20000, help="requests to send (default 20000)")
    f.add_argument("--seconds", type=float, default=0.0, help="stop after this long even if requests remain "
                                                              "(default 0: no limit)")
    f.add_argument("--index", type=int, action="append", default=[], metavar="I",
                   help="send only request I of the seed (repeatable): replays a reported failure")
    f.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight (default 4)")
    f.add_argument("--deadline", type=float, default=10.0, help="each request's deadline in seconds (default 10)")
    f.add_argument("--max-rss-growth", type=float, default=300.0, metavar="MIB",
                   help="the Hub's memory may grow by this much over the run (default 300)")
    f.add_argument("--hub", default="", help="fuzz this Hub instead of starting one (its tenant's containers "
                                             "are created and deleted) [needs --api-key]")
    f.add_argument("--api-key", default=os.environ.get("SANDHUB_API_KEY", ""), help="with --hub [SANDHUB_API_KEY]")
    f.add_argument("--foreign-api-key", default="",
                   help="with --hub: another tenant's key; a container of that tenant becomes a target that "
                        "must never answer OK")
    f.add_argument("--hub-pid", type=int, default=0, help="with --hub: the Hub's process, for its RSS")
    f.add_argument("--json", action="store_true", help="print the figures as JSON")
    f.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench import fuzz

    logs.configure(level="error")
    if args.hub and not args.api_key:
        print("error: --hub needs --api-key", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(args))
    except _Unreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(fuzz.text(report))
    return EXIT_FAILED if report.failures else 0


class _Unreachable(Exception):
    pass


async def _run(args: argparse.Namespace) -> Any:
    import grpc

    from sandhub.bench import fuzz
    from sandhub.bench.fuzz_calls import Aim
    from sandhub.bench.local import LocalServices

    services = None
    address, key, rss = args.hub, args.api_key, fuzz.self_rss_bytes
    if args.hub_pid:
        rss = functools.partial(fuzz.pid_rss_bytes, args.hub_pid)
    if not address:
        key = API_KEY
        services = LocalServices(api_key=key)
        await services.start()
        address = services.hub_address
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    md = (("authorization", f"Bearer {key}"),)
    created: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    try:
        try:
            own = await fuzz.prepare(channel, md)
            foreign: tuple[str, ...] = ()
            if args.foreign_api_key:
                other = (("authorization", f"Bearer {args.foreign_api_key}"),)
                foreign = await fuzz.prepare(channel, other, containers=1, processes=False)
                created.extend((cid, other) for cid in foreign)
            created.extend((cid, md) for cid in own)
        except grpc.aio.AioRpcError as e:
            raise _Unreachable(f"cannot set up the fuzz targets on the Hub at {address}: "
                               f"{e.code().name}: {e.details()}") from None
        tenant = await fuzz.tenant_of(channel, md, own[0])
        # The in-process servers run on a loop of their own (LocalServices'
        # thread): their unhandled exceptions are failures too.
        server_loops = [services._loop] if services is not None else []  # noqa: SLF001
        return await fuzz.fuzz(channel, md, tenant=tenant, aim=Aim(own=own, foreign=foreign), seed=args.seed,
                               requests=args.requests, seconds=args.seconds, concurrency=args.concurrency,
                               deadline_s=args.deadline, rss=rss, max_rss_growth_mib=args.max_rss_growth,
                               indices=args.index or None, server_loops=server_loops)
    finally:
        for cid, who in created:
            await fuzz.delete_quietly(channel, who, cid)
        await channel.close()
        if services is not None:
            await services.stop()


def to_json(r: Any) -> dict[str, Any]:
    return {
        "seed": r.seed, "requests": r.requests, "duration_s": round(r.duration_s, 3),
        "by_rpc": dict(r.by_rpc), "by_code": dict(r.by_code),
        "by_rpc_code": {f"{k[0]} {k[1]}": v for k, v in r.by_rpc_code.items()},
        "slowest_ms": {k: round(v * 1000, 1) for k, v in r.slowest_s.items()},
        "rss_mib": {"start": round(r.rss_start_mib, 1), "peak": round(r.rss_peak_mib, 1),
                    "end": round(r.rss_end_mib, 1)},
        "liveness_ms": {k: round(v, 1) for k, v in r.liveness_ms.items()},
        "failures": [vars(f) for f in r.failures],
    }
