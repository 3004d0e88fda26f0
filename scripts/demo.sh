#!/usr/bin/env bash
# The README's main job: set up .venv on first use, then the demo on the embedded synthetic collection
# (synthetic 2D collection → plan → train the universal model → predict held-out cases → evaluate → Dice table).
# Extra arguments go to `mosaicseg demo` (e.g. --dim 3, --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mosaicseg demo "$@"
