"""Imports go downward (dedup <- vllm_ext <- experiments <- analysis), and the engine-free
modules load neither vLLM nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("dedup", "vllm_ext", "experiments", "analysis")
# Files allowed to import vLLM outside vllm_ext, and why.
VLLM_OUTSIDE_VLLM_EXT = {
    "dedup/bench.py": "times vLLM's own block hasher against kvdedup's (benchmark only)",
    "experiments/sequence_quality.py": "builds engines for teacher-forced quality "
                                       "(vLLM's SamplingParams)",
    "experiments/quality/engine.py": "the quality evaluation's engine arms (vLLM's "
                                     "SamplingParams)",
    "experiments/quality/hfsim.py": "simulates reuse on the HF model (torch) to attribute "
                                    "its error per layer and token",
    "experiments/quality/simrun.py": "runs the simulator (torch)",
    "experiments/kernel_bench.py": "times kvdedup's attention kernel against vLLM's CPU "
                                   "kernel (benchmark only)",
    "experiments/vllm_bench.py": "runs vLLM's own serving benchmark (vllm.benchmarks)",
    "experiments/bench_agreement.py": "compares kvdedup's client with vllm.benchmarks",
    "experiments/online.py": "optionally sends requests with vLLM's benchmark request "
                             "function (request_func='vllm', imported lazily)",
}
ENGINE_FREE = (
    "dedup", "dedup.hashing", "dedup.index", "dedup.planner", "dedup.ledger", "dedup.paths",
    "vllm_ext", "vllm_ext.tenant", "vllm_ext.sequence", "vllm_ext.shared", "vllm_ext.metrics",
    "vllm_ext.contract", "vllm_ext.version", "vllm_ext.launch", "vllm_ext.cli",
    "vllm_ext.models", "experiments.schema", "experiments.summary", "experiments.config",
    "experiments.runner", "experiments.workloads", "experiments.workloads.cli",
    "analysis.results", "analysis.timesplit", "analysis.report", "analysis.__main__",
)


def _imports(path: Path) -> set[str]:
    """Top-level package of every import in ``path`` (function-level ones included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_imports_go_downward():
    wrong = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((REPO / layer).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            names = _imports(path)
            wrong += [f"{rel} imports {up}" for up in LAYERS[rank + 1:] if up in names]
            if layer != "vllm_ext" and {"vllm", "torch"} & names \
                    and rel not in VLLM_OUTSIDE_VLLM_EXT:
                wrong.append(f"{rel} imports {sorted({'vllm', 'torch'} & names)}")
    assert not wrong, "\n".join(wrong)


def test_engine_free_modules_load_neither_vllm_nor_torch():
    """In a fresh interpreter (other tests' imports would hide an offender), import each
    module in layer order and name the first one after which vLLM or torch is loaded."""
    code = (
        "import importlib, sys\n"
        f"for m in {ENGINE_FREE!r}:\n"
        "    importlib.import_module(m)\n"
        "    bad = [x for x in ('vllm', 'torch') if x in sys.modules]\n"
        "    if bad:\n"
        "        sys.exit(f'{m} loads {bad}')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
