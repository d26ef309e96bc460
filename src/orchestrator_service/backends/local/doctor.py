"""What isolation the local backend can give on this host, and whether a container starts.

`sandhub doctor` prints this; the backend logs the same facts at start
(``local.started``). Every check says what is active and, when something is
missing, what a container loses and how to get it back. The "sandbox" check
starts one real sandbox the way the Orchestrator does (as root: as a
container's unprivileged uid, from the tools' copies in runtime_dir, which
the Orchestrator makes at start anyway) and stops it again; nothing else on
the host is changed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from orchestrator_service.backends.local import cgroups, runtime_tools, sandbox
from orchestrator_service.backends.local.agent_binary import find_agent
from orchestrator_service.backends.local.images import HOST_IMAGE, Images
from sandhub.config import LocalBackendConfig
from sandhub.errors import BackendUnavailable


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _bwrap(config: LocalBackendConfig) -> Check:
    from orchestrator_service.backends.local.backend import find_bwrap

    try:
        return Check("bubblewrap", True, find_bwrap(config.bwrap_path))
    except Exception as e:  # BackendUnavailable with the install hint
        return Check("bubblewrap", False, str(e))


def _busybox(config: LocalBackendConfig) -> Check:
    from orchestrator_service.backends.local.backend import _is_static

    if _is_static(config.busybox_path):
        return Check("busybox", True, f"static busybox {config.busybox_path}, bound into every image")
    return Check("busybox", False, f"{config.busybox_path} is missing or not static: containers have only their "
                 "image's own shell (install busybox-static)")


def _agent(config: LocalBackendConfig) -> Check:
    try:
        path = find_agent(config.agent_path)
    except BackendUnavailable as e:
        return Check("agent", False, f"no container can start: {e}")
    if runtime_tools.elf_links(Path(path)).needed:
        return Check("agent", False, f"{path} is not static: no container can start (build it with `make agent`)")
    return Check("agent", True, f"sandhub-agent {path}, each container's init")


def _sandbox(config: LocalBackendConfig, *, root: bool, seccomp: bool) -> Check:
    """Starts and stops one sandbox of the host image, as the Orchestrator
    would (no cgroups or network: their own checks cover them)."""
    from orchestrator_service.backends.local.backend import _is_static, find_bwrap

    setpriv = (shutil.which("setpriv") or "") if root else ""
    uid = runtime_tools.probe_uid(config) if root else 0
    who = f"container uid {uid}" if root else f"your uid {os.geteuid()}"
    try:
        tools = runtime_tools.prepare(
            config, bwrap=find_bwrap(config.bwrap_path),
            busybox=config.busybox_path if _is_static(config.busybox_path) else "",
            agent=find_agent(config.agent_path), root=root, setpriv=setpriv,
            logger=structlog.wrap_logger(structlog.PrintLogger(sys.stderr)))  # stdout is the report's
        spec = sandbox.SandboxSpec(
            container_id=f"doctor-{secrets.token_hex(4)}", image=Images(config.images_dir).resolve(HOST_IMAGE),
            env={}, disk_mib=16, busybox=tools.busybox, agent=tools.agent, agent_token=secrets.token_hex(32),
            host_uid=uid, seccomp=seccomp, setpriv=setpriv)
        began = time.monotonic()
        # The agent serves on an abstract socket nobody calls: spawn returns
        # once it said it serves.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind("")  # an abstract address of the kernel's choosing
            listener.listen(1)
            proc, started = asyncio.run(sandbox.spawn(tools.bwrap, spec, listen_fd=listener.fileno()))
    except sandbox.SpawnError as e:
        last = e.detail.splitlines()[-1] if e.detail else ""
        return Check("sandbox", False, f"no container can start: {e}{': ' + last if last else ''} (as {who})")
    except Exception as e:  # BackendUnavailable from the tools' check, with what it saw
        return Check("sandbox", False, f"no container can start: {e}")
    took_ms = (time.monotonic() - began) * 1000
    sandbox.kill_tree(started.init_pid, started.init_start_ticks)
    proc.wait(timeout=10)
    return Check("sandbox", True, f"started and stopped one as {who} in {took_ms:.0f} ms ({tools.bwrap})")


def _images(config: LocalBackendConfig) -> Check:
    blocked = runtime_tools.unreachable(config.images_dir)
    if blocked is None:
        return Check("images", True, f"{config.images_dir} reachable by container uids")
    return Check("images", False, f"containers of local images fail to start: container uids cannot pass "
                 f"through {blocked} on the way to {config.images_dir} (set SANDHUB_IMAGES_DIR elsewhere, "
                 f"or chmod o+x {blocked})")


def _seccomp(config: LocalBackendConfig) -> Check:
    if not config.seccomp:
        return Check("seccomp", False, "turned off by configuration")
    try:
        from orchestrator_service.backends.local.seccomp import build_filter

        build_filter()
    except Exception as e:
        return Check("seccomp", False, f"no filter for this machine: {e}")
    return Check("seccomp", True, "deny-list filter (module loading, mount, ptrace, keyctl, bpf, ...)")


def _tool(name: str, package: str, what: str) -> Check:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found:
        return Check(name, True, found)
    return Check(name, False, f"missing: {what} (install {package})")


def _favordynmods(config: LocalBackendConfig) -> Check:
    """A speed-up, not isolation: ok when it is on or the Orchestrator will turn it on."""
    wait = "every container start and every command entering one waits for an RCU grace period (8-13 ms)"
    on, _ = cgroups.favordynmods_state()
    if on is None:
        return Check("favordynmods", False, f"not in this kernel (needs Linux 6.0+): {wait}")
    if on:
        return Check("favordynmods", True, "on: moving a process into a container's cgroups does not wait")
    if config.favor_dynmods:
        return Check("favordynmods", True, "off now; the Orchestrator turns it on at start (host-wide, until reboot; "
                     "SANDHUB_FAVOR_DYNMODS=false leaves it off)")
    return Check("favordynmods", False, f"off (SANDHUB_FAVOR_DYNMODS=false): {wait}")


def run_checks(config: LocalBackendConfig) -> list[Check]:
    root = os.geteuid() == 0
    checks = [
        Check("root", root, "running as root" if root else
              "not root: containers share your uid, and cgroup limits and networking are off"),
        _bwrap(config),
        _busybox(config),
        _agent(config),
        seccomp := _seccomp(config),
        _sandbox(config, root=root, seccomp=seccomp.ok),
    ]
    if root:
        checks.append(_images(config))
    version = cgroups.detect() if root else ""
    checks.append(Check("cgroups", bool(version), f"{version}: cpu, memory and pids limits enforced" if version
                        else "none usable: cpu, memory and pids limits are NOT enforced"))
    if root and version:
        checks.append(_favordynmods(config))
    if root:
        checks.append(_tool("setpriv", "util-linux", "containers would share one uid"))
    if config.network and root:
        checks.append(_tool("ip", "iproute2", "containers get no address"))
        checks.append(_tool("nft", "nftables", "containers get no address (no firewall, no network)"))
    elif not config.network:
        checks.append(Check("network", False, "turned off by configuration: containers have only loopback"))
    return checks
