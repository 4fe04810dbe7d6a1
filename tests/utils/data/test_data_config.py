"""Dataset yaml loading: names formats, split sources, path resolution, errors, image size checks."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from utils.data.data_config import DataConfigError, check_img_size, load_data_config


def _dataset(root: Path) -> Path:
    """A root with two image folders and a txt list; the files need not be real images here."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "images" / split / "a.jpg").write_bytes(b"")
    (root / "val.txt").write_text("./images/val/a.jpg\n")
    return root


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_names_list_becomes_dict_and_paths_are_absolute(tmp_path):
    root = _dataset(tmp_path / "ds")
    f = _write_yaml(tmp_path / "d.yaml", {"path": str(root), "train": "images/train", "val": "images/val",
                                           "names": ["cat", "dog"]})
    cfg = load_data_config(f)
    assert cfg["names"] == {0: "cat", 1: "dog"}
    assert cfg["nc"] == 2
    assert cfg["train"] == str(root / "images" / "train")
    assert cfg["val"] == str(root / "images" / "val")
    assert cfg["yaml_file"] == str(f.resolve())
    assert cfg["download"] is None
    assert "test" not in cfg or not cfg["test"]


def test_names_dict_txt_and_list_sources(tmp_path):
    root = _dataset(tmp_path / "ds")
    f = _write_yaml(tmp_path / "d.yaml", {"path": str(root), "train": ["images/train", "images/val"],
                                           "val": "val.txt", "names": {1: "dog", 0: "cat"},
                                           "download": "echo never-run"})
    cfg = load_data_config(f)
    assert cfg["names"] == {0: "cat", 1: "dog"}
    assert cfg["train"] == [str(root / "images" / "train"), str(root / "images" / "val")]
    assert cfg["val"] == str(root / "val.txt")
    assert cfg["download"] == "echo never-run"


def test_relative_path_resolves_against_yaml_folder(tmp_path, monkeypatch):
    _dataset(tmp_path / "data" / "ds")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the yaml's folder must win over the working directory
    f = _write_yaml(tmp_path / "data" / "d.yaml", {"path": "ds", "train": "images/train", "val": "images/val",
                                                    "names": ["a"]})
    cfg = load_data_config(f)
    assert cfg["path"] == str((tmp_path / "data" / "ds").resolve())


def test_relative_path_falls_back_to_cwd(tmp_path, monkeypatch):
    _dataset(tmp_path / "work" / "ds")
    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    f = _write_yaml(tmp_path / "cfg" / "d.yaml", {"path": "ds", "val": "images/val", "names": ["a"]})
    assert load_data_config(f)["path"] == str((tmp_path / "work" / "ds").resolve())


def test_dict_input_is_accepted(tmp_path):
    root = _dataset(tmp_path / "ds")
    cfg = load_data_config({"path": str(root), "val": "images/val", "names": ["a", "b", "c"], "nc": 3})
    assert cfg["nc"] == 3 and cfg["yaml_file"] is None


@pytest.mark.parametrize("drop", ["names", "val"])
def test_missing_key_names_file_and_key(tmp_path, drop):
    root = _dataset(tmp_path / "ds")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": ["a"]}
    del data[drop]
    f = _write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(DataConfigError, match=rf"bad\.yaml.*'{drop}:' field missing"):
        load_data_config(f)


def test_missing_val_path_is_named(tmp_path):
    root = _dataset(tmp_path / "ds")
    f = _write_yaml(tmp_path / "d.yaml", {"path": str(root), "val": "images/nope", "names": ["a"]})
    with pytest.raises(DataConfigError) as e:
        load_data_config(f)
    assert "d.yaml" in str(e.value) and str(root / "images" / "nope") in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_yaml_file_and_nc_mismatch(tmp_path):
    with pytest.raises(DataConfigError, match="nope.yaml"):
        load_data_config(tmp_path / "nope.yaml")
    root = _dataset(tmp_path / "ds")
    f = _write_yaml(tmp_path / "d.yaml", {"path": str(root), "val": "images/val", "names": ["a", "b"], "nc": 3})
    with pytest.raises(DataConfigError, match=r"d\.yaml.*nc=3"):
        load_data_config(f)
    f = _write_yaml(tmp_path / "e.yaml", {"path": str(root), "val": "images/val", "names": {0: "a", 2: "b"}})
    with pytest.raises(DataConfigError, match=r"e\.yaml.*names"):
        load_data_config(f)


def test_shared_coco128_yaml(coco128_yaml):
    cfg = load_data_config(coco128_yaml)
    assert cfg["nc"] == 80 and cfg["names"][0] == "person" and cfg["names"][79] == "toothbrush"
    assert Path(cfg["val"]).is_dir() and cfg["val"].endswith("train2017")


def test_check_img_size(caplog):
    assert check_img_size(640) == 640
    with caplog.at_level(logging.WARNING, logger="utils.data.data_config"):
        assert check_img_size(641, stride=32) == 672
    assert "must be multiple of max stride 32" in caplog.text
    assert check_img_size([320, 100], stride=64) == [320, 128]
    assert check_img_size(16, stride=32, floor=64) == 64
