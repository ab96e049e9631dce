"""MatrixVT detector: BEVDepth with the MatrixVT view transformer (upstream ``bevdepth/models/matrixvt_det.py``)."""
from bevdepth.layers.backbones.matrixvt import MatrixVT
from bevdepth.models.base_bev_depth import BaseBEVDepth


class MatrixVT_Det(BaseBEVDepth):  # noqa: N801  (the reference's class name)
    """``BaseBEVDepth`` whose backbone is ``MatrixVT(**backbone_conf)``; depth is supervised by default.

    backbone_conf may carry MatrixVT-only options such as ``projection='dense' | 'sparse' | 'auto'``.
    The reference first builds a BaseLSSFPN and then replaces it (drawing the random init twice); this port
    builds the MatrixVT backbone once, which only changes the random initial weights.
    """

    def __init__(self, backbone_conf, head_conf, is_train_depth=True):
        super().__init__(backbone_conf, head_conf, is_train_depth=is_train_depth)

    def _build_backbone(self, backbone_conf):
        return MatrixVT(**backbone_conf)
