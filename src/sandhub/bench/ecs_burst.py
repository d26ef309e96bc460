"""`sandhub bench ecs-burst`: 1,000 creates at once through the ECS backend's
limiter, against moto on loopback, and the launch schedule it produced.

moto answers at once and never throttles, so what this measures is the
limiter alone: when each create's RunTask call (one task each) went out
(tasks per second, the wait of each from its create to its call) beside
Fargate's published rates (a bucket of 100 launches refilled at 20 a second;
RunTask 20 calls a second). A limiter that keeps to them launches the k-th
task no earlier than max(0, (k - 100) / 20) s and throttles nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sandhub.bench.stats import percentile


def _p(values: list[float], p: float) -> float:
    return round(percentile(values, p), 3) if values else math.nan


@dataclass
class BurstResult:
    creates: int
    failed: int
    run_task_calls: int
    throttled_by_aws: int
    launch_p50_s: float
    launch_p99_s: float
    launch_last_s: float
    create_p50_s: float
    create_p99_s: float
    ideal_last_s: float
    """When Fargate's own bucket (burst, then rate) would let the last task start."""
    earliest_vs_ideal_s: float
    """The most any task launched before Fargate's bucket allowed (<= 0: never throttled)."""
    per_second: list[int] = field(default_factory=list)
    """Tasks launched in each second since the burst began."""


class _TimedEcs:
    """The ECS client, noting when each RunTask call goes out."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.launches: list[float] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name != "run_task":
            return method

        @functools.wraps(method)
        def run_task(**kwargs: Any) -> Any:
            self.launches.append(time.monotonic())
            return method(**kwargs)

        return run_task


def ideal_launch_s(k: int, *, burst: int, rate: float) -> float:
    """When Fargate's bucket lets the k-th task (1-based) of a burst start."""
    return max(0.0, (k - burst) / rate)


async def burst(*, count: int, launch_rate: float, launch_burst: int, placement: str) -> BurstResult:
    from orchestrator_service.backends.ecs.backend import EcsBackend
    from orchestrator_service.backends.ecs.client import EcsApi
    from orchestrator_service.model import ContainerSpec, Port, Resources, new_container_id
    from sandhub.bench.ecs_moto import CLUSTER, FAKE_CREDENTIALS, REGION, moto_server
    from sandhub import internal_auth
    from sandhub.config import EcsBackendConfig, EcsPlacement

    import boto3
    import botocore.config

    with moto_server() as aws:
        aws.setup_cluster()
        config = EcsBackendConfig(
            cluster=CLUSTER, region=REGION, endpoint_url=aws.endpoint, subnets=(aws.subnet,),
            security_groups=(aws.security_group,), launch_rate=launch_rate, launch_burst=launch_burst,
            placements={"default": EcsPlacement(placement)}, poll_interval_s=1.0, resync_interval_s=600.0)
        client = boto3.session.Session(**FAKE_CREDENTIALS).client(
            "ecs", region_name=REGION, endpoint_url=aws.endpoint,
            config=botocore.config.Config(retries={"total_max_attempts": 1}, max_pool_connections=64))
        timed = _TimedEcs(client)
        backend = EcsBackend(config, notify=lambda e: None, placements=("default",), api=EcsApi(config, timed),
                             agent_key=internal_auth.agent_key(internal_auth.new_token()))
        await backend.start()
        spec = ContainerSpec(tenant="bench", image="busybox:1.37",
                             resources=Resources(cpu_millicores=250, memory_mib=512, pids=256, disk_mib=1024,
                                                 open_files=1024),
                             env={}, labels={"bench": "ecs-burst"}, ttl_s=3600.0, ports=(Port(8000),),
                             placement="default")
        # The task definition exists before the clock starts (it is registered once, ever).
        await backend.create(spec=replace(spec, labels={}), container_id=new_container_id())
        timed.launches.clear()
        done: list[float] = []
        failed = 0
        t0 = time.monotonic()

        async def one() -> None:
            nonlocal failed
            try:
                await backend.create(spec=spec, container_id=new_container_id())
                done.append(time.monotonic() - t0)
            except Exception:
                failed += 1

        try:
            await asyncio.gather(*(one() for _ in range(count)))
        finally:
            await backend.close()
        throttled = backend.api.stats.throttled
    waits = sorted(at - t0 for at in timed.launches)
    seconds = Counter(int(w) for w in waits)
    ideal = [ideal_launch_s(k + 1, burst=launch_burst, rate=launch_rate) for k in range(len(waits))]
    return BurstResult(
        creates=count, failed=failed, run_task_calls=len(timed.launches), throttled_by_aws=throttled,
        launch_p50_s=_p(waits, 50), launch_p99_s=_p(waits, 99),
        launch_last_s=round(waits[-1], 3) if waits else math.nan,
        create_p50_s=_p(done, 50), create_p99_s=_p(done, 99),
        ideal_last_s=round(ideal[-1], 3) if ideal else math.nan,
        earliest_vs_ideal_s=round(max((i - w for w, i in zip(waits, ideal)), default=0.0), 3),
        per_second=[seconds.get(s, 0) for s in range(int(waits[-1]) + 1)] if waits else [])


def text(r: BurstResult, *, rate: float, burst_size: int) -> str:
    lines = [
        f"ecs-burst: {r.creates} creates at once through the limiter (moto on loopback; "
        f"Fargate's published rates: {burst_size} launches at once, then {rate:g}/s; RunTask 20 calls/s)",
        f"  RunTask calls {r.run_task_calls} (one task each); failed {r.failed}; "
        f"throttled by the endpoint {r.throttled_by_aws}",
        f"  wait from create to its RunTask call: p50 {r.launch_p50_s:.2f}s  p99 {r.launch_p99_s:.2f}s  "
        f"last {r.launch_last_s:.2f}s (Fargate's bucket allows the last at {r.ideal_last_s:.2f}s)",
        f"  create returned (RUNNING in moto): p50 {r.create_p50_s:.2f}s  p99 {r.create_p99_s:.2f}s",
        f"  earliest launch ahead of Fargate's bucket: {r.earliest_vs_ideal_s:.3f}s (<= 0: none would be throttled)",
        "  tasks launched per second: " + " ".join(str(n) for n in r.per_second),
    ]
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    e = sub.add_parser("ecs-burst", help="1,000 creates at once through the ECS backend's limiter against a "
                                         "local moto server; prints the launch schedule vs Fargate's rates")
    e.add_argument("--count", type=int, default=1000, help="creates at once (default 1000)")
    e.add_argument("--launch-rate", type=float, default=20.0, help="Fargate launches per second (default 20)")
    e.add_argument("--launch-burst", type=int, default=100, help="Fargate launch bucket size (default 100)")
    e.add_argument("--placement", choices=("FARGATE", "FARGATE_SPOT"), default="FARGATE")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.set_defaults(func=cmd_ecs_burst)


def cmd_ecs_burst(args: argparse.Namespace) -> int:
    from sandhub import logs

    logs.configure(level="warning")
    try:
        import moto.server  # noqa: F401  (a dev dependency)
    except ImportError:
        print("sandhub bench ecs-burst needs moto[server]: pip install -e '.[dev,ecs]'")
        return 2
    result = asyncio.run(burst(count=args.count, launch_rate=args.launch_rate, launch_burst=args.launch_burst,
                               placement=args.placement))
    print(json.dumps(asdict(result), indent=2) if args.json else
          text(result, rate=args.launch_rate, burst_size=args.launch_burst))
    return 1 if result.failed or result.earliest_vs_ideal_s > 0.05 else 0
