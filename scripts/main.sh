#!/usr/bin/env bash
# README command 1: the main job on the embedded default model (SmolLM2-135M-Instruct):
# a quick, interleaved A/B of stock vLLM (APC off, APC on) against kvdedup's prefix mode
# on a shared-template workload, printing arm, req/s, tok/s, peak blocks, hit rate and
# the ratio vs vllm-apc. Sets up the venv, model and workload on first use.
# Extra arguments go to `python -m experiments run` (e.g. --out DIR, --arms ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m vllm_ext.models smollm2 >/dev/null
exec python -m experiments run quick "$@"
