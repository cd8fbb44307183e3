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
LOG="$VENV/setup.log"
: > "$LOG"
run() {  # pip's output goes to the log; shown only when a step fails
  if ! "$@" >> "$LOG" 2>&1; then
    echo "[setup] FAILED: $*" >&2
    grep -v "^WARNING: Location" "$LOG" | tail -40 >&2
    exit 1
  fi
}
# 1. torch first, exact versions (a CUDA build that runs on the CPU; see README).
echo "[setup] 1/3 torch" >&2
run "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
# 2. everything else from the complete lock, without resolving (see requirements.txt header).
echo "[setup] 2/3 requirements.txt (--no-deps lock)" >&2
run "${PIP[@]}" install --no-deps -r requirements.txt
# 3. this project, editable.
echo "[setup] 3/3 anatomy-vlm (editable)" >&2
run "${PIP[@]}" install --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)" >&2
