"""How the exec agent is delivered into a cluster container (Kubernetes pod, ECS task).

Both clusters do the same: an init container from the agent image (holding
only the static binary, deploy/agent.Dockerfile) runs ``sandhub-agent install``
into a volume shared with the main container; the main container's command
is the agent, listening on the pod's or task's own IP; its credential comes
in the environment. The Hub reaches it at "<ip>:<port>" and checks its proof
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
INSTALL_COMMAND = (AGENT_IN_IMAGE, "install", AGENT_PATH)
"""The init container's command: the agent copies itself (the image has no shell, no cp)."""


def install_command(*, owner: int, directories: Sequence[str]) -> list[str]:
    """The init container's command where the main container's writable
    volumes start root's (ECS bind mounts: root:root 0755): the init container
    (root) also makes each of ``directories`` and hands it to ``owner``."""
    return [AGENT_IN_IMAGE, "install", "--chown", f"{owner}:{owner}", AGENT_PATH, *directories]
STATE_DIR = "/run/sandhub"
"""The agent's state (background processes' output rings): a writable volume
of the container's own, so rings count against its disk."""
TOKEN_ENV = "SANDHUB_AGENT_TOKEN"
CONTAINER_ID_ENV = "SANDHUB_CONTAINER_ID"
AGENT_ENV = (TOKEN_ENV, CONTAINER_ID_ENV)
"""Variables sandhub sets for the agent: never the caller's (the agent unsets
the token at start and hides SANDHUB_* from commands)."""


def listen_arguments(port: int) -> list[str]:
    """The agent's flags common to every container of an installation."""
    return ["--listen", f"tcp:0.0.0.0:{port}", "--state-dir", STATE_DIR]


def agent_command(port: int, container_id: str) -> list[str]:
    """The main container's command when it is the agent (a pod's own spec)."""
    return [AGENT_PATH, *listen_arguments(port), "--container-id", container_id]


def agent_environment(agent_key: bytes, container_id: str) -> dict[str, str]:
    """The agent's credential and the only container id it serves. The token
    opens this one container's agent only (an HMAC of its id); whoever may
    read the pod or task definition overrides can see it."""
    return {TOKEN_ENV: internal_auth.agent_token(agent_key, container_id), CONTAINER_ID_ENV: container_id}


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
