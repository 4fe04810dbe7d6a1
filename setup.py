"""Install the library packages (models, utils, quant) so the scripts and tests can import them."""
from setuptools import find_packages, setup

setup(
    name="yolov5-pow2-qat",
    version="0.1.0",
    description="YOLOv5 v7.0-compatible training with power-of-2 INT8 quantization-aware training",
    python_requires=">=3.9",
    packages=find_packages(include=["models", "models.*", "utils", "utils.*", "quant", "quant.*"]),
    py_modules=["train", "val", "export", "detect"],
    package_data={"models": ["*.yaml"]},
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt")
                      if line.split("#")[0].strip()],
)
