#!/usr/bin/env bash
# Set-up, done by the README's commands on first use: a virtual environment in .venv with the CPU build of
# PyTorch and MosaicSeg. torch is installed first and pinned, so nothing later can pull a multi-GB CUDA build.
# Idempotent and quick when already done: a stamp of what was installed skips the installs until it changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==${MOSAICSEG_TORCH_VERSION:-2.13.0}"
stamp=$(cat pyproject.toml scripts/setup.sh | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-16)-$TORCH
if [ -x .venv/bin/python ] && [ "$(cat .venv/.mosaicseg-setup 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (first use, or pyproject.toml changed): CPU torch and MosaicSeg ..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q "$TORCH"
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python - <<'PY'
import torch, importlib.metadata as md
cuda_pkgs = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if torch.version.cuda is not None or cuda_pkgs:
    raise SystemExit(f"expected the CPU build of torch, got {torch.__version__} (cuda {torch.version.cuda}), "
                     f"CUDA packages: {cuda_pkgs}")
print(f"ok: torch {torch.__version__} (CPU build), mosaicseg installed in .venv")
PY
echo "$stamp" > .venv/.mosaicseg-setup
