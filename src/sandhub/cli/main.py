"""`sandhub`: serve the services, or talk to a Hub without writing grpcurl JSON.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 invalid argument,
5 unauthenticated, 6 unavailable (service down or timed out), 7 quota.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from sandhub import config as cfg
from sandhub.cli.connect import connect
from sandhub.cli.jsonout import print_json
from sandhub.client import ApiError, from_rpc_error

EXIT_CODES = {
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.INVALID_ARGUMENT: 4,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.UNAUTHENTICATED: 5,
    grpc.StatusCode.PERMISSION_DENIED: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 7,
}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h)") from None


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {what} {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


# -- serve ----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from sandhub import logs

    env = dict(os.environ)
    logs.configure(level=args.log_level)
    try:
        orch = cfg.load_orchestrator(env)
        hub = cfg.load_hub(env)
    except cfg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.backend:
        orch = replace(orch, backend=args.backend)
    if args.orchestrator_listen:
        orch = replace(orch, listen=args.orchestrator_listen)
        hub = replace(hub, orchestrator=args.orchestrator_listen)
    if args.hub_listen:
        hub = replace(hub, listen=args.hub_listen)
    if args.tls_cert or args.tls_key:
        hub = replace(hub, tls_cert_file=Path(args.tls_cert) if args.tls_cert else None,
                      tls_key_file=Path(args.tls_key) if args.tls_key else None)
    if args.tls_client_ca:
        hub = replace(hub, tls_client_ca_file=Path(args.tls_client_ca))
    if args.allow_plaintext:
        hub = replace(hub, allow_plaintext=True)
    if args.dev:
        hub = cfg.with_dev_key(hub)
    made_token = ""
    if not args.only and not orch.token:
        # Both in this process: a random token no one else knows (--dev
        # prints it). An operator who calls the Orchestrator configures one.
        from sandhub import internal_auth

        made_token = internal_auth.new_token()
        orch, hub = replace(orch, token=made_token), replace(hub, orchestrator_token=made_token)
    return asyncio.run(_serve(args.only, orch, hub, dev=args.dev, made_token=made_token))


async def _serve(
    only: str, orch: cfg.OrchestratorConfig, hub: cfg.HubConfig, *, dev: bool, made_token: str = ""
) -> int:
    from sandhub import rpc

    stops: list[Callable[[], Any]] = []
    try:
        if only in ("", "orchestrator"):
            from orchestrator_service.server import start_orchestrator

            o = await start_orchestrator(orch)
            stops.insert(0, o.stop)
        if only in ("", "hub"):
            from hub_service.server import start_hub

            h = await start_hub(hub)
            stops.insert(0, h.stop)
            if dev:
                key = next(iter(hub.api_keys))
                tls = hub.tls_cert_file is not None
                print(
                    f"sandhub is serving: Hub {hub.listen} ({'TLS' if tls else 'plaintext'}), "
                    f"Orchestrator {orch.listen}, backend {orch.backend}\n"
                    f"development API key: {key}  (tenant {hub.api_keys[key]})\n"
                    f"try:  SANDHUB_API_KEY={key} .venv/bin/sandhub create --wait"
                    + (" --ca-cert CA.pem\n" if tls else "\n")
                    + f"      grpcurl {'-cacert CA.pem' if tls else '-plaintext'} "
                    f"-H 'authorization: Bearer {key}' {hub.listen} list"
                    + (f"\noperator (every tenant, straight to the Orchestrator):\n"
                       f"      SANDHUB_ORCHESTRATOR_TOKEN={made_token} .venv/bin/sandhub list --orchestrator {orch.listen}"
                       if made_token else ""),
                    file=sys.stderr,
                    flush=True,
                )
    except (ValueError, OSError, cfg.ConfigError) as e:
        for stop in stops:
            await stop()
        print(f"error: {e}", file=sys.stderr)
        return 1
    await rpc.run_until_signalled(stops)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Says which isolation the local backend gives here; exit 1 if any is missing."""
    from orchestrator_service.backends.local.doctor import run_checks

    checks = run_checks(cfg.load_orchestrator(dict(os.environ)).local)
    if args.json:
        print(json.dumps([{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'MISSING'} {c.name:<10} {c.detail}")
        if any(c.name == "sandbox" and not c.ok for c in checks):
            print("\ncontainers do NOT start here: see the sandbox line above", file=sys.stderr)
        elif not all(c.ok for c in checks):
            print("\ncontainers still start, with the isolation above missing", file=sys.stderr)
    return 0 if all(c.ok for c in checks) else 1


def cmd_image(args: argparse.Namespace) -> int:
    """Local images live on the orchestrator's host: run this there."""
    from orchestrator_service.backends.local.images import Images

    local = cfg.load_local(dict(os.environ))
    if args.image_command == "import":
        from pathlib import Path

        from orchestrator_service.backends.local.image_import import import_rootfs
        from sandhub.errors import InvalidField

        try:
            path = import_rootfs(local.images_dir, args.name, Path(args.archive), replace=args.replace)
        except InvalidField as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 4
        print(f"imported {args.name} into {path}")
        return 0
    for name in Images(local.images_dir).names():
        print(name)
    return 0


# -- client verbs -----------------------------------------------------------------


def _print(message: Any, args: argparse.Namespace, human: Callable[[Any], str]) -> None:
    if args.json:
        print_json(json_format.MessageToDict(message))
    else:
        print(human(message))


def _container_line(c: Any) -> str:
    from sandhub.orchestrator.v1 import orchestrator_pb2 as pb

    state = pb.ContainerState.Name(c.state).removeprefix("CONTAINER_STATE_")
    labels = ",".join(f"{k}={v}" for k, v in sorted(c.labels.items()))
    reason = f" ({c.state_reason})" if c.state_reason else ""
    return f"{c.container_id}\t{state}{reason}\t{c.image}\t{c.network.ip_address or '-'}\t{labels or '-'}"


def _container_detail(c: Any) -> str:
    lines = [_container_line(c)]
    if c.ready_time.seconds:
        cct = (c.ready_time.ToNanoseconds() - c.create_time.ToNanoseconds()) / 1e6
        lines.append(f"created in {cct:.1f} ms; expires {c.expire_time.ToDatetime().isoformat()}Z")
    if c.state_message:
        lines.append(c.state_message)
    return "\n".join(lines)


def cmd_create(args: argparse.Namespace) -> int:
    container = connect(args).create_container(
        image=args.image, cpu_millicores=args.cpu, memory_mib=args.mem, pids=args.pids, disk_mib=args.disk,
        env=parse_pairs(args.env, "--env"), labels=parse_pairs(args.label, "--label"), ports=args.port,
        ttl_s=args.ttl, placement=args.placement, request_id=args.request_id, wait_until_running=args.wait,
    )
    _print(container, args, _container_detail)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    _print(connect(args).get_container(args.container_id), args, _container_detail)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = connect(args)
    one_page = bool(args.one_page or args.page_token)
    next_token = ""
    if one_page:
        page = client.list_containers(label_selector=args.selector, state=args.state, page_size=args.page_size,
                                      page_token=args.page_token)
        containers, next_token = list(page.containers), page.next_page_token
    else:
        containers = list(client.iter_containers(label_selector=args.selector, state=args.state,
                                                 page_size=args.page_size))
    if args.json:
        out: dict[str, Any] = {"containers": [json_format.MessageToDict(c) for c in containers]}
        if next_token:
            out["nextPageToken"] = next_token
        print_json(out)
    else:
        for c in containers:
            print(_container_line(c))
        if next_token:
            print(f"next page: --page-token {next_token}", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = connect(args)
    for cid in args.container_ids:
        _print(client.delete_container(cid, grace_period_s=args.grace), args, _container_line)
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    _print(connect(args).extend_container(args.container_id, by_s=args.by), args, _container_detail)
    return 0


# -- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(prog="sandhub", description="sandhub: isolated containers over gRPC")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the Hub and the Orchestrator")
    s.add_argument("--dev", action="store_true", help="add a development API key when none is configured, and print it")
    s.add_argument("--only", choices=["hub", "orchestrator"], default="", help="run just one of the two")
    s.add_argument("--backend", default="", help="local (default), kubernetes or ecs [SANDHUB_BACKEND]")
    s.add_argument("--hub-listen", default="", help="[SANDHUB_HUB_LISTEN] default 127.0.0.1:50051")
    s.add_argument("--orchestrator-listen", default="", help="[SANDHUB_ORCHESTRATOR_LISTEN] default 127.0.0.1:50052")
    s.add_argument("--tls-cert", default="", metavar="FILE", help="Hub: serve TLS with this PEM certificate "
                   "[SANDHUB_HUB_TLS_CERT_FILE]")
    s.add_argument("--tls-key", default="", metavar="FILE", help="its key [SANDHUB_HUB_TLS_KEY_FILE]")
    s.add_argument("--tls-client-ca", default="", metavar="FILE",
                   help="mTLS: require client certificates signed by this CA [SANDHUB_HUB_TLS_CLIENT_CA_FILE]")
    s.add_argument("--allow-plaintext", action="store_true",
                   help="let the Hub listen in plaintext on a non-loopback address [SANDHUB_HUB_ALLOW_PLAINTEXT]")
    s.add_argument("--log-level", default=env.get("SANDHUB_LOG_LEVEL", "info"))
    s.set_defaults(func=cmd_serve)

    dr = sub.add_parser("doctor", help="show which isolation the local backend gives on this host")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_doctor)

    im = sub.add_parser("image", help="local images: list, or import a root filesystem tar (docker export)")
    im_sub = im.add_subparsers(dest="image_command", required=True)
    im_sub.add_parser("list", help="image names a container may ask for").set_defaults(func=cmd_image)
    imp = im_sub.add_parser("import", help="unpack a root filesystem tar as a named image")
    imp.add_argument("name")
    imp.add_argument("archive", help="a .tar (optionally compressed), e.g. from `docker export`")
    imp.add_argument("--replace", action="store_true")
    imp.set_defaults(func=cmd_image)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--hub", default=env.get("SANDHUB_HUB", "127.0.0.1:50051"), help="Hub address [SANDHUB_HUB]")
    client.add_argument("--api-key", default=env.get("SANDHUB_API_KEY", ""), help="[SANDHUB_API_KEY]")
    client.add_argument("--json", action="store_true", help="print JSON (proto3 JSON mapping)")
    client.add_argument("--timeout", type=parse_duration, default=60.0, help="per call (default 60s)")
    client.add_argument("--tls", action="store_true", default=_flag(env.get("SANDHUB_TLS", "")),
                        help="TLS with the system's trusted roots [SANDHUB_TLS=1]")
    client.add_argument("--ca-cert", default=env.get("SANDHUB_CA_CERT_FILE", ""), metavar="FILE",
                        help="TLS, trusting this PEM CA [SANDHUB_CA_CERT_FILE]")
    client.add_argument("--client-cert", default=env.get("SANDHUB_CLIENT_CERT_FILE", ""), metavar="FILE",
                        help="mTLS: this PEM certificate [SANDHUB_CLIENT_CERT_FILE]")
    client.add_argument("--client-key", default=env.get("SANDHUB_CLIENT_KEY_FILE", ""), metavar="FILE",
                        help="mTLS: its key [SANDHUB_CLIENT_KEY_FILE]")
    lifecycle = argparse.ArgumentParser(add_help=False, parents=[client])
    lifecycle.add_argument("--orchestrator", default="", metavar="ADDRESS",
                           help="operator: call this Orchestrator directly (every tenant) with the token from "
                                "SANDHUB_ORCHESTRATOR_TOKEN_FILE or SANDHUB_ORCHESTRATOR_TOKEN, not the Hub")

    c = sub.add_parser("create", parents=[lifecycle], help="create a container")
    c.add_argument("--image", default="")
    c.add_argument("--cpu", type=int, default=0, help="millicores")
    c.add_argument("--mem", type=int, default=0, help="MiB")
    c.add_argument("--pids", type=int, default=0)
    c.add_argument("--disk", type=int, default=0, help="MiB")
    c.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--port", action="append", type=int, default=[])
    c.add_argument("--ttl", type=parse_duration, default=0.0, help="e.g. 1h")
    c.add_argument("--placement", default="")
    c.add_argument("--request-id", default="", help="idempotency key")
    c.add_argument("--wait", action="store_true", help="return once RUNNING")
    c.set_defaults(func=cmd_create)

    g = sub.add_parser("get", parents=[lifecycle], help="show a container")
    g.add_argument("container_id")
    g.set_defaults(func=cmd_get)

    ls = sub.add_parser("list", parents=[lifecycle], help="list containers (all pages)")
    ls.add_argument("-l", "--selector", default="", help="label selector, e.g. app=web,tier!=db")
    ls.add_argument("--state", default="", choices=["", "pending", "running", "terminating", "terminated", "failed"])
    ls.add_argument("--page-size", type=int, default=0)
    ls.add_argument("--page-token", default="")
    ls.add_argument("--one-page", action="store_true", help="print one page and the next token")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("delete", parents=[lifecycle], help="delete containers")
    d.add_argument("container_ids", nargs="+")
    d.add_argument("--grace", type=parse_duration, default=0.0)
    d.set_defaults(func=cmd_delete)

    from sandhub.cli import exec_verbs

    exec_verbs.add_parsers(sub, client)

    e = sub.add_parser("extend", parents=[lifecycle], help="push back a container's expiry")
    e.add_argument("container_id")
    e.add_argument("--by", type=parse_duration, required=True, help="e.g. 30m")
    e.set_defaults(func=cmd_extend)
    from sandhub.bench.cli import add_parser as add_bench_parser
    add_bench_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            return int(args.func(args))
        except grpc.RpcError as e:  # a verb that calls a stub itself (bench)
            raise from_rpc_error(e) from e
    except ApiError as e:
        code = e.code
        print(f"error: {e}", file=sys.stderr)  # message [CODE REASON]
        if e.retry_after_s is not None:
            print(f"hint: retry in {e.retry_after_s:g}s", file=sys.stderr)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            if getattr(args, "orchestrator", ""):
                print("hint: the Orchestrator takes its token, not an API key (SANDHUB_ORCHESTRATOR_TOKEN_FILE)",
                      file=sys.stderr)
            else:
                print("hint: pass --api-key or set SANDHUB_API_KEY", file=sys.stderr)
        elif code is grpc.StatusCode.UNAVAILABLE:
            print(f"hint: is sandhub serving at {getattr(args, 'hub', '?')}? (`make run`) Does it serve TLS "
                  "(--ca-cert, --tls) or plaintext?", file=sys.stderr)
        return EXIT_CODES.get(code, 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
