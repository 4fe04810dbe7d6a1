"""utils.data.sources: what a --source names, frames of videos, val.py's letterbox for one image."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from utils.data.dataset import create_dataloader
from utils.data.sources import SourceError, check_source, iterate_frames, letterbox_like_val, list_source_files


def _image(path, h=48, w=64):
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))
    return str(path)


def test_folder_glob_and_txt_list(tmp_path, monkeypatch):
    a, b = _image(tmp_path / "b.jpg"), _image(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("not an image\n")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "c.jpg")
    assert list_source_files(tmp_path) == [b, a]  # sorted, not recursive, other files ignored
    assert list_source_files(str(tmp_path / "*.jpg")) == [a]
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text(f"{a}\nc.jpg\n\n{tmp_path}/*.png\n")
    monkeypatch.chdir("/")
    assert list_source_files(listing) == [a, str(tmp_path / "sub" / "c.jpg"), b]


@pytest.mark.parametrize("source, message", [
    ("0", "webcam"), ("12", "webcam"), ("rtsp://host/stream", "streams"), ("https://x.org/a.mp4", "streams"),
    ("list.streams", "streams"), ("screen", "streams")])
def test_webcams_and_streams_are_refused(source, message):
    with pytest.raises(SourceError, match=message):
        check_source(source)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="source does not exist"):
        list_source_files(tmp_path / "none.jpg")
    with pytest.raises(SourceError, match="no images or videos"):
        list_source_files(tmp_path)
    with pytest.raises(SourceError, match="source list does not exist"):
        list_source_files(tmp_path / "none.txt")


def test_video_frames_with_stride(tmp_path):
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    for i in range(7):
        writer.write(np.full((24, 32, 3), i * 30, np.uint8))
    writer.release()
    image = _image(tmp_path / "a.jpg")
    frames = list(iterate_frames([image, str(video)], vid_stride=3))
    assert [f.progress() for f in frames] == [f"image 1/2 {image}: ", f"video 2/2 (1/2) {video}: ",
                                              f"video 2/2 (2/2) {video}: "]
    assert frames[1].fps == 5 and abs(int(frames[2].image.mean()) - 150) <= 3  # frames 3 and 6 are kept
    with pytest.raises(SourceError, match="vid-stride"):
        next(iterate_frames([image], vid_stride=0))


@pytest.mark.parametrize("hw", [(1080, 810), (720, 1280), (500, 500), (37, 300)])
def test_letterbox_equals_val_dataloader(tmp_path, hw):
    rng = np.random.default_rng(0)
    path = tmp_path / "images" / "x.png"
    os.makedirs(path.parent)
    cv2.imwrite(str(path), rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
    loader = create_dataloader(str(path.parent), 320, 1, 32, pad=0.5, rect=True, workers=0)[0]
    im, _, _, shapes = next(iter(loader))
    chw, ratio_pad = letterbox_like_val(cv2.imread(str(path)), 320, 32)
    assert torch.equal(im[0], torch.from_numpy(chw)) and ratio_pad == shapes[0][1]
    square, _ = letterbox_like_val(cv2.imread(str(path)), 320, 32, rect=False)
    assert square.shape == (3, 320, 320)
