"""QAT through train.py and val.py: checkpoints, power-of-2 scales, shared quantizers, exact
validation and resume, the observer/BN schedule, EMA, per-forward aggregation, PTQ and DDP.

One float ReLU yolov5p is trained for an epoch on a tiny synthetic dataset (64 px, CPU); two
3-epoch QAT runs start from it (one uninterrupted, one cut after epoch 0 and resumed) and most
tests read their checkpoints.
"""
from __future__ import annotations

import logging
import operator
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train
import val
from quant.config import LayerRule, QuantConfig
from quant.fake_quant import Pow2FakeQuantize
from quant.prepare import ACT_QUANT, prepare
from quant.report import quantizer_table
from quant.schedule import iter_quantizers
from utils.data.data_config import load_data_config
from utils.data.dataset import create_dataloader
from utils.data.synthetic import make_synthetic_dataset
from utils.eval.evaluate import EvalOptions, validate
from utils.qat import load_model
from utils.qat import prepare_qat_model
from utils.train.loss import ComputeLoss
from tiny_nets import AddConcatNet

LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
IMGSZ, BATCH, EPOCHS = 64, 8, 3
BASE = dict(imgsz=IMGSZ, batch_size=BATCH, workers=0, device="cpu", noplots=True, seed=1)
QAT = dict(BASE, qat=True, epochs=EPOCHS, qat_observer_epochs=1.0, qat_freeze_bn_epoch=2, save_period=1)
QUANT_BUFFERS = ("exponent", "min_val", "max_val", "mse_err", "num_observed", "observer_enabled", "calibrated")


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qat")


@pytest.fixture(scope="module")
def data_yaml(work) -> Path:
    return make_synthetic_dataset(work / "syn", n_train=16, n_val=8, img_size=128)


@pytest.fixture(scope="module")
def warm_qat_hyp(work) -> str:
    """hyp.qat.yaml with a warmup: with no warmup, 2 batches of 8 per epoch accumulate gradients towards
    upstream's nominal batch of 64 and take no optimizer step in 3 epochs; the warmup ramps accumulation
    from 1, so these short runs train."""
    import yaml

    hyp = yaml.safe_load((REPO / "data" / "hyps" / "hyp.qat.yaml").read_text())
    hyp["warmup_epochs"] = 1.0
    path = work / "hyp.qat_warmup.yaml"
    path.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def float_best(work, data_yaml) -> Path:
    train.run(cfg="yolov5p.yaml", weights="", act="relu", data=str(data_yaml), epochs=1, project=str(work),
              name="float", **BASE)
    return work / "float" / "weights" / "best.pt"


@pytest.fixture(scope="module")
def qat_full(work, data_yaml, float_best, warm_qat_hyp) -> tuple[tuple, Path]:
    """(final results, run folder) of an uninterrupted QAT run with Graphviz output."""
    results = train.run(weights=str(float_best), data=str(data_yaml), project=str(work), name="full",
                        qat_graphs=True, hyp=warm_qat_hyp, **QAT)
    return results, work / "full"


@pytest.fixture(scope="module")
def qat_resumed(work, data_yaml, float_best, warm_qat_hyp) -> Path:
    """The same QAT run, stopped after epoch 0 and resumed from its last.pt; returns its folder."""
    train.run(weights=str(float_best), data=str(data_yaml), project=str(work), name="cut", qat_graphs=True,
              hyp=warm_qat_hyp, _stop_after_epoch=0, **QAT)
    last = work / "cut" / "weights" / "last.pt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    train.run(resume=str(last))
    return work / "cut"


@pytest.fixture()
def fresh_prepared(float_best):
    """A newly prepared (uncalibrated) QAT model from the float checkpoint, in train mode."""
    model, _ = load_model(float_best)
    return prepare_qat_model(model, IMGSZ).train()


# ---------------------------------------------------------------------------------------- helpers
def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_quant_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in QUANT_BUFFERS


def _assert_pow2(model: nn.Module) -> int:
    n = 0
    for name, q in iter_quantizers(model):
        k = q.exponent
        assert torch.equal(k, k.round()), f"{name}: exponent {k} not integral"
        log2 = torch.log2(q.scale().double())
        assert torch.equal(log2, log2.round()), f"{name}: scale {q.scale()} not a power of two"
        n += 1
    return n


