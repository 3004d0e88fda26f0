#!/usr/bin/env bash
# Optional: nnU-Net v2 for `python -m benchmarks nnunet` and `ka2er`, in its own environment (.venv-nnunet) with
# the CPU torch kept (benchmarks/constraints-cpu.txt). The benchmarks find it there; MOSAICSEG_NNUNET_PYTHON
# overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-nnunet/bin/python ] || "$PY" -m venv .venv-nnunet
.venv-nnunet/bin/pip install -q "torch==${MOSAICSEG_TORCH_VERSION:-2.13.0}"
.venv-nnunet/bin/pip install -q "nnunetv2>=2.5" -c benchmarks/constraints-cpu.txt
# MosaicSeg too: the ka2er study's student trains here, reading an nnU-Net expert (it only adds packages)
.venv-nnunet/bin/pip install -q -e . -c benchmarks/constraints-cpu.txt
.venv-nnunet/bin/python -c "
import torch, nnunetv2, mosaicseg.cli
assert torch.version.cuda is None, f'expected the CPU build of torch, got {torch.__version__}'
print(f'ok: nnunetv2 with torch {torch.__version__} (CPU build) in .venv-nnunet')"
