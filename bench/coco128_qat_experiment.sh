#!/usr/bin/env bash
# Float SiLU -> float ReLU fine-tune -> PTQ -> QAT on coco128 (train = val = the same 128 images, as
# upstream's tutorials use it), all at one image size. Writes logs to $OUT; the table goes to notes/.
#   bash bench/coco128_qat_experiment.sh ../shared/weights/yolov5s.pt 320
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-../shared/weights/yolov5s.pt}; IMG=${2:-320}; OUT=${OUT:-runs/coco128_qat}
RELU_EPOCHS=${RELU_EPOCHS:-10}; QAT_EPOCHS=${QAT_EPOCHS:-3}; BATCH=${BATCH:-16}
DATA=${DATA:-$OUT/coco128.yaml}
mkdir -p "$OUT"
if [ ! -f "$DATA" ]; then
  python - "$DATA" <<'PY'
import sys, yaml
from pathlib import Path
src = yaml.safe_load(open("data/coco128.yaml"))
src.pop("download", None)
src["path"] = str(Path("../shared/datasets/coco128").resolve())
Path(sys.argv[1]).write_text(yaml.safe_dump(src, sort_keys=False))
PY
fi
V="python val.py --data $DATA --img $IMG --batch-size 32 --workers 2 --project $OUT --exist-ok"
$V --weights "$W" --name silu > "$OUT/silu.log" 2>&1
python train.py --weights "$W" --act relu --data "$DATA" --hyp data/hyps/hyp.m-relu-tune.yaml --img "$IMG" \
  --epochs "$RELU_EPOCHS" --batch-size "$BATCH" --workers 2 --project "$OUT" --name relu --exist-ok --noplots \
  > "$OUT/relu_train.log" 2>&1
$V --weights "$OUT/relu/weights/best.pt" --name relu_val > "$OUT/relu.log" 2>&1
$V --weights "$OUT/relu/weights/best.pt" --name ptq --ptq --calib-images 128 > "$OUT/ptq.log" 2>&1
python train.py --qat --weights "$OUT/relu/weights/best.pt" --data "$DATA" --img "$IMG" --epochs "$QAT_EPOCHS" \
  --batch-size "$BATCH" --workers 2 --project "$OUT" --name qat --exist-ok --noplots \
  --qat-observer-epochs 1 --qat-freeze-bn-epoch 2 > "$OUT/qat_train.log" 2>&1
$V --weights "$OUT/qat/weights/best.pt" --name qat_val --qat-report > "$OUT/qat.log" 2>&1
for f in silu relu ptq qat; do printf "%-5s " $f; grep -E "^\s+all " "$OUT/$f.log" | tail -1; done
