"""Tests for utils.data.downloads, all offline: file:// URLs and zips built in tmp_path."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from utils.data import downloads
from utils.data.downloads import (DownloadError, DownloadRefused, UnsafeArchiveError,
                             attempt_download_weights, download_dataset, safe_download,
                             sha256sum, unzip_file)

REPO = Path(__file__).resolve().parents[3]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_file_url_download(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 50)
    out = safe_download(src.as_uri(), tmp_path / "sub" / "copy.bin", min_bytes=1000,
                        sha256=sha256sum(src))
    assert out.read_bytes() == src.read_bytes()
    assert _leftovers(out.parent) == []


def test_failed_download_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "out" / "w.pt"
    with pytest.raises(DownloadError, match="missing.pt"):
        safe_download((tmp_path / "missing.pt").as_uri(), target)
    assert not target.exists() and _leftovers(target.parent) == []
    # an existing target survives a failed re-download untouched
    target.write_bytes(b"old")
    with pytest.raises(DownloadError):
        safe_download((tmp_path / "missing.pt").as_uri(), target)
    assert target.read_bytes() == b"old"


def test_min_bytes_and_checksum(tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 10)
    target = tmp_path / "out.bin"
    with pytest.raises(DownloadError, match="10 bytes"):
        safe_download(src.as_uri(), target, min_bytes=11)
    with pytest.raises(DownloadError, match="sha256"):
        safe_download(src.as_uri(), target, sha256="0" * 64)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_rejects_non_urls(tmp_path: Path) -> None:
    for bad in ("ftp://example.com/a.zip", "rm -rf /", str(tmp_path / "a.zip")):
        with pytest.raises(DownloadError, match="not an http"):
            safe_download(bad, tmp_path / "x")


def test_attempt_download_weights(tmp_path: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "yolov5s.pt").write_bytes(b"w" * 200_000)
    dest = tmp_path / "weights"
    got = attempt_download_weights("yolov5s.pt", dest, base_url=mirror.as_uri())
    assert got == dest / "yolov5s.pt" and got.stat().st_size == 200_000
    # present now: returned without touching the (now empty) mirror
    (mirror / "yolov5s.pt").unlink()
    assert attempt_download_weights("yolov5s.pt", dest, base_url=mirror.as_uri()) == got
    # the environment variable is the fallback base URL
    (mirror / "yolov5n.pt").write_bytes(b"n" * 200_000)
    monkeypatch.setenv(downloads.WEIGHTS_URL_ENV, mirror.as_uri())
    assert attempt_download_weights("yolov5n.pt", dest).is_file()
    with pytest.raises(FileNotFoundError, match="official"):
        attempt_download_weights("mystery.pt", dest)
    # too small to be a checkpoint: refused, nothing written
    (mirror / "yolov5m.pt").write_bytes(b"tiny")
    with pytest.raises(DownloadError):
        attempt_download_weights("yolov5m.pt", dest)
    assert not (dest / "yolov5m.pt").exists()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_unzip_and_zip_slip(tmp_path: Path) -> None:
    good = _zip(tmp_path / "good.zip", {"ds/a.txt": b"a", "ds/sub/b.txt": b"b",
                                        "__MACOSX/._a.txt": b"junk"})
    out = unzip_file(good, tmp_path / "out")
    assert (out / "ds" / "sub" / "b.txt").read_bytes() == b"b"
    assert not (out / "__MACOSX").exists()
    for evil in ("../escape.txt", "ds/../../escape.txt", "/tmp/abs_escape.txt"):
        bad = _zip(tmp_path / "bad.zip", {"ds/ok.txt": b"ok", evil: b"evil"})
        dest = tmp_path / "dest"
        with pytest.raises(UnsafeArchiveError, match="outside"):
            unzip_file(bad, dest)
        assert not (tmp_path / "escape.txt").exists()
        assert not dest.exists()  # refused before anything was written


def test_download_dataset_zip_list(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    labels = _zip(assets / "labels.zip", {"toy/labels/train/a.txt": b"0 0.5 0.5 0.1 0.1\n"})
    images = _zip(assets / "train.zip", {"train/a.jpg": b"jpeg"})
    (assets / "list.txt").write_text("./images/train/a.jpg\n")
    root = tmp_path / "datasets" / "toy"
    data = {"path": str(root), "download": [
        labels.as_uri(),
        {"url": images.as_uri(), "dir": "images"},
        {"url": (assets / "list.txt").as_uri(), "dir": "."},
    ]}
    assert download_dataset(data, root) == root
    assert (root / "labels" / "train" / "a.txt").is_file()
    assert (root / "images" / "train" / "a.jpg").read_bytes() == b"jpeg"
    assert (root / "list.txt").is_file()
    assert not (root / "images" / "train.zip").exists()  # archives removed after unpacking


def test_download_dataset_single_url(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "toy.zip", {"toy/images/x.jpg": b"x"})
    root = tmp_path / "datasets" / "toy"
    download_dataset({"download": archive.as_uri()}, root)
    assert (root / "images" / "x.jpg").is_file()


@pytest.mark.parametrize("download", [
    "bash data/scripts/get_coco.sh",
    "from utils.general import download\ndownload(['x'])",
    ["https://example.com/a.zip", "python -c 'import os'"],
    [{"url": "import os"}],
    None,
])
def test_download_dataset_refuses_scripts(tmp_path: Path, monkeypatch, download) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(downloads.urllib.request, "urlopen", no_network)
    with pytest.raises(DownloadRefused, match="manually"):
        download_dataset({"download": download}, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_download_dataset_dir_cannot_escape(tmp_path: Path) -> None:
    data = {"download": [{"url": "https://example.com/a.zip", "dir": "../../elsewhere"}]}
    with pytest.raises(DownloadRefused, match="leaves"):
        download_dataset(data, tmp_path / "datasets" / "toy")


def test_download_dataset_synthetic(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    spec = {"n_train": 2, "n_val": 1, "img_size": 96, "seed": 0}
    download_dataset({"synthetic": spec}, root)
    assert (root / "synthetic.yaml").is_file()
    assert len(list((root / "images" / "val").glob("*.jpg"))) == 1


@pytest.mark.parametrize("name", ["coco128", "coco", "synthetic"])
def test_data_yamls(name: str) -> None:
    data = yaml.safe_load((REPO / "data" / f"{name}.yaml").read_text())
    names = data["names"]
    assert isinstance(names, dict) and list(names) == list(range(len(names)))
    assert len(names) == (6 if name == "synthetic" else 80)
    assert data["train"] and data["val"]
    if name == "synthetic":
        assert set(data["synthetic"]) <= {"n_train", "n_val", "img_size", "seed"}
    else:
        assert names[0] == "person" and names[79] == "toothbrush"
        items = downloads._download_items(data["download"])  # parses without refusing
        assert all(url.startswith(("https://", "http://")) for url, _ in items)
        assert any(url.endswith(f"{name}.zip") or "coco2017labels" in url for url, _ in items)


def test_resolve_dataset_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    yaml_file = tmp_path / "cfg" / "toy.yaml"
    data = {"path": "../datasets/toy"}
    # nothing exists yet: the yaml's folder is the base, as in utils.data.data_config
    assert downloads.resolve_dataset_root(data, yaml_file) == tmp_path / "datasets" / "toy"
    assert downloads.resolve_dataset_root(data) == tmp_path.parent / "datasets" / "toy"
    existing = REPO.parent / "datasets" / "coco128"
    if existing.is_dir():  # upstream's repository-root rule when only that folder exists
        assert downloads.resolve_dataset_root({"path": "../datasets/coco128"}) == existing
    assert downloads.resolve_dataset_root({"path": "/abs/ds"}) == Path("/abs/ds")


def test_cli_weights(tmp_path: Path, capsys) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "yolov5l.pt").write_bytes(b"l" * 200_000)
    rc = downloads.main(["--weights", "yolov5l.pt", "--dest", str(tmp_path / "w"),
                         "--base-url", mirror.as_uri()])
    assert rc == 0 and (tmp_path / "w" / "yolov5l.pt").is_file()
    assert downloads.main(["--weights", "nope.pt", "--dest", str(tmp_path / "w")]) == 1
    assert downloads.main([]) == 2
