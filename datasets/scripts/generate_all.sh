#!/usr/bin/env bash
# Generate the five redundancy workloads with their defaults (a few hundred requests
# each, seed 0) from the stand-in texts. Usage:
#   datasets/scripts/generate_all.sh [OUT_DIR] [-- extra generate options, e.g. --tokenizer DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$HOME/.cache/kvdedup/venv/bin/python}"
OUT="${1:-${KVDEDUP_CACHE:-$HOME/.cache/kvdedup}/data/workloads}"
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
for kind in shared-template multi-instruction multi-document syndication multi-turn; do
  "$PY" -m experiments.workloads generate "$kind" --out "$OUT/gen-$kind.jsonl" "$@"
done
