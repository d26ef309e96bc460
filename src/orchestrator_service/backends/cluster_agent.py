"""How the exec agent is delivered into a cluster container (Kubernetes pod, ECS task).

Both clusters do the same: an init container from the agent image (holding
only the static binary, deploy/agent.Dockerfile) runs ``sandhub-agent install``
into a volume shared with the main container; the main container's command
is the agent, listening on the pod's or task's own IP. Its credential is in
the init container's environment only, which writes it to TOKEN_FILE (mode
0600) in the agent's state volume; the agent reads and deletes that file
before it serves, so the token is in no environment of the main container
(/proc/1/environ keeps what a process started with, unsetenv or not). The Hub
reaches it at "<ip>:<port>" and checks its proof
(proto/sandhub/internal/v1/agents.proto), so an address handed on to another
container can't receive this one's calls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from orchestrator_service.model import Port
from sandhub import internal_auth
from sandhub.errors import BackendUnavailable, InvalidField

AGENT_IN_IMAGE = "/sandhub-agent"
"""Where the agent image keeps the binary."""
AGENT_DIR = "/sandhub"
"""The shared volume's mount point in both containers (read-only in the main one)."""
AGENT_PATH = AGENT_DIR + "/sandhub-agent"
STATE_DIR = "/run/sandhub"
"""The agent's state (background processes' output rings): a writable volume
of the container's own, so rings count against its disk."""
TOKEN_FILE = STATE_DIR + "/agent-token"
"""Where the init container leaves the credential for the agent (which deletes it)."""
TOKEN_ENV = "SANDHUB_AGENT_TOKEN"
"""The init container's variable holding the credential (never the main container's)."""
CONTAINER_ID_ENV = "SANDHUB_CONTAINER_ID"
AGENT_ENV = (TOKEN_ENV, CONTAINER_ID_ENV)
"""Variables sandhub sets: never the caller's (the agent hides SANDHUB_* from commands)."""


def install_command(*, owner: int | None = None, directories: Sequence[str] = ()) -> list[str]:
    """The init container's command: the agent copies itself (the image has no
    shell, no cp) and writes TOKEN_ENV's value to TOKEN_FILE. Where the main
    container's writable volumes start root's (ECS bind mounts: root:root
    0755) the init container (root) also makes each of ``directories`` and
    hands it, and the token file, to ``owner``."""
    chown = ["--chown", f"{owner}:{owner}"] if owner is not None else []
    return [AGENT_IN_IMAGE, "install", *chown, "--token-env", TOKEN_ENV, "--token-file", TOKEN_FILE,
            AGENT_PATH, *directories]


def listen_arguments(port: int) -> list[str]:
    """The agent's flags common to every container of an installation."""
    return ["--listen", f"tcp:0.0.0.0:{port}", "--state-dir", STATE_DIR, "--token-file", TOKEN_FILE]


def agent_command(port: int, container_id: str) -> list[str]:
    """The main container's command when it is the agent (a pod's own spec)."""
    return [AGENT_PATH, *listen_arguments(port), "--container-id", container_id]


def init_environment(agent_key: bytes, container_id: str) -> dict[str, str]:
    """The init container's environment: the agent's credential, which opens
    this one container's agent only (an HMAC of its id); whoever may read the
    pod or the task's overrides can see it."""
    return {TOKEN_ENV: internal_auth.agent_token(agent_key, container_id)}


def check_ports(ports: Sequence[Port], agent_port: int) -> None:
    """A container port can't be the agent's: they share the container's address."""
    for i, p in enumerate(ports):
        if p.port == agent_port:
            raise InvalidField(f"ports[{i}].port", f"port {p.port} is the exec agent's in this installation; "
                                                   "choose another")


def tcp_target(ip: str, port: int, container_id: str) -> str:
    """The gRPC target "ip:port" ("[ip]:port" for IPv6) of a container's agent."""
    if not ip:
        raise BackendUnavailable(f"container {container_id} has no IP address yet")
    address = ipaddress.ip_address(ip)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
