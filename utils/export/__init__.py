"""Export: ONNX files (float and QDQ), their check against PyTorch, and running them in onnxruntime or OpenVINO."""
