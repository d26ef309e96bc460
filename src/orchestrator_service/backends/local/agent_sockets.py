"""Where each container's agent listens on the host: a unix socket per container.

The Orchestrator binds and listens on it (root's, in a 0700 directory of
root's: only root, i.e. the Hub on this host, may connect) and hands the open
socket to the sandbox's agent (``--listen fd:N``), so the path itself is never
inside the container and the container can neither remove nor replace it. It
outlives an Orchestrator restart (the agent holds the socket, the file stays
bound), goes away with its container's teardown, and one left by a crash is
removed at the next start.

The sockets live in a directory per state directory, so that Orchestrators
with different state directories (tests, `sandhub bench`) never take each
other's sockets for leftovers. Its base is fixed and short, not under any
configured directory: a unix socket's path holds at most 107 bytes, and a
checkout, state or runtime directory anywhere (pytest's tmp paths) would not
leave room. As root the base is on /run (a tmpfs: a reboot ends every
container too); not root, /tmp, in a directory only our uid owns.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
from pathlib import Path

from sandhub.config import LocalBackendConfig
from sandhub.errors import BackendUnavailable

SUFFIX = ".sock"
MAX_SUN_PATH = 107
"""sockaddr_un's sun_path holds 108 bytes, the last a NUL."""
BACKLOG = 512


ROOT_BASE = Path("/run/sandhub/agents")
"""As root; next to the host-wide uid claims (/run/sandhub/uids)."""


def directory_for(config: LocalBackendConfig, *, root: bool) -> Path:
    """As root, ROOT_BASE/<instance>; not root, one flat directory in /tmp per
    uid and state dir: a shared per-uid parent would be claimed by whichever
    "uid 65534" came first (the host's nobody, or root mapped to 65534 in a
    user namespace), and the other could not create its own inside it."""
    instance = hashlib.sha256(os.fsencode(os.path.abspath(config.state_dir))).hexdigest()[:12]
    return ROOT_BASE / instance if root else Path(f"/tmp/sandhub-agents-{os.geteuid()}-{instance}")


class AgentSockets:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def prepare(self) -> None:
        """Makes the directory (0700, ours) and checks socket paths fit."""
        longest = self.path("cnt-" + "x" * 12)
        if len(os.fsencode(longest)) > MAX_SUN_PATH:
            raise BackendUnavailable(
                f"agent socket paths like {longest} are longer than a unix socket allows "
                f"({MAX_SUN_PATH} bytes)"
            )
        for d in (self._dir.parent, self._dir) if self._dir.parent == ROOT_BASE else (self._dir,):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700, parents=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise BackendUnavailable(f"{d} must be a directory owned by uid {os.geteuid()}")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(d, 0o700)

    def release(self) -> None:
        """Removes the directory if no socket is left in it (an Orchestrator
        stopping with no container alive), so stopped test or bench
        Orchestrators leave nothing behind; one with live containers keeps it."""
        with contextlib.suppress(OSError):
            self._dir.rmdir()

    def path(self, container_id: str) -> Path:
        return self._dir / f"{container_id}{SUFFIX}"

    def target(self, container_id: str) -> str:
        """The gRPC target the Hub dials."""
        return f"unix:{self.path(container_id)}"

    def bind(self, container_id: str) -> socket.socket:
        """A listening socket at the container's path (a stale file there is
        replaced). The caller hands its fd to the agent, then closes it."""
        path = self.path(container_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return sock

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(container_id).unlink()

    def present(self) -> list[str]:
        """Container ids that have a socket file here."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        return [n.removesuffix(SUFFIX) for n in names if n.endswith(SUFFIX)]
