"""Finding the sandhub-agent binary every local container runs as its pid 1.

`make` builds it from agent/ into the tools cache, keyed by a hash of its
sources, and exports the path as SANDHUB_AGENT (config: LocalBackendConfig
.agent_path). Outside make (`sandhub serve --dev` from a shell), the newest
build in the tools cache is taken; without one, the error says how to build it.
"""

from __future__ import annotations

import os
from pathlib import Path

from sandhub.errors import BackendUnavailable

HOW_TO_BUILD = ("build it with `make agent` (needs Go; it lands in ~/.cache/sandhub/tools) and set SANDHUB_AGENT "
                "to its path, or run through `make run`, which does both")


def tools_cache() -> Path:
    """The Makefile's TOOLS_CACHE default."""
    return Path.home() / ".cache" / "sandhub" / "tools"


def find_agent(configured: str, *, cache: Path | None = None) -> str:
    """``configured`` when set (it must exist), else the newest build in the
    tools cache; BackendUnavailable naming `make agent` when there is none."""
    cache = cache or tools_cache()
    if configured:
        if not os.access(configured, os.X_OK):
            raise BackendUnavailable(f"SANDHUB_AGENT={configured}: no executable there; {HOW_TO_BUILD}")
        return configured
    builds = [p for p in cache.glob("sandhub-agent-*/sandhub-agent") if os.access(p, os.X_OK)]
    if not builds:
        raise BackendUnavailable(f"sandhub-agent (each container's init) was not found in {cache}; {HOW_TO_BUILD}")
    return str(max(builds, key=lambda p: p.stat().st_mtime))
