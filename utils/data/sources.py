"""Inputs of detect.py: which files a ``--source`` names, and the frames they hold.

A source is an image or video file, a folder (its files, not its sub-folders, as upstream), a glob
pattern, or a ``.txt`` file listing any of those, one per line. Webcams and network streams are
refused: this repository runs offline batch inference only.

Example:
    >>> files = list_source_files("data/images")  # doctest: +SKIP
    >>> for frame in iterate_frames(files, vid_stride=2):  # doctest: +SKIP
    ...     print(frame.progress(), frame.image.shape)
"""
from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from utils.data.images import letterbox, read_image, resize_longest
from utils.data.label_scan import IMG_FORMATS

__all__ = ["VID_FORMATS", "Frame", "SourceError", "check_source", "iterate_frames", "list_source_files",
           "letterbox_like_val"]

LOGGER = logging.getLogger(__name__)

VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
_STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "tcp://", "udp://")


class SourceError(ValueError):
    """A --source that cannot be used: missing, empty, or a webcam/stream."""


def check_source(source: str | os.PathLike) -> str:
    """Return ``source`` as a string, or raise SourceError for webcams, streams and screens."""
    text = str(source).strip()
    if text.isnumeric():
        raise SourceError(f"--source {text}: webcam input is not supported here (offline inference only); "
                          "pass an image, video, folder, glob or .txt list")
    if text.lower().startswith(_STREAM_PREFIXES) or text.endswith(".streams") or text.lower() == "screen":
        raise SourceError(f"--source {text}: streams and screen capture are not supported here (offline "
                          "inference only); download the file and pass its path")
    return text


def _kind(path: str) -> str | None:
    ext = path.rsplit(".", 1)[-1].lower() if "." in Path(path).name else ""
    return "image" if ext in IMG_FORMATS else "video" if ext in VID_FORMATS else None


def _expand(entry: str) -> list[str]:
    """Files of one source entry: a glob pattern, a folder (not recursive) or a file."""
    if "*" in entry:
        return sorted(glob.glob(entry, recursive=True))
    if os.path.isdir(entry):
        return sorted(glob.glob(os.path.join(entry, "*.*")))
    if os.path.isfile(entry):
        return [entry]
    raise SourceError(f"{entry}: source does not exist")


def list_source_files(source: str | os.PathLike) -> list[str]:
    """Image and video files named by ``source``, in upstream's order; other files are ignored.

    A ``.txt`` source lists entries one per line; relative entries are taken from the current
    folder, else from the list's own folder.
    """
    text = check_source(source)
    entries = [text]
    if text.endswith(".txt"):
        if not os.path.isfile(text):
            raise SourceError(f"{text}: source list does not exist")
        parent = Path(text).parent
        lines = [ln.strip() for ln in Path(text).read_text(encoding="utf-8").splitlines() if ln.strip()]
        entries = [ln if os.path.isabs(ln) or os.path.exists(ln) or "*" in ln else str(parent / ln) for ln in lines]
    files = [f for entry in entries for f in _expand(os.path.expanduser(check_source(entry)))]
    images = [f for f in files if _kind(f) == "image"]
    videos = [f for f in files if _kind(f) == "video"]
    if not images and not videos:
        raise SourceError(f"{text}: no images or videos found (images: {', '.join(IMG_FORMATS)}; "
                          f"videos: {', '.join(VID_FORMATS)})")
    return images + videos  # upstream serves the images first, then the videos


@dataclass
class Frame:
    """One image, or one frame of a video, as BGR uint8 pixels with its place in the source."""

    path: str
    image: np.ndarray
    index: int  # 1-based position of the file in the source
    count: int  # number of files in the source
    frame: int = 0  # video: 1-based frame number among the frames kept (0 for images)
    frames: int = 0  # video: frames that will be kept (after --vid-stride)
    fps: float = 0.0  # video: frames per second of the output video

    @property
    def is_video(self) -> bool:
        return self.frames > 0

    def progress(self) -> str:
        """Upstream's line prefix, e.g. 'image 1/2 /data/bus.jpg: ' or 'video 1/1 (3/90) /data/a.mp4: '."""
        if self.is_video:
            return f"video {self.index}/{self.count} ({self.frame}/{self.frames}) {self.path}: "
        return f"image {self.index}/{self.count} {self.path}: "


def _video_frames(path: str, index: int, count: int, vid_stride: int) -> Iterator[Frame]:
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise SourceError(f"{path}: OpenCV cannot open this video")
    try:
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) / vid_stride)
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        fps = fps if math.isfinite(fps) and fps > 0 else 30.0
        n = 0
        while True:
            for _ in range(vid_stride):  # grab skips decoding the frames --vid-stride drops
                ok = cap.grab()
            ok, image = cap.retrieve() if ok else (False, None)
            if not ok:
                break
            n += 1
            yield Frame(path, image, index, count, n, max(frames, n), fps)
    finally:
        cap.release()


def iterate_frames(files: Sequence[str], vid_stride: int = 1) -> Iterator[Frame]:
    """Every image, and every ``vid_stride``-th frame of every video, in ``files``."""
    if vid_stride < 1:
        raise SourceError(f"--vid-stride {vid_stride}: must be at least 1")
    for i, path in enumerate(files, 1):
        if _kind(path) == "video":
            yield from _video_frames(path, i, len(files), vid_stride)
        else:
            yield Frame(path, read_image(path), i, len(files))


def letterbox_like_val(image: np.ndarray, imgsz: int, stride: int, rect: bool = True, pad: float = 0.5
                       ) -> tuple[np.ndarray, tuple]:
    """Letterbox one BGR image exactly as val.py's dataloader does for a batch of one image.

    Resize the long side to ``imgsz`` (INTER_AREA when shrinking), then pad to the smallest
    stride-multiple rectangle plus ``pad`` strides (``rect``; a square ``imgsz`` otherwise, as for a
    static ONNX model). Returns (CHW RGB uint8 array, ratio_pad for ``scale_boxes``).
    """
    h0, w0 = image.shape[:2]
    resized = resize_longest(image, imgsz)
    h, w = resized.shape[:2]
    shape: int | np.ndarray = imgsz
    if rect:
        ar = h0 / w0
        unit = [ar, 1] if ar < 1 else [1, 1 / ar] if ar > 1 else [1, 1]
        shape = np.ceil(np.array(unit) * imgsz / stride + pad).astype(int) * stride
    boxed, _, pad_wh = letterbox(resized, shape, auto=False, scaleup=False)
    chw = np.ascontiguousarray(boxed.transpose((2, 0, 1))[::-1])
    return chw, ((h / h0, w / w0), pad_wh)