def _source_quantizer(root: nn.Module, node) -> nn.Module:
    """The activation quantizer a graph value comes from, looking through max-pool/upsample."""
    while node.op == "call_module" and not str(node.target).startswith(ACT_QUANT + "."):
        module = root.get_submodule(str(node.target))
        assert isinstance(module, (nn.MaxPool2d, nn.Upsample)), f"{node.name}: unquantized {type(module).__name__}"
        node = node.args[0]
    assert node.op == "call_module", f"{node.name}: input is not quantized"
    return root.get_submodule(str(node.target))


def _floats(results) -> list[float]:
    return [float(x) for x in results]


# ---------------------------------------------------------------------------------- run + checkpoint
def test_qat_run_writes_quantized_checkpoints(qat_full):
    _, run = qat_full
    for name in ("last.pt", "best.pt"):
        ckpt = _ckpt(run / "weights" / name)  # weights_only: plain data only
        assert ckpt["quant"]["version"] == 1 and ckpt["quant"]["imgsz"] == IMGSZ
        assert ckpt["quant"]["config"]["leaf_modules"] in (["Detect"], ("Detect",))
        assert any(k.startswith(ACT_QUANT + ".") for k in ckpt["state_dict"])
    assert (run / "quant_report.html").is_file() and (run / "quant_layers.csv").is_file()  # written at the end
    plan = (run / "qat_plan.txt").read_text()
    assert "act_quant.model_2_concat" in plan and "conv+bn+relu" in plan
    for gv in ("before_prepare.gv", "after_prepare.gv"):
        text = (run / "graphs" / gv).read_text()
        assert "digraph" in text and len(text) > 1000
    model, meta = load_model(run / "weights" / "best.pt")
    assert meta["qat"] and not model.training
    assert _assert_pow2(model) > 100
    for name, q in iter_quantizers(model):
        assert int(q.calibrated) == 1, name
        assert int(q.observer_enabled) == 0, f"{name}: observer still on after --qat-observer-epochs 1"


def test_rebuilt_model_shares_quantizer_objects(qat_full):
    model, _ = load_model(qat_full[1] / "weights" / "best.pt")
    cats = adds = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.cat, torch.add, operator.add):
            continue
        if node.target is torch.cat:
            inputs = [_source_quantizer(model, a) for a in node.args[0]]
            (user,) = node.users
            members = inputs + [model.get_submodule(str(user.target))]
            cats += 1
        else:
            members = [_source_quantizer(model, a) for a in node.args[:2]]
            adds += 1
        assert all(m is members[0] for m in members), f"{node.name}: members use different quantizers"
        assert isinstance(members[0], Pow2FakeQuantize)
    assert cats == 13 and adds > 0  # 8 C3 + SPPF + 4 neck concats


def test_val_reproduces_final_training_validation(qat_full, data_yaml, work):
    results, run = qat_full
    best = run / "weights" / "best.pt"
    model, _ = load_model(best)
    loss = ComputeLoss(model, hyp=_ckpt(best)["hyp"])
    again, _, _ = val.run(data=str(data_yaml), weights=str(best), imgsz=IMGSZ, batch_size=2 * BATCH, workers=0,
                          device="cpu", project=str(work / "val"), plots=False, compute_loss=loss)
    assert _floats(again)[:4] == _floats(results)[:4]  # P, R, mAP50, mAP50-95 exactly
    # The losses agree to float32 rounding: training's ComputeLoss reads the anchors of the training model,
    # this one those of the (EMA) checkpoint, which can differ in the last bits.
    assert _floats(again)[4:] == pytest.approx(_floats(results)[4:], rel=1e-5)
    assert all(x > 0 for x in again[4:])  # the losses see every prediction: identical outputs, not just mAP 0


def test_resumed_qat_run_matches_uninterrupted(qat_full, qat_resumed):
    full = _ckpt(qat_full[1] / "weights" / "last.pt")["state_dict"]
    resumed = _ckpt(qat_resumed / "weights" / "last.pt")["state_dict"]
    assert full.keys() == resumed.keys()
    assert sum(_is_quant_key(k) for k in full) > 500
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]


