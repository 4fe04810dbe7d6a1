"""Detection: what detect.py needs beyond evaluation: loading any weights for inference and writing its outputs."""
