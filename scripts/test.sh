#!/usr/bin/env bash
# The README's test command: set up .venv on first use, check that it holds the CPU torch, run the tests.
# Extra arguments go to pytest (e.g. tests/test_losses.py -x). pytest collecting no tests is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "set-up failed"; exit 1; }
# the set-up must have kept the CPU torch (some packages drag a CUDA build in through torchvision)
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None and '+cpu' in torch.__version__ else 1)" \
  || { echo "torch is not the expected CPU build"; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
