"""What detect.py writes into its run folder: annotated images and videos, label files, crops.

Names follow upstream v7.0: ``<run>/<image name>``, ``<run>/<video stem>.mp4``,
``<run>/labels/<stem>.txt`` (``<stem>_<frame>.txt`` for video frames) and
``<run>/crops/<class name>/<stem>.jpg``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.boxes import xyxy2xywh
from utils.data.sources import Frame
from utils.eval.annotate import save_crop

__all__ = ["OutputWriter", "check_display", "describe_counts", "label_rows"]

LOGGER = logging.getLogger(__name__)


def describe_counts(boxes: torch.Tensor, names: dict) -> str:
    """Upstream's per-image summary, e.g. '4 persons, 1 bus, ' (empty for no detections)."""
    text = ""
    for c in boxes[:, 5].unique().tolist():
        n = int((boxes[:, 5] == c).sum())
        text += f"{n} {names.get(int(c), str(int(c)))}{'s' * (n > 1)}, "
    return text


def check_display() -> None:
    """Raise ValueError in one line unless OpenCV can open a window here (for --view-img)."""
    if os.name == "posix" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("--view-img: no display here (DISPLAY is not set); the results are saved in the run folder")
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and gui[0].split(":", 1)[1].strip().upper() == "NONE":
        raise ValueError("--view-img: this OpenCV build has no GUI (opencv-python-headless); install "
                         "opencv-python to show windows")


class OutputWriter:
    """Writes each annotated frame, its labels and crops; videos are assembled frame by frame."""

    def __init__(self, save_dir: Path, save_img: bool = True, save_txt: bool = False, save_conf: bool = False,
                 save_crop: bool = False) -> None:
        self.save_dir, self.save_img = save_dir, save_img
        self.save_txt, self.save_conf, self.save_crop = save_txt, save_conf, save_crop
        self.labels_dir = save_dir / "labels"
        self._videos: dict[str, cv2.VideoWriter] = {}
        if save_txt:
            self.labels_dir.mkdir(parents=True, exist_ok=True)

    def labels(self, frame: Frame, boxes: torch.Tensor) -> None:
        """Append the frame's detections to its label file (nothing is written for no detections)."""
        if not self.save_txt or not boxes.shape[0]:
            return
        stem = Path(frame.path).stem + (f"_{frame.frame}" if frame.is_video else "")
        with open(self.labels_dir / f"{stem}.txt", "a") as fh:
            fh.write("".join(line + "\n" for line in label_rows(boxes, frame.image.shape, self.save_conf)))

    def crops(self, frame: Frame, boxes: torch.Tensor, names: dict) -> None:
        if not self.save_crop:
            return
        stem = Path(frame.path).stem
        for *xyxy, _, cls in reversed(boxes.tolist()):
            name = names.get(int(cls), str(int(cls)))
            save_crop(xyxy, frame.image, self.save_dir / "crops" / name / f"{stem}.jpg")

    def image(self, frame: Frame, annotated: np.ndarray) -> None:
        """Save the annotated image, or append it to the frame's output video."""
        if not self.save_img:
            return
        path = self.save_dir / Path(frame.path).name
        if not frame.is_video:
            if not cv2.imwrite(str(path), annotated):
                raise OSError(f"{path}: could not write the annotated image")
            return
        writer = self._videos.get(frame.path)
        if writer is None:
            h, w = annotated.shape[:2]
            out = str(path.with_suffix(".mp4"))
            writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), frame.fps, (w, h))
            if not writer.isOpened():
                raise OSError(f"{out}: OpenCV cannot write this video")
            self._videos[frame.path] = writer
        writer.write(annotated)

    def close(self) -> None:
        """Finish every open video file."""
        for writer in self._videos.values():
            writer.release()
        self._videos.clear()


def label_rows(boxes: torch.Tensor, shape0: Sequence[int], save_conf: bool = False) -> list[str]:
    """YOLO label lines for detections, as upstream's detect.py writes them (last detection first).

    Each line is ``class x_center y_center width height`` normalised by the image size, plus the
    confidence with ``save_conf``, every number in ``%g`` format.
    """
    gain = torch.tensor(shape0[:2], dtype=torch.float32)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in reversed(boxes.tolist()):
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    return lines
