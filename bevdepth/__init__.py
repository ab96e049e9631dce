"""MatrixVT / BEVDepth camera-only 3D detection on nuScenes (native PyTorch port)."""

__version__ = "0.1.0"
