"""Offline analysis for kvdedup: redundancy audits and experiment reports.

This package only reads files (workload JSONL, result directories) and writes
figures/reports.  It never starts an inference engine and never imports vllm.

Sub-modules:

* :mod:`analysis.audit`    -- workload reader + KV redundancy audit (no engine)
* :mod:`analysis.simulate` -- step-based model of KV blocks held over time
* :mod:`analysis.results`  -- loading and validating results (schema: experiments.schema)
* :mod:`analysis.figures`  -- matplotlib figures (each with a CSV of its data)
* :mod:`analysis.repeats`  -- online latency of first occurrences vs repeats
* :mod:`analysis.timesplit` -- prefill vs decode step time, sequence-mode bounds
* :mod:`analysis.report`   -- tables, evaluation checklist, Markdown/HTML report

Tables and figures summarize runs with ``experiments.summary`` (one cell per swept key).

Run ``python -m analysis --help`` for the command-line interface.
"""


class AnalysisError(ValueError):
    """Bad input to an analysis command (the CLI prints it and exits 2)."""


__all__ = ["AnalysisError"]
