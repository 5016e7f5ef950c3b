"""Where kvdedup keeps what it builds or fetches: ``${KVDEDUP_CACHE:-~/.cache/kvdedup}``.

Layout: ``venv/`` (scripts/env.sh), ``models/`` (``vllm_ext.models``), ``data/``
(stand-in texts, prepared and generated workloads). Defined in the bottom layer so
models, workloads and configs name one root without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root; read from the environment on every call (tests redirect it)."""
    return Path(os.environ.get("KVDEDUP_CACHE", Path.home() / ".cache" / "kvdedup")).expanduser()


def data_root() -> Path:
    """``<cache root>/data``: stand-in sources, prepared and generated workloads."""
    return cache_root() / "data"
