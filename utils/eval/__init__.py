"""Evaluation: NMS, matching, metrics and plots, single-image prediction, validation and quantization reports."""
