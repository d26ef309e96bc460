"""`sandhub bench spawn` and `sandhub bench floor`: arguments in, report out.

Exit codes: 0 every step of every container succeeded and nothing was left
behind; 1 any failure or leftover; 2 usage; 6 the target could not be reached;
130 interrupted (after cleaning up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from sandhub.bench.results import Results
from sandhub.bench.signals import until_signalled
from sandhub.bench.scenarios import SCENARIOS, ScenarioOptions
from sandhub.bench.spawn import RunOptions, run
from sandhub.bench.target import CreateParams, FileToPut, Target, TargetError
from sandhub.bench.webapp import SERVERS

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 6
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value:g}")
    return value


def add_parser(subparsers: Any) -> None:
    """Adds `bench` with its sub-commands to the `sandhub` parser."""
    from sandhub.cli.main import parse_duration

    env = os.environ
    bench = subparsers.add_parser("bench", help="measure container creation, `ls /` and first HTTP 200")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", type=_positive_int, default=20, help="containers (default 20)")
    common.add_argument("--interval", type=_non_negative_float, default=0.1,
                        help="seconds between two creates, open loop: 0.1 is 'burst', 1 'gradual' (default 0.1)")
    common.add_argument("--cpu", type=int, default=0, help="millicores (default: the service's default)")
    common.add_argument("--mem", type=int, default=0, help="MiB (default: the service's default)")
    common.add_argument("--image", default="", help="image (default: the service's default)")
    common.add_argument("--scenario", choices=sorted(SCENARIOS), default="create",
                        help="create: create only; basic: create, then `ls /` --runs times; "
                             "webserver: create, upload and start a web app, wait for HTTP 200")
    common.add_argument("--runs", type=_positive_int, default=10, help="`ls /` runs per container (basic)")
    common.add_argument("--web-server", choices=SERVERS, default="python", help="web app of the webserver scenario")
    common.add_argument("--ready-timeout", type=parse_duration, default=30.0, help="wait for HTTP 200 (default 30s)")
    common.add_argument("--concurrency-cap", type=_positive_int, default=1024,
                        help="containers in progress at once (default 1024: effectively open loop)")
    common.add_argument("--memory-reserve", type=int, default=2048, metavar="MIB",
                        help="ask for no container while the host's MemAvailable is below this (default 2048; "
                             "0 turns the check off); each is then a failed create")
    common.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    common.add_argument("--compare", type=Path, metavar="FILE",
                        help="a previous run's --json output: print this run's p50/p99 ratios against it")
    common.add_argument("--log-level", default=env.get("SANDHUB_LOG_LEVEL", "warning"),
                        help="of in-process services (default warning)")

    s = sub.add_parser("spawn", parents=[common], help="create containers through the Hub on a schedule and measure")
    s.add_argument("--hub", default=env.get("SANDHUB_HUB", "127.0.0.1:50051"), help="Hub address [SANDHUB_HUB]")
    s.add_argument("--api-key", default=env.get("SANDHUB_API_KEY", "dev-key"), help="[SANDHUB_API_KEY] default dev-key")
    s.add_argument("--timeout", type=parse_duration, default=60.0, help="per call (default 60s)")
    s.add_argument("--start-local", action="store_true",
                   help="start a Hub and an Orchestrator (local backend, temp state) in this process "
                        "on loopback and measure those: no server needed")
    s.add_argument("--files", nargs="+", action="extend", default=[], metavar="PATH",
                   help="local files put into each container's work directory after it is created")
    s.add_argument("--keep", action="store_true", help="leave the containers alive and print their ids")
    s.set_defaults(func=cmd_spawn)

    f = sub.add_parser("floor", parents=[common],
                       help="the same sandboxes created by the local backend directly, without gRPC or the Hub")
    f.set_defaults(func=cmd_floor)

    e = sub.add_parser("exec", help="`ls /` through the Hub (relayed to the agent) beside nsenter, and upload "
                                    "MB/s beside plain gRPC, on a Hub and Orchestrator of its own")
    e.add_argument("--runs", type=_positive_int, default=200, help="`ls /` runs per path (default 200)")
    e.add_argument("--upload-mib", type=_positive_int, default=100, help="MiB per transfer (default 100)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_exec)

    r = sub.add_parser("agent-relay", help="`ls /` through the Hub's relay to a sandhub-agent beside the agent "
                                           "directly and a plain subprocess, and upload/download MB/s through it")
    r.add_argument("--runs", type=_positive_int, default=200, help="`ls /` runs per path (default 200)")
    r.add_argument("--upload-mib", type=_positive_int, default=100, help="MiB per transfer (default 100)")
    r.add_argument("--agent", default="", help="the sandhub-agent binary (default $SANDHUB_AGENT)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_agent_relay)

    k = sub.add_parser("k8s-exec", help="`ls /` in a Kubernetes container through the Hub and its agent, "
                                        "on a KWOK control plane of its own (make k8s-tools)")
    k.add_argument("--runs", type=_positive_int, default=200, help="`ls /` runs (default 200)")
    k.add_argument("--agent", default="", help="the sandhub-agent binary (default $SANDHUB_AGENT)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_k8s_exec)

    d = sub.add_parser("docker", parents=[common],
                       help="the same containers through Docker's Engine API, on a dockerd the bench starts itself")
    d.add_argument("--docker-network", choices=("bridge", "none"), default="bridge",
                   help="a bridge of the bench's own (an address per container, like sandhub's) or none")
    d.set_defaults(func=cmd_docker)

    from sandhub.bench import capacity, ecs_burst, fuzz_cli, matrix_cli, soak

    matrix_cli.add_parser(sub)
    capacity.add_parser(sub)
    ecs_burst.add_parser(sub)
    fuzz_cli.add_parser(sub)
    soak.add_parser(sub)


def _read_files(paths: list[str]) -> tuple[FileToPut, ...]:
    files = []
    for p in paths:
        path = Path(p)
        files.append(FileToPut(path.name, path.read_bytes(), path.stat().st_mode & 0o777))
    return tuple(files)


def _options(args: argparse.Namespace, files: tuple[FileToPut, ...]) -> tuple[ScenarioOptions, RunOptions]:
    create = CreateParams(image=args.image, cpu_millicores=args.cpu, memory_mib=args.mem)
    scenario = ScenarioOptions(create=create, files=files, runs=args.runs, web_server=args.web_server,
                               ready_timeout_s=args.ready_timeout, memory_reserve_mib=args.memory_reserve)
    run_options = RunOptions(n=args.n, interval_s=args.interval, concurrency_cap=args.concurrency_cap,
                             keep=getattr(args, "keep", False))
    return scenario, run_options


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "n": args.n, "interval_s": args.interval, "cpu_millicores": args.cpu, "memory_mib": args.mem,
        "image": args.image, "files": list(getattr(args, "files", [])), "runs": args.runs,
        "web_server": args.web_server, "concurrency_cap": args.concurrency_cap,
    }


def cmd_spawn(args: argparse.Namespace) -> int:
    if args.keep and args.start_local:
        print("error: --keep needs a Hub that outlives the bench (--hub), not --start-local", file=sys.stderr)
        return EXIT_USAGE
    target: Target
    if args.start_local:
        from sandhub.bench.local import LocalHubTarget

        target = LocalHubTarget(api_key=args.api_key, timeout_s=args.timeout)
    else:
        from sandhub.bench.hub import HubTarget

        target = HubTarget(args.hub, api_key=args.api_key, timeout_s=args.timeout)
    return _measure(args, "spawn", target)


def cmd_exec(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench import exec_bench

    logs.configure(level="warning")
    results = asyncio.run(exec_bench.measure(runs=args.runs, upload_mib=args.upload_mib))
    print(json.dumps(exec_bench.to_json(results), indent=2) if args.json else exec_bench.text(results))
    return EXIT_FAILED if results.failures else 0


def cmd_k8s_exec(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench import k8s_exec_bench

    logs.configure(level="warning")
    results = asyncio.run(k8s_exec_bench.measure(runs=args.runs, agent=args.agent))
    print(json.dumps(k8s_exec_bench.to_json(results), indent=2) if args.json else k8s_exec_bench.text(results))
    return EXIT_FAILED if results.failures else 0


def cmd_agent_relay(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench import agent_relay_bench

    logs.configure(level="warning")
    results = asyncio.run(agent_relay_bench.measure(runs=args.runs, upload_mib=args.upload_mib, agent=args.agent))
    print(json.dumps(agent_relay_bench.to_json(results), indent=2) if args.json else agent_relay_bench.text(results))
    return EXIT_FAILED if results.failures else 0


def cmd_floor(args: argparse.Namespace) -> int:
    from sandhub.bench.floor import FloorTarget

    return _measure(args, "floor", FloorTarget())


def cmd_docker(args: argparse.Namespace) -> int:
    from sandhub.bench.docker import DockerTarget

    return _measure(args, "docker", DockerTarget(network=args.docker_network))


def _measure(args: argparse.Namespace, command: str, target: Target) -> int:
    from sandhub import logs
    from sandhub.bench import host, report
    from sandhub.bench.progress import Progress

    logs.configure(level=args.log_level)
    try:
        files = _read_files(getattr(args, "files", []))
        compare = json.loads(args.compare.read_text()) if args.compare else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    scenario_options, run_options = _options(args, files)
    results = Results(command=command, target=target.name, target_detail="", scenario=args.scenario,
                      params=_params(args), machine=host.machine())
    try:
        asyncio.run(_main(target, args.scenario, scenario_options, run_options, results, Progress(args.n)))
    except TargetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(report.to_json(results), indent=2))
        if compare is not None:
            print("\n".join(report.ratio_text(report.to_json(results), compare)), file=sys.stderr)
    else:
        print(report.text(results, compare=compare))
    if results.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if results.failed else 0


async def _main(target: Target, scenario: str, options: ScenarioOptions, run_options: RunOptions,
                results: Results, progress: Any) -> None:
    await until_signalled(run(target, SCENARIOS[scenario], options, run_options, results, progress=progress))
