#!/usr/bin/env bash
# README command 2: set up (or reuse) the environment and run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not engine and not server"` for the fast part).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m vllm_ext.models tiny >/dev/null
python -m vllm_ext.models smollm2 >/dev/null
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
exec python -m pytest -q -p no:cacheprovider "$@"
