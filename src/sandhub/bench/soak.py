"""`sandhub bench soak`: the chaos run of `make test` (chaos.py), for longer.

The same Hub and Orchestrator processes, clients, SIGKILLs, full state disk
and invariants; then the figures: calls done, errors by code, RSS and open fds
of each service at the start and the end. Exit codes: 0 every invariant held;
1 one broke; 2 usage (not root)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

EXIT_BROKEN = 1
EXIT_USAGE = 2


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value:g}")
    return value


def add_parser(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "soak", help="creates, uploads and execs from several clients while the Hub and the Orchestrator are "
                     "killed with SIGKILL, a full state disk; prints the invariants and figures (root)")
    s.add_argument("--minutes", type=_positive, default=10.0, help="how long the clients work (default 10)")
    s.add_argument("--clients", type=int, default=8, help="concurrent clients, two tenants (default 8)")
    s.add_argument("--kill-every", type=_positive, default=20.0, metavar="SECONDS",
                   help="a SIGKILL every this many seconds, the Orchestrator and the Hub in turn (default 20)")
    s.add_argument("--no-full-disk", action="store_true", help="leave out the full state disk phase")
    s.add_argument("--seed", type=int, default=12)
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    from sandhub import logs
    from sandhub.bench.chaos import ChaosOptions, run_chaos, text, to_json

    if os.geteuid() != 0:
        print("error: the soak creates namespaces, cgroups and a tmpfs: run it as root", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(level="warning")
    options = ChaosOptions(duration_s=args.minutes * 60, clients=max(1, args.clients),
                           kill_every_s=args.kill_every, full_disk=not args.no_full_disk, seed=args.seed)
    result = asyncio.run(run_chaos(options, progress=lambda line: print(line, file=sys.stderr, flush=True)))
    print(json.dumps(to_json(result), indent=2) if args.json else text(result))
    for note in result.notes:
        print(note, file=sys.stderr)
    return 0 if result.held() else EXIT_BROKEN
