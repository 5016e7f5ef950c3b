#!/usr/bin/env bash
# Replay the workload study's prepared pickles (already tokenized with the study's
# tokenizer). Usage:
#   datasets/scripts/replay_pickles.sh NAME PICKLE OUT.jsonl [--max-model-len N ...]
# NAME labels the provenance (alpaca, sharegpt, sharegpt-chat, cnn_dailymail, dolly-qa);
# the format (pairs or chat) is detected.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$HOME/.cache/kvdedup/venv/bin/python}"
[ "$#" -ge 3 ] || { echo "usage: $0 NAME PICKLE OUT.jsonl [prepare options]" >&2; exit 2; }
name="$1" pkl="$2" out="$3"; shift 3
exec "$PY" -m experiments.workloads prepare "$name" --pickle "$pkl" --out "$out" "$@"
