"""Where a QAT training step spends its time: torch.profiler's top operators by self time, per phase.

Usage:
    python -m bench.qat_profile --phase qat_observe qat_frozen float --top 15
    python -m bench.qat_profile --phase float qat_observe qat_frozen_observers qat_frozen --steps 4 --faults

Runs the same steps as bench.qat_speed (yolov5n, ReLU, random batch, the trainer's step) and prints,
for each phase asked, the operators with the largest self CPU time summed over ``--steps`` steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import PHASES, _train_variants  # noqa: E402


def profile_phase(variant, steps: int, top: int) -> str:
    """The profiler's table of the ``top`` operators by self CPU time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    variant.setup()
    variant.step()  # one untimed step in the phase (a phase change may rebuild caches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            variant.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


def fault_counts(variant, steps: int) -> dict[str, float]:
    """ms per step, minor page faults per step and system seconds per step of ``steps`` steps (getrusage)."""
    import resource
    import time

    variant.setup()
    variant.step()
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        variant.step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": 1000 * (time.perf_counter() - t0) / steps, "minor_faults": (after.ru_minflt - before.ru_minflt) / steps,
            "system_s": (after.ru_stime - before.ru_stime) / steps}


def run(phase: tuple[str, ...] = ("float", "qat_observe", "qat_frozen"), cfg: str = "yolov5n.yaml",
        act: str = "relu", imgsz: int = 320, batch_size: int = 8, steps: int = 3, top: int = 15,
        qat_config: Optional[str] = None, seed: int = 0, faults: bool = False,
        malloc_default: bool = False, compiled: bool = False) -> dict[str, str]:
    from bench.train_speed import DEFAULT_HYP

    from utils.torch_utils import keep_freed_memory

    if not malloc_default:
        keep_freed_memory(torch.device("cpu"))  # as train.py does on the CPU
    opt = dict(cfg=cfg, act=act, imgsz=imgsz, batch_size=batch_size, warmup=2, compile=compiled,
               hyp=DEFAULT_HYP, qat_config=qat_config, seed=seed)
    eager, under_compile = _train_variants(opt, torch.device("cpu"))
    by_name = {v.name: v for v in (under_compile if compiled else eager)}
    unknown = [p for p in phase if p not in by_name]
    if unknown:
        raise ValueError(f"qat_profile: unknown phase {unknown}; choose from {sorted(by_name)}")
    tables = {}
    for name in phase:
        if faults:
            f = fault_counts(by_name[name], steps)
            tables[name] = f"{name}: {f['ms']:.1f} ms/step, {f['minor_faults']:.0f} minor page faults/step, " \
                           f"{f['system_s']:.3f} system s/step"
            print(tables[name])
            continue
        tables[name] = profile_phase(by_name[name], steps, top)
        how = "torch.compile" if compiled else "eager"
        print(f"\n== {name}: {by_name[name].label}, {how} ({steps} steps, {cfg} {act} {imgsz}px batch {batch_size})")
        print(tables[name])
    return tables


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", nargs="+", default=["float", "qat_observe", "qat_frozen"],
                   help="float or QAT phases: " + ", ".join(PHASES))
    p.add_argument("--cfg", type=str, default="yolov5n.yaml")
    p.add_argument("--act", type=str, default="relu")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per phase")
    p.add_argument("--top", type=int, default=15, help="operators shown per phase")
    p.add_argument("--qat-config", type=str, default=None)
    p.add_argument("--faults", action="store_true", help="count page faults and system time per step instead")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc malloc as it is (train.py keeps freed memory on the CPU: keep_freed_memory)")
    p.add_argument("--compiled", action="store_true", help="profile the torch.compile variants (compiled first)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(**{k: (tuple(v) if k == "phase" else v) for k, v in vars(parse_opt()).items()})
