#!/usr/bin/env bash
# The project's main job, offline, on a fresh machine in about ten minutes (2 CPU cores):
# install; generate the synthetic dataset; train a tiny ReLU model from scratch; run power-of-2
# INT8 QAT from it; export the QAT model to a QDQ ONNX file; print float vs QAT mAP.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${OUT:-runs/main}
IMG=${IMG:-192}
FLOAT_EPOCHS=${FLOAT_EPOCHS:-60}
QAT_EPOCHS=${QAT_EPOCHS:-3}
DATA=datasets/synthetic/synthetic.yaml
"$PY" -m utils.data.synthetic --out datasets/synthetic --n-train 512 --n-val 64 --img-size 256
"$PY" train.py --data "$DATA" --cfg yolov5p.yaml --weights '' --act relu --img "$IMG" \
  --epochs "$FLOAT_EPOCHS" --batch-size 32 --workers 2 --project "$OUT" --name float --exist-ok --noplots --noval
"$PY" train.py --qat --weights "$OUT/float/weights/best.pt" --data "$DATA" --img "$IMG" \
  --epochs "$QAT_EPOCHS" --batch-size 32 --workers 2 --project "$OUT" --name qat --exist-ok --noplots
"$PY" export.py --weights "$OUT/qat/weights/best.pt" --img "$IMG" --include onnx
"$PY" scripts/summary.py --data "$DATA" --img "$IMG" --float "$OUT/float/weights/best.pt" \
  --qat "$OUT/qat/weights/best.pt" --onnx "$OUT/qat/weights/best.onnx" --project "$OUT"