def test_frozen_view_trains_exactly_as_the_full_graph(qat_full, work, data_yaml, float_best, warm_qat_hyp,
                                                     monkeypatch):
    """With observers frozen the trainer runs quant.frozen_view's graph; the same run with the full prepared
    graph in those steps ends with the very same weights, statistics and quantizer state. (In the observed
    steps both run the view, which leaves the joined tensors out of the statistics: tests/quant/test_frozen_view.py.)"""
    from utils.train.forward import TrainingForward

    pick, frozen_steps = TrainingForward.pick, []

    def full_graph_when_frozen(self, observers_frozen: bool = False):
        if observers_frozen:
            frozen_steps.append(1)
            return self.model
        return pick(self, observers_frozen)

    monkeypatch.setattr(TrainingForward, "pick", full_graph_when_frozen)
    train.run(weights=str(float_best), data=str(data_yaml), project=str(work), name="full_graph",
              hyp=warm_qat_hyp, **QAT)
    assert frozen_steps  # the observers froze after epoch 0
    full = _ckpt(qat_full[1] / "weights" / "last.pt")["state_dict"]
    plain = _ckpt(work / "full_graph" / "weights" / "last.pt")["state_dict"]
    assert full.keys() == plain.keys()
    different = [k for k in full if not torch.equal(full[k], plain[k])]
    assert not different, different[:5]


# ---------------------------------------------------------------------------------------- schedule
def test_observers_calibrate_during_epoch_0_only(qat_full, fresh_prepared):
    run = qat_full[1]
    states = [_ckpt(run / "weights" / f"epoch{e}.pt")["train_state_dict"] for e in range(EPOCHS)]
    initial = fresh_prepared.state_dict()
    keys = [k for k in states[0] if _is_quant_key(k) and "observer_enabled" not in k]
    assert keys
    changed = [k for k in keys if k.endswith(".max_val") and not torch.equal(initial[k], states[0][k])]
    assert len(changed) > 100  # every non-fixed quantizer calibrated during epoch 0
    for later in states[1:]:
        moved = [k for k in keys if not torch.equal(states[0][k], later[k])]
        assert not moved, moved[:5]
    weights = [k for k in states[0] if k.endswith("conv.weight")]
    assert any(not torch.equal(states[1][k], states[2][k]) for k in weights)  # training went on


def test_bn_statistics_freeze_from_freeze_epoch(qat_full):
    run = qat_full[1]
    states = [_ckpt(run / "weights" / f"epoch{e}.pt")["train_state_dict"] for e in range(EPOCHS)]
    keys = [k for k in states[0] if ".bn.running_" in k]
    assert len(keys) > 100
    assert any(not torch.equal(states[0][k], states[1][k]) for k in keys)  # epoch 1: still updating
    moved = [k for k in keys if not torch.equal(states[1][k], states[2][k])]  # epoch 2: frozen
    assert not moved, moved[:5]


def test_ema_copies_quantizer_state(qat_full):
    ckpt = _ckpt(qat_full[1] / "weights" / f"epoch{EPOCHS - 1}.pt")
    ema, trained = ckpt["state_dict"], ckpt["train_state_dict"]
    exps = [k for k in ema if k.endswith(".exponent")]
    assert len(exps) > 100
    for k in (k for k in ema if _is_quant_key(k)):
        assert torch.equal(ema[k], trained[k]), k
    assert all(torch.equal(ema[k], ema[k].round()) for k in exps)
    assert any(not torch.equal(ema[k], trained[k]) for k in ema if k.endswith("conv.weight"))  # averaged


def test_validation_never_changes_quantizer_state(fresh_prepared, data_yaml, caplog):
    fresh_prepared(torch.rand(2, 3, IMGSZ, IMGSZ))  # calibrate once so fake quant is active
    before = {k: v.clone() for k, v in fresh_prepared.state_dict().items()}
    loader = create_dataloader(str(Path(data_yaml).parent / "images" / "val"), IMGSZ, 4, 32, rect=True, pad=0.5,
                               workers=0)[0]
    with caplog.at_level(logging.INFO):
        validate(fresh_prepared, loader, load_data_config(data_yaml), EvalOptions(half=False))
        LOGGER.info("\n" + quantizer_table(fresh_prepared, torch.rand(2, 3, IMGSZ, IMGSZ)))
    after = fresh_prepared.state_dict()
    assert all(int(q.observer_enabled) == 1 for _, q in iter_quantizers(fresh_prepared) if not q.fixed)  # on, unused
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert "act_quant.model_2_concat" in caplog.text and "2^" in caplog.text  # the --qat-report table


