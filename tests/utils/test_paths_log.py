"""Tests for utils.paths (run-folder naming, sizes, writability) and utils.log (set-up, colours)."""
from __future__ import annotations

import logging

import pytest

from utils.log import PACKAGE_LOGGERS, TQDM_BAR_FORMAT, colorstr, setup_logging
from utils.paths import ROOT, RunDirError, check_writable_dir, file_size, increment_path


def test_root_is_repo():
    assert (ROOT / "utils" / "paths.py").is_file()


def test_increment_path_dirs(tmp_path):
    base = tmp_path / "runs" / "val" / "exp"
    assert increment_path(base) == base  # free: unchanged, not created
    assert not base.exists()
    assert increment_path(base, mkdir=True) == base and base.is_dir()
    names = [increment_path(base, mkdir=True).name for _ in range(3)]
    assert names == ["exp2", "exp3", "exp4"]
    assert increment_path(base, exist_ok=True) == base
    assert increment_path(base, sep="_").name == "exp_2"


def test_increment_path_fills_first_gap(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp3").mkdir()
    assert increment_path(tmp_path / "exp").name == "exp2"


def test_increment_path_file_keeps_suffix(tmp_path):
    f = tmp_path / "results.csv"
    f.write_text("x")
    assert increment_path(f).name == "results2.csv"


def test_file_size(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"\0" * (1 << 19))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * (1 << 19))
    assert file_size(f) == pytest.approx(0.5)
    assert file_size(tmp_path) == pytest.approx(1.0)
    assert file_size(tmp_path / "missing") == 0.0


def test_check_writable_dir_creates_and_cleans(tmp_path):
    run = tmp_path / "runs" / "train" / "exp"
    assert check_writable_dir(run) == run
    assert run.is_dir() and list(run.iterdir()) == []  # probe removed


def test_check_writable_dir_under_a_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="not_a_dir") as err:
        check_writable_dir(blocker / "exp")
    assert isinstance(err.value, OSError)
    assert "\n" not in str(err.value)


def test_colorstr():
    assert colorstr("hi") == "\033[34m\033[1mhi\033[0m"
    assert colorstr("red", "underline", "x") == "\033[31m\033[4mx\033[0m"
    assert colorstr("bright_green", 3) == "\033[92m3\033[0m"
    with pytest.raises(ValueError, match="purple"):
        colorstr("purple", "x")


def test_bar_format():
    assert TQDM_BAR_FORMAT == "{l_bar}{bar:10}{r_bar}"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {n: logging.getLogger(n).level for n in PACKAGE_LOGGERS}
    yield
    root.handlers[:] = handlers
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def test_setup_logging_levels_and_single_handler(restore_logging):
    root = logging.getLogger()
    n0 = len([h for h in root.handlers if h.formatter is None or h.formatter._fmt != "%(message)s"])
    h1 = setup_logging(verbose=True, rank=-1)
    h2 = setup_logging(verbose=True, rank=0)
    assert h1 not in root.handlers and h2 in root.handlers
    ours = [h for h in root.handlers if h.formatter is not None and h.formatter._fmt == "%(message)s"]
    assert ours == [h2] and len(root.handlers) == n0 + 1  # a second call replaces, never stacks (also an
    # earlier in-process script's handler)
    assert logging.getLogger("utils.train.autoanchor").getEffectiveLevel() == logging.INFO
    assert h2.format(logging.makeLogRecord({"msg": "plain %s", "args": ("text",)})) == "plain text"
    setup_logging(verbose=True, rank=1)
    assert logging.getLogger("utils").level == logging.WARNING
    setup_logging(verbose=False, rank=-1)
    assert logging.getLogger("models").level == logging.WARNING
