#!/usr/bin/env bash
# README command 2: set up (or reuse) the environment and run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not engine and not server"` for the fast part).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m vllm_ext.models tiny >/dev/null
python -m vllm_ext.models smollm2 >/dev/null
exec python -m pytest -q -p no:cacheprovider "$@"
