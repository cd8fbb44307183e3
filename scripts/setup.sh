#!/usr/bin/env bash
# Idempotent set-up: creates .venv in the repo root and installs the pinned stack.
# Re-runs are cheap: a stamp file records the hash of requirements.txt + pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.anatomy_vlm_stamp"
WANT="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup] creating/updating $VENV (first run takes about 3-5 minutes)" >&2
start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# 1. torch first, exact versions (a CUDA build that runs on the CPU; see README).
"${PIP[@]}" install -q torch==2.14.1 torchvision==0.29.1
# 2. everything else from the complete lock, without resolving (see requirements.txt header).
"${PIP[@]}" install -q --no-deps -r requirements.txt
# 3. this project, editable.
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)" >&2