def test_shared_quantizer_aggregates_each_forward(float_best):
    model, _ = load_model(float_best)
    config = QuantConfig.from_dict({"activation": {"observer": "ema_minmax", "rounding": "round"},
                                    "leaf_modules": ["Detect"]})
    fresh_prepared = prepare_qat_model(model, IMGSZ, config).train()
    q = fresh_prepared.get_submodule(f"{ACT_QUANT}.model_2_concat")
    seen: list[float] = []
    q.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0].detach().max())))
    fresh_prepared(torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0)))
    assert len(seen) == 3 and len(set(seen[:2])) == 2  # add output, cv2 output, concat output
    assert float(q.max_val) == max(seen)
    first = q.max_val.clone()
    seen.clear()
    fresh_prepared(torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1)))
    c = q.spec.averaging_constant
    expected = first + c * (torch.tensor([max(seen)]) - first)  # ONE moving-average step per forward
    torch.testing.assert_close(q.max_val, expected, rtol=0, atol=1e-6)
    assert int(q.exponent) == int(q.exponent.round())


# -------------------------------------------------------------------------------------------- PTQ
def test_ptq_validation_runs_and_reports(float_best, data_yaml, work, caplog, qat_full):
    with caplog.at_level(logging.INFO):
        metrics, maps, _ = val.run(data=str(data_yaml), weights=str(float_best), imgsz=80, batch_size=8,
                                   workers=0, device="cpu", project=str(work / "ptq"), plots=False, ptq=True,
                                   calib_images=16, qat_report=True)
    assert len(metrics) == 7 and len(maps) == 6  # --img 80 became 96 before prepare traced the model
    assert "PTQ: calibrated" in caplog.text and "on 16 images" in caplog.text
    assert "act_quant.input" in caplog.text and "2^-8" in caplog.text  # input: uint8, scale 2^0 / 2^8
    with pytest.raises(ValueError, match="already quantized"):
        val.run(data=str(data_yaml), weights=str(qat_full[1] / "weights" / "best.pt"), imgsz=IMGSZ, workers=0,
                device="cpu", project=str(work / "ptq"), ptq=True, calib_images=4)


# -------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("variant", ["default", "thresholds+distill"])
def test_ddp_qat_two_processes(float_best, data_yaml, tmp_path, warm_qat_hyp, variant):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--qat", "--weights", str(float_best), "--data", str(data_yaml), "--img", str(IMGSZ), "--epochs", "2",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--project", str(tmp_path), "--noplots",
           "--noval", "--qat-observer-epochs", "1"]
    if variant != "default":  # trained thresholds (all-reduced like weights) and a teacher on each rank
        cmd += ["--qat-config", str(REPO / "data" / "quant" / "trained_thresholds.yaml"), "--qat-distill",
                "--hyp", warm_qat_hyp]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["exp"]
    assert sorted(p.name for p in (tmp_path / "exp" / "weights").iterdir()) == ["best.pt", "last.pt"]
    model, meta = load_model(tmp_path / "exp" / "weights" / "last.pt")
    assert meta["qat"] and _assert_pow2(model) > 100
    thresholds = [q for _, q in iter_quantizers(model) if q.log2_threshold is not None]
    assert len(thresholds) > 30 if variant != "default" else not thresholds
    for q in thresholds:
        assert torch.equal(q.exponent, q.log2_threshold.detach().round())


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a failed rank fails the test, not hangs it
    try:
        torch.manual_seed(0)  # identical initial weights on every rank
        config = QuantConfig(rules=(LayerRule("head", activation={"rounding": "mse"}),))
        model = prepare(AddConcatNet(), torch.zeros(1, 3, 16, 16), config).train()
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16, generator=gen) * (1 + rank))
        before = {k: v.clone() for k, v in model.state_dict().items() if _is_quant_key(k)}
        for _, q in iter_quantizers(model):  # as utils.train.trainer._qat_step before freezing observers
            q.sync_across_ranks()
        after = {k: v.clone() for k, v in model.state_dict().items() if _is_quant_key(k)}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (before, after))
        if rank == 0:
            torch.save(gathered, Path(out_dir) / "states.pt")
    finally:
        dist.destroy_process_group()


def test_quantizer_sync_makes_ranks_identical(tmp_path):
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    (before0, after0), (before1, after1) = torch.load(tmp_path / "states.pt", weights_only=True)
    assert any(not torch.equal(before0[k], before1[k]) for k in before0)  # ranks diverged before the sync
    different = [k for k in after0 if not torch.equal(after0[k], after1[k])]
    assert not different, different[:5]
    for k in (k for k in after0 if k.endswith(".max_val") and "input" not in k):
        assert torch.equal(after0[k], torch.maximum(before0[k], before1[k])), k


