#!/usr/bin/env bash
# README command 1: the main job on the embedded default model (SmolLM2-135M-Instruct).
# Long-input summarization whose documents recur after different instructions, at a KV
# capacity where memory binds: stock vLLM with prefix caching against kvdedup's prefix,
# sequence and shared modes, interleaved (experiments/configs/main.yaml). It prints one
# row per arm (req/s, ratio and paired spread vs vllm-apc, TTFT, peak KV blocks, dedup
# ratio, f), then the quality guard (experiments.quality guard), then writes the report
# with figures and prints where it is. Sets up the venv, model and workload on first use.
# Extra arguments go to `python -m experiments run` (e.g. --out DIR, --reps N).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m vllm_ext.models smollm2 >/dev/null
OUT=results/main
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--out" ] && j=$((i + 1)) && OUT="${!j}"; done
mkdir -p "$OUT/quality"
python -m experiments run main --out "$OUT" "$@" | tee "$OUT/table.txt"
# the guard's engine logs go to a file; its table and verdict to the terminal
if ! flock /tmp/kvdedup-engine.lock python -m experiments.quality guard --out "$OUT/quality" \
        > "$OUT/quality/guard.txt" 2> "$OUT/quality/guard.log"; then
    tail -n 30 "$OUT/quality/guard.log"; echo "quality guard failed (log: $OUT/quality/guard.log)"; exit 1
fi
python -m analysis report "$OUT"
echo; echo "== throughput and memory ($OUT/table.txt)"; grep -v "^main:\|runs now" "$OUT/table.txt"
echo "== quality ($OUT/quality/summary.md)"; grep -A3 "^quality guard" "$OUT/quality/guard.txt"
