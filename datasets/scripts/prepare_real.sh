#!/usr/bin/env bash
# Prepare the workload study's real datasets, from the hub (when reachable) or from
# local files. Usage:
#   datasets/scripts/prepare_real.sh [OUT_DIR] [-- extra prepare options]
# Local files: set DATA_DIR to a folder holding any of
#   alpaca_data.json  ShareGPT_V3_unfiltered_cleaned_split.json  (or sharegpt*.json)
#   cnn_dailymail/*.parquet  databricks-dolly-15k.jsonl
# Datasets whose source is missing are skipped with a message (the hub is tried when
# DATA_DIR is unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$HOME/.cache/kvdedup/venv/bin/python}"
OUT="${1:-${KVDEDUP_CACHE:-$HOME/.cache/kvdedup}/data/workloads}"
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"

prep() {  # prep NAME [FILES...]
  local name="$1" f files=(); shift
  for f in "$@"; do [ -e "$f" ] && files+=("$f"); done
  if [ -n "${DATA_DIR:-}" ]; then
    if [ "${#files[@]}" -eq 0 ]; then echo "skip $name: no local file in $DATA_DIR" >&2; return 0; fi
    "$PY" -m experiments.workloads prepare "$name" --data-files "${files[@]}" --out "$OUT/$name.jsonl" "${EXTRA[@]}" || true
  else
    "$PY" -m experiments.workloads prepare "$name" --out "$OUT/$name.jsonl" "${EXTRA[@]}" || true
  fi
}
EXTRA=("$@")
D="${DATA_DIR:-}"
shopt -s nullglob
prep alpaca        $D/alpaca_data.json
prep sharegpt      $D/ShareGPT_V3_unfiltered_cleaned_split.json $D/sharegpt*.json
prep sharegpt-chat $D/ShareGPT_V3_unfiltered_cleaned_split.json $D/sharegpt*.json
prep cnn_dailymail $D/cnn_dailymail/*.parquet
prep dolly-qa      $D/databricks-dolly-15k.jsonl