def test_qat_defaults_no_warmup_no_autoanchor(float_best, data_yaml, work, monkeypatch, caplog):
    """hyp.qat.yaml says warmup_epochs 0: no warmup floor, every group at lr0 in epoch 0 (upstream's
    100-iteration floor used to keep short runs at ~1e-6); and AutoAnchor never replaces the anchors of
    the trained, calibrated head. (The run also takes an observer stride, which the schedule line shows.)"""
    import csv

    import yaml

    import utils.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "check_anchors", lambda *args, **kwargs: calls.append(args))
    with caplog.at_level(logging.INFO):
        train.run(weights=str(float_best), data=str(data_yaml), project=str(work), name="defaults",
                  **dict(QAT, epochs=1, save_period=-1, qat_observer_every=2))
    assert calls == []
    assert any("QAT observers calibrate for 2 batches (one in 2 observed)" in r.getMessage() for r in caplog.records)
    run = work / "defaults"
    hyp = yaml.safe_load((run / "hyp.yaml").read_text())
    assert hyp["warmup_epochs"] == 0
    with open(run / "results.csv", newline="") as f:
        first = {k.strip(): float(v) for k, v in next(csv.DictReader(f)).items()}
    for group in ("x/lr0", "x/lr1", "x/lr2"):
        assert first[group] == pytest.approx(hyp["lr0"], rel=1e-9), group


def test_warmup_iterations_rule():
    from utils.train.setup import warmup_iterations

    assert warmup_iterations(0, 8) == 0 and warmup_iterations(0.0, 1000) == 0
    assert warmup_iterations(3, 8) == 100  # upstream's floor when there is a warmup
    assert warmup_iterations(3, 1000) == 3000


# ------------------------------------------------------------- trained thresholds and distillation
@pytest.fixture(scope="module")
def tqt_distill_runs(work, data_yaml, float_best, warm_qat_hyp) -> tuple[Path, Path]:
    """Two QAT runs with trained activation thresholds and --qat-distill: uninterrupted, and cut after
    epoch 0 then resumed (the teacher comes back from the path in the saved options)."""
    import yaml

    hyp = yaml.safe_load(Path(warm_qat_hyp).read_text())
    hyp["lr_threshold"] = 0.2  # big steps: a few optimizer steps move thresholds across an integer
    hyp_path = work / "hyp.tqt.yaml"
    hyp_path.write_text(yaml.safe_dump(hyp, sort_keys=False))
    overlay = work / "tqt.yaml"
    overlay.write_text("activation:\n  trained_threshold: true\n")
    kwargs = dict(QAT, weights=str(float_best), data=str(data_yaml), project=str(work), hyp=str(hyp_path),
                  qat_config=str(overlay), qat_distill=True)
    train.run(name="tqt_full", **kwargs)
    train.run(name="tqt_cut", _stop_after_epoch=0, **kwargs)
    train.run(resume=str(work / "tqt_cut" / "weights" / "last.pt"))
    return work / "tqt_full", work / "tqt_cut"


def test_trained_thresholds_move_and_exponents_follow(tqt_distill_runs):
    import yaml

    full = tqt_distill_runs[0]
    first = _ckpt(full / "weights" / "epoch0.pt")["train_state_dict"]
    last = _ckpt(full / "weights" / f"epoch{EPOCHS - 1}.pt")["train_state_dict"]
    thresholds = [k for k in last if k.endswith(".log2_threshold")]
    assert len(thresholds) > 30
    moved = [k for k in thresholds if not torch.equal(first[k], last[k])]
    assert len(moved) > len(thresholds) // 2  # trained after the observers froze (epoch 1 on)
    for k in thresholds:
        assert torch.equal(last[k.replace("log2_threshold", "exponent")], last[k].round()), k
    assert any(not torch.equal(first[k.replace("log2_threshold", "exponent")], last[k.replace("log2_threshold", "exponent")])
               for k in thresholds)  # some scale changed by a power of two
    opt = yaml.safe_load((full / "opt.yaml").read_text())
    assert opt["qat_distill"] and Path(opt["qat_distill"]).name == "best.pt"


def test_resume_restores_thresholds_and_their_optimizer_bit_for_bit(tqt_distill_runs):
    full, cut = tqt_distill_runs
    a = _ckpt(full / "weights" / f"epoch{EPOCHS - 1}.pt")
    b = _ckpt(cut / "weights" / f"epoch{EPOCHS - 1}.pt")
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    sa, sb = a["threshold_optimizer"]["state"], b["threshold_optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 30
    for i in sa:
        assert all(torch.equal(sa[i][n], sb[i][n]) for n in ("exp_avg", "exp_avg_sq")), i
