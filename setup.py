"""Install with ``pip install -e .`` (or the seed's ``python setup.py develop``).

No compiled extensions: every operator is native PyTorch.
"""
from setuptools import find_packages, setup


def read_requirements(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="bevdepth",
    version="0.1.0",
    description="MatrixVT / BEVDepth camera-only 3D detection on nuScenes (native PyTorch, Lightning 2)",
    python_requires=">=3.9",
    packages=find_packages(include=["bevdepth", "bevdepth.*", "exps", "exps.*"]),
    install_requires=read_requirements("requirements.txt"),
    extras_require={"test": ["pytest>=7", "onnx>=1.15", "onnxruntime>=1.17"],
                    "onnx": ["onnx>=1.15", "onnxruntime>=1.17"]},
)
