"""Print the main job's result: float vs QAT mAP on the same data, and where the files are.

    python scripts/summary.py --data data/synthetic.yaml --img 192 --float F.pt --qat Q.pt [--onnx Q.onnx]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import val
    from utils.log import setup_logging

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--img", type=int, required=True)
    p.add_argument("--float", dest="float_pt", required=True)
    p.add_argument("--qat", dest="qat_pt", required=True)
    p.add_argument("--onnx", default=None)
    p.add_argument("--project", default="runs/main")
    opt = p.parse_args()
    setup_logging(verbose=False)
    rows = []
    for label, weights in (("float", opt.float_pt), ("QAT int8", opt.qat_pt), ("QAT int8 ONNX (QDQ)", opt.onnx)):
        if weights and Path(weights).is_file():
            (mp, mr, map50, map5095, *_), _, _ = val.run(data=opt.data, weights=weights, imgsz=opt.img,
                                                           batch_size=32, workers=2, plots=False,
                                                           project=opt.project, name="summary", exist_ok=True)
            rows.append((label, map50, map5095, weights))
    print("\n%-22s %8s %9s  %s" % ("model", "mAP50", "mAP50-95", "file"))
    for label, m50, m, f in rows:
        print("%-22s %8.3f %9.3f  %s" % (label, m50, m, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
