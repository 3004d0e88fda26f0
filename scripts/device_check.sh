#!/usr/bin/env bash
# Every stage of MosaicSeg on one CUDA GPU, in one short run: the checks that CPU CI cannot make.
#
#   bash scripts/device_check.sh [OUT_DIR] [ITERATIONS]
#
# On the synthetic 3D collection: synth → plan → train every recipe on CUDA under `--precision auto` (fp16
# autocast + loss scaling) → stop and resume → predict (tiles under autocast) → evaluate; then fine-tune,
# extend, priors, ASAP adaptation, a KA²ER student from two experts, and DDP through torchrun with NCCL
# (one rank per GPU). Each step's exit status and time go to OUT_DIR/steps.tsv and its output to
# OUT_DIR/log.txt; a failing step does not stop the others (the point is to see every failure in one run).
# Python: `python3` (set PY to use another). Wheels the machine lacks: put them in .whl/ (see
# /work/.library/device/README.md) and, where they are missing, they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-work/device_check}
its=${2:-120}
PY=${PY:-python3}
dev=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script on a CPU machine
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: experts.yaml names runs by path
log=$out/log.txt
: >"$log"
printf 'step\trc\tseconds\n' >"$out/steps.tsv"
if ! $PY -c "import monai, nibabel, SimpleITK, cc3d" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
ms() { $PY -m mosaicseg.cli "$@"; }
step() {  # step NAME COMMAND...: run, record rc and seconds, keep going
  local name=$1 t0 rc
  shift
  # ONLY="NAME ...": run just these steps (a re-check after a fix; name the steps they need too)
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name: $*" >>"$log"
  t0=$(date +%s%N)
  "$@" >>"$log" 2>&1
  rc=$?
  printf '%s\t%s\t%d.%d\n' "$name" "$rc" $((($(date +%s%N) - t0) / 1000000000)) $((($(date +%s%N) - t0) / 100000000 % 10)) | tee -a "$out/steps.tsv"
}
w=${WORK:-$out/w}  # runs and data; WORK=/tmp/... keeps them out of OUT_DIR
rm -rf "$w"
step env $PY -c "import torch, monai; print(torch.__version__, monai.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
step synth ms synth "$w/raw" --dim 3 --seed 0
step plan ms plan "$w/raw/collection.yaml" -o "$w/wd"
common=(--fold 0 --device "$dev" --precision auto --iterations "$its" --iterations-per-epoch 40 --seed 0)
for recipe in universal dodnet uniseg multidecoder; do
  step "train_$recipe" ms train "$w/wd" --recipe "$recipe" "${common[@]}" -o "$w/runs/$recipe"
done
# hermes without SynthMulti, which extend then adds
step train_hermes ms train "$w/wd" --recipe hermes --datasets Dataset901_SynthCT --datasets Dataset902_SynthMR \
  "${common[@]}" -o "$w/runs/hermes"
# clip needs per-task text embeddings: a fixed random file, one row per task of the vocabulary
step clip_embeddings $PY -c "
import json, numpy as np, sys
v = json.load(open('$w/wd/vocabulary.json'))
n = len(v['tasks'])
np.save('$w/emb.npy', np.random.default_rng(0).standard_normal((n, 64)).astype('float32'))"
step train_clip ms train "$w/wd" --recipe clip --task-embeddings "$w/emb.npy" "${common[@]}" -o "$w/runs/clip"
step train_single ms train "$w/wd" --recipe single --dataset Dataset901_SynthCT "${common[@]}" -o "$w/runs/single"
step train_single_mr ms train "$w/wd" --recipe single --dataset Dataset902_SynthMR --patch-size 48,48,16 "${common[@]}" \
  -o "$w/runs/single_mr"
# Ctrl-C after the first epoch (SIGINT saves checkpoint_latest.pt), then --resume to the end
interrupt() {
  $PY -m mosaicseg.cli train "$w/wd" --fold 0 --device "$dev" --precision auto --iterations "$its" \
    --iterations-per-epoch 40 --seed 0 -o "$w/runs/resumed" &
  local pid=$! n=0
  until [ -s "$w/runs/resumed/metrics.jsonl" ] || ! kill -0 $pid 2>/dev/null || [ $n -ge 600 ]; do
    sleep 0.2; n=$((n + 1))
  done
  kill -INT $pid 2>/dev/null
  wait $pid
  echo "interrupted after: $(wc -l <"$w/runs/resumed/metrics.jsonl") metrics line(s)"
}
step train_interrupted interrupt
step train_resume ms train "$w/wd" --fold 0 --device "$dev" --precision auto --iterations "$its" \
  --iterations-per-epoch 40 --seed 0 --resume -o "$w/runs/resumed"
