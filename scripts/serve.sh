#!/usr/bin/env bash
# Start the Anatomy-VLM MONAI Label server on the demo studies, on loopback only.
#
#   ./scripts/serve.sh [extra monailabel start_server args, e.g. --conf checkpoint PATH]
#
# Environment (all optional):
#   PORT=8000             server port
#   HOST=127.0.0.1        bind address (0.0.0.0 exposes the server to the network: think first)
#   DEMO_DIR=data/demo    demo data folder (studies in $DEMO_DIR/studies)
#   DEMO_N=200            number of demo studies to build when $DEMO_DIR/manifest.json is absent
#   DEMO_SEED=0           seed of the demo build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

"$ROOT/scripts/setup.sh"

VENV="$ROOT/.venv"
DEMO_DIR="${DEMO_DIR:-data/demo}"
DEMO_N="${DEMO_N:-200}"
DEMO_SEED="${DEMO_SEED:-0}"

if [[ ! -f "$DEMO_DIR/manifest.json" ]]; then
  echo "[serve] building $DEMO_N demo studies in $DEMO_DIR" >&2
  "$VENV/bin/anatomy-vlm" build-demo --out "$DEMO_DIR" --n "$DEMO_N" --seed "$DEMO_SEED"
fi

# .venv/bin/monailabel is a shell script that runs a bare `python -m monailabel.main` (and splits
# its arguments on spaces): run that module with the venv's Python directly, and keep the venv
# first on PATH / in MONAILABEL_PYEXE for anything monailabel starts itself.
export PATH="$VENV/bin:$PATH"
export MONAILABEL_PYEXE="$VENV/bin/python"
exec "$VENV/bin/python" -m monailabel.main start_server \
  --app "$ROOT/apps/anatomy_vlm" \
  --studies "$DEMO_DIR/studies" \
  --host "${HOST:-127.0.0.1}" \
  --port "${PORT:-8000}" \
  "$@"
