"""What an image name means on the local backend.

- "host": the host's own root filesystem, read-only, limited to the system
  directories (/usr, /etc, /opt and the /bin, /lib... links); nothing of /root,
  /home, /var or the sandhub state is visible, and /etc/shadow is masked.
- any other NAME: the directory IMAGES_DIR/NAME (a root filesystem, e.g. from
  `docker export` unpacked there), read-only. Names are [a-z0-9][a-z0-9._-]*.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sandhub.errors import UnknownImage

HOST_IMAGE = "host"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HOST_DIRS = ("usr", "etc", "opt", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
NEVER_BOUND = frozenset({"proc", "sys", "dev", "tmp", "run", "work", ".sandhub"})
MASKED_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "dir", "file", "symlink"
    target: str = ""


@dataclass(frozen=True)
class Image:
    name: str
    root: Path
    entries: tuple[Entry, ...]
    masked: tuple[str, ...] = ()


def _entries(root: Path, names: list[str] | None) -> tuple[Entry, ...]:
    found = []
    for name in sorted(names if names is not None else os.listdir(root)):
        if name in NEVER_BOUND:
            continue
        path = root / name
        if path.is_symlink():
            found.append(Entry(name, "symlink", os.readlink(path)))
        elif path.is_dir():
            found.append(Entry(name, "dir"))
        elif path.is_file():
            found.append(Entry(name, "file"))
    return tuple(found)


class Images:
    """Resolves names to root filesystems; caches the top-level listing."""

    def __init__(self, images_dir: Path) -> None:
        self._dir = images_dir
        self._cache: dict[str, Image] = {}

    def resolve(self, name: str) -> Image:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if name == HOST_IMAGE:
            image = Image(name, Path("/"), _entries(Path("/"), list(HOST_DIRS)), MASKED_FILES)
        else:
            root = self._dir / name
            if not _NAME.match(name) or not root.is_dir():
                raise UnknownImage(name, f"; local images are {self.names()} (directories in {self._dir})")
            image = Image(name, root, _entries(root, None))
        self._cache[name] = image
        return image

    def names(self) -> list[str]:
        names = [HOST_IMAGE]
        if self._dir.is_dir():
            names += sorted(p.name for p in self._dir.iterdir() if p.is_dir() and _NAME.match(p.name))
        return names