step predict ms predict -m "$w/runs/universal" -i "$w/raw/Dataset901_SynthCT/imagesTr" -o "$w/pred" \
  --dataset Dataset901_SynthCT --device "$dev"
step evaluate ms evaluate "$w/pred" "$w/raw/Dataset901_SynthCT/labelsTr" \
  --dataset-json "$w/raw/Dataset901_SynthCT/dataset.json"
step predict_hermes_all ms predict -m "$w/runs/hermes" -i "$w/raw/Dataset902_SynthMR/imagesTr" -o "$w/pred_h" \
  --dataset Dataset902_SynthMR --tasks all --device "$dev"
step predict_dodnet_all ms predict -m "$w/runs/dodnet" -i "$w/raw/Dataset902_SynthMR/imagesTr" -o "$w/pred_d" \
  --dataset Dataset902_SynthMR --tasks all --device "$dev"
step finetune ms finetune "$w/runs/universal" --dataset "$w/raw/Dataset903_SynthMulti" -w "$w/ft_wd" \
  --device "$dev" --iterations 60 --iterations-per-epoch 20 --head-epochs 1 --warmup-epochs 1 -o "$w/runs/ft"
step extend ms extend "$w/runs/hermes" --dataset "$w/raw/Dataset903_SynthMulti" -w "$w/ext_wd" \
  --device "$dev" --iterations 40 --iterations-per-epoch 20 -o "$w/runs/ext"
step priors ms priors "$w/runs/hermes" -o "$out/priors"
step adapt_asap ms adapt --source "$w/runs/universal" --target "$w/raw/Dataset902_SynthMR" --shots 2 \
  --aux "$w/raw/Dataset901_SynthCT" --aux "$w/raw/Dataset903_SynthMulti" --aux-split-by-label --strategy asap \
  --turns 30 --folds 1 --device "$dev" -w "$w/adapt_wd" -o "$w/runs/asap"
cat >"$w/experts.yaml" <<EOF
subtasks: {ct: {dataset: Dataset901_SynthCT}, mr: {dataset: Dataset902_SynthMR}}
experts: {ct: {run: $w/runs/single}, mr: {run: $w/runs/single_mr}}
external: {run: $w/runs/universal}
EOF
step train_ka2er ms train "$w/wd" --recipe ka2er --recipe-option "experts=\"$w/experts.yaml\"" \
  --datasets Dataset901_SynthCT --datasets Dataset902_SynthMR "${common[@]}" -o "$w/runs/ka2er"
step predict_ka2er_oracle ms predict -m "$w/runs/ka2er" -i "$w/raw/Dataset901_SynthCT/imagesTr" -o "$w/pred_k" \
  --dataset Dataset901_SynthCT --oracle-boxes "$w/raw/Dataset901_SynthCT/labelsTr" --device "$dev"
# NCCL: one rank per GPU (two ranks on one GPU is refused by NCCL); exercises the all-reduced batch Dice and DDP
ngpu=$($PY -c "import torch; print(torch.cuda.device_count() or 2)")  # on a CPU dry run: 2 gloo ranks
step torchrun_nccl $PY -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m mosaicseg.cli train \
  "$w/wd" --fold 0 --device auto --precision auto --iterations 40 --iterations-per-epoch 20 --seed 0 \
  -o "$w/runs/ddp"
# the suite's CUDA tests (skipped on a CPU machine)
step pytest_cuda $PY -m pytest -q -p no:cacheprovider tests/test_adapt.py -k cuda
cp "$w"/runs/universal/metrics.jsonl "$out/universal_metrics.jsonl" 2>/dev/null
# seconds per training iteration of each run (epoch time / iterations per epoch, validation excluded)
$PY - "$w/runs" <<'EOF2' | tee "$out/speed.tsv"
import json, sys
from pathlib import Path
print("run\tdevice\tprecision\ts_per_it\tlast_val_mean")
for m in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
    cfg = json.loads((m.parent / "config.json").read_text())
    cfg = cfg.get("train_config", cfg)
    ipe = cfg.get("iterations_per_epoch") or 1
    t = [r["epoch_time_s"] / ipe for r in rows if "epoch_time_s" in r]
    val = [v for v in rows[-1].get("val_dice", {}).values() if v is not None] if rows else []
    print(f"{m.parent.name}\t{cfg.get('device')}\t{ {None: 'auto', True: 'mixed', False: 'fp32'}[cfg.get('amp')]}\t"
          f"{min(t) if t else float('nan'):.3f}\t{sum(val) / len(val) if val else float('nan'):.3f}")
EOF2
echo "failed steps:"; awk -F'\t' 'NR > 1 && $2 != 0 {print "  " $1 " (rc " $2 ")"}' "$out/steps.tsv"
