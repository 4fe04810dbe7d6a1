#!/usr/bin/env bash
# The speed issue's checks in one call on a GPU machine (a few minutes on an H100):
#   1. bench.speed at the issue's settings: yolov5s, 640, batch 64, 8 workers, --cache ram,
#      float (upstream settings vs ours), QAT and val.py at batch 32, through the real trainer;
#   2. bench.train_speed: the model step alone (float and QAT, observers on and frozen) on
#      GPU-resident batches, the loader alone, and their ratios;
#   3. bench.qat_speed: float vs QAT step per QAT phase, eager and torch.compile'd (the QAT speed
#      issue's table; onnxruntime rows left out: the GPU build of onnxruntime is the user's choice).
# Usage: bash bench/gpu_speed.sh [out_dir] [upstream train.py images/s on this machine, for the ratio]
# DEVICE, CFG, IMGSZ, BATCH, IMAGES, WORKERS override the settings (e.g. a CPU smoke run); COMPILE=0
# leaves torch.compile out of step 3 (it takes minutes to compile on a CPU); PYTHON the interpreter
# (default python3).
# Needs torch with CUDA, numpy, opencv-python-headless, PyYAML, tqdm, scipy, matplotlib (the lent GPU
# machines' image has them all); elsewhere without internet, carry missing ones as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench_gpu}"
upstream="${2:-}"
device="${DEVICE:-0}" cfg="${CFG:-yolov5s.yaml}" imgsz="${IMGSZ:-640}" batch="${BATCH:-64}"
images="${IMAGES:-2048}" workers="${WORKERS:-8}" py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
extra=()
if [ -n "$upstream" ]; then extra=(--upstream-images-per-s "$upstream"); fi
"$py" -m bench.speed --cfg "$cfg" --imgsz "$imgsz" --batch-size "$batch" --workers "$workers" --cache ram \
    --epochs 3 --images "$images" --val-images 256 --device "$device" --project "$out/speed_runs" \
    --json "$out/speed.json" "${extra[@]}" 2>&1 | tee "$out/speed.log"
# the loader stage reads the images bench.speed generated
"$py" -m bench.train_speed --cfg "$cfg" --act relu --imgsz "$imgsz" --batch-size "$batch" --steps 20 \
    --workers "$workers" --device "$device" --data "$out/speed_runs/synthetic/synthetic.yaml" --cache ram \
    --json "$out/train_speed.json" 2>&1 | tee "$out/train_speed.log"
compile_flag=()
if [ "${COMPILE:-1}" = "0" ]; then compile_flag=(--no-compile); fi
"$py" -m bench.qat_speed --cfg "$cfg" --imgsz "$imgsz" --batch-size "$batch" --device "$device" --rounds 5 \
    --no-onnx "${compile_flag[@]}" --json "$out/qat_speed.json" 2>&1 | tee "$out/qat_speed.log"
