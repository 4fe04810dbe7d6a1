#!/usr/bin/env bash
# Download official YOLOv5 checkpoints into this folder.
# Usage: bash weights/download_weights.sh [NAME.pt ...]   (default: yolov5n.pt yolov5s.pt)
# Set YQ_WEIGHTS_URL to fetch from a mirror or a file:// folder instead of the v7.0 release.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
if [ "$#" -eq 0 ]; then
  set -- yolov5n.pt yolov5s.pt
fi
exec python -m utils.data.downloads --weights "$@" --dest "$here"
