"""Importing a local image from a root filesystem tar (`docker export` output).

The archive is unpacked into a temporary directory beside the images and
renamed into place, so a half-imported image is never visible. Its members are
untrusted: no member may be written through a symlink or outside the image
(absolute symlinks are kept as they are, because they resolve inside the
container at run time, but nothing is ever extracted *through* one); device
nodes are skipped (containers get their own /dev); setuid and setgid bits are
dropped (they would mean nothing under no_new_privs anyway).
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from sandhub.errors import InvalidField

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
RESERVED = frozenset({"host"})


class ImportError_(InvalidField):
    def __init__(self, message: str) -> None:
        super().__init__("archive", message)


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile extraction filter: the member as it may be extracted, or None to skip it."""
    name = member.name.lstrip("/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImportError_(f"{member.name}: '..' in a member name")
    if not parts:
        return None
    if member.ischr() or member.isblk() or member.isfifo():
        return None
    # Every directory on the way must resolve inside the image: nothing is
    # written through a symlink an earlier member planted.
    parent = os.path.realpath(os.path.join(dest, *parts[:-1]))
    if parent != dest and not parent.startswith(dest + os.sep):
        raise ImportError_(f"{member.name}: would be written outside the image through a link")
    if member.islnk():
        target = os.path.realpath(os.path.join(dest, member.linkname.lstrip("/")))
        if not target.startswith(dest + os.sep):
            raise ImportError_(f"{member.name}: hard link to {member.linkname} outside the image")
    member = member.replace(name="/".join(parts), mode=member.mode & 0o1777 if member.mode is not None else None,
                            deep=False)
    return member


def import_rootfs(images_dir: Path, name: str, archive: Path, *, replace: bool = False) -> Path:
    """Unpacks ``archive`` as image ``name``; returns its directory."""
    if not NAME.match(name) or name in RESERVED:
        raise InvalidField("name", "image names are [a-z0-9][a-z0-9._-]*, and not 'host'")
    final = images_dir / name
    if final.exists() and not replace:
        raise InvalidField("name", f"image {name!r} exists; pass --replace to overwrite it")
    images_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=images_dir))
    try:
        dest = os.path.realpath(staging)
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(staging, filter=lambda m, _path: _safe_member(m, dest))
        except (tarfile.TarError, OSError) as e:
            raise ImportError_(f"cannot unpack {archive}: {e}") from None
        staging.chmod(0o755)
        if final.exists():
            old = final.with_name(f".old-{name}-{os.getpid()}")
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
