#!/usr/bin/env bash
# Run the test suite in the project venv (created/updated first):  ./scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
