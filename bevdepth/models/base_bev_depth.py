"""BEVDepth detector: LSS view-transform backbone + BEVDepthHead (upstream ``bevdepth/models/base_bev_depth.py``)."""
from torch import nn

from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
from bevdepth.layers.heads.bev_depth_head import BEVDepthHead
from bevdepth.models.depth_loss import DepthLoss


class BaseBEVDepth(nn.Module):
    """Camera-only detector = ``backbone`` (images -> BEV features) + ``head`` (BEV -> CenterPoint maps).

    Args:
        backbone_conf: kwargs of the backbone (``bevdepth.configs.nuscenes.backbone_conf()``).
        head_conf: kwargs of ``BEVDepthHead`` (``bevdepth.configs.nuscenes.head_conf()``).
        is_train_depth: in training mode also return the key frame's depth probabilities for the depth loss.

    State-dict keys are ``backbone.*`` and ``head.*`` as in the reference, so its checkpoints load (after
    stripping the LightningModule's ``model.`` prefix).
    """

    def __init__(self, backbone_conf, head_conf, is_train_depth=False):
        super().__init__()
        self.backbone = self._build_backbone(backbone_conf)
        self.head = BEVDepthHead(**head_conf)
        self.is_train_depth = is_train_depth
        self.depth_loss = DepthLoss(backbone_conf['downsample_factor'], backbone_conf['d_bound'])

    def _build_backbone(self, backbone_conf):
        return BaseLSSFPN(**backbone_conf)

    def forward(self, x, mats_dict, timestamps=None):
        """Detect.

        Args:
            x: (B, S, N, 3, H, W) images of S sweeps and N cameras.
            mats_dict: sensor2ego_mats, intrin_mats, ida_mats, sensor2sensor_mats (B, S, N, 4, 4), bda_mat (B, 4, 4).
            timestamps: (B, S, N) or None.

        Returns:
            head predictions (tuple over tasks of [dict of (B, c, Y, X) maps]); in training with
            ``is_train_depth`` the tuple (predictions, depth (B * N, D, fH, fW) fp32 probabilities).
        """
        if self.is_train_depth and self.training:
            bev, depth = self.backbone(x, mats_dict, timestamps, is_return_depth=True)
            return self.head(bev), depth
        return self.head(self.backbone(x, mats_dict, timestamps))

    def get_targets(self, gt_boxes_list, gt_labels_list):
        """Head targets, see ``BEVDepthHead.get_targets``."""
        return self.head.get_targets(gt_boxes_list, gt_labels_list)

    def loss(self, targets, preds_dicts):
        """(detection loss, dict of parts), see ``BEVDepthHead.loss``."""
        return self.head.loss(targets, preds_dicts)

    def get_depth_loss(self, depth_labels, depth_preds):
        """3.0 x depth BCE, see ``DepthLoss``: depth_labels (B, N, H, W), depth_preds (B * N, D, fH, fW)."""
        return self.depth_loss(depth_labels, depth_preds)

    def get_bboxes(self, preds_dicts, img_metas=None):
        """Per sample [boxes (n, 9), scores (n,), labels (n,) int32], see ``BEVDepthHead.get_bboxes``."""
        return self.head.get_bboxes(preds_dicts, img_metas)
