"""Robustness of concurrent runs: training runs started at the same moment with the same --project and
--name each get their own numbered run folder (claimed with an atomic mkdir), so none overwrites the
other's checkpoints."""
from __future__ import annotations

import threading
from pathlib import Path

from utils.paths import increment_path


def test_simultaneous_claims_get_distinct_folders(tmp_path):
    base = tmp_path / "runs" / "exp"
    start, got = threading.Barrier(8), []

    def claim() -> None:
        start.wait()
        got.append(increment_path(base, claim=True))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got) == sorted(["exp"] + [f"exp{n}" for n in range(2, 9)])


def test_claim_after_a_check_by_another_run(tmp_path):
    base = tmp_path / "exp"
    seen_free = increment_path(base)  # another run saw 'exp' free but has not created it yet
    mine = increment_path(base, claim=True)
    assert seen_free == base == mine and mine.is_dir()
    assert increment_path(base, claim=True) == Path(f"{base}2")  # the next run cannot take 'exp' again


def test_claim_keeps_exist_ok(tmp_path):
    (tmp_path / "exp").mkdir()
    assert increment_path(tmp_path / "exp", exist_ok=True, claim=True) == tmp_path / "exp"
