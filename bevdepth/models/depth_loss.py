"""Depth supervision of BEVDepth / MatrixVT (upstream ``bevdepth/exps/nuscenes/base_exp.py``
``BEVDepthLightningModel.get_depth_loss`` / ``get_downsampled_gt_depth``).

The LiDAR depth map of each camera is cut into ``downsample_factor`` x ``downsample_factor`` patches; each patch
is labelled with its minimum non-zero depth, binned into the depth-net's D bins (bin j covers
[d0 + j * step, d0 + (j + 1) * step)), and the depth-net's softmax probabilities are trained with a binary
cross-entropy on the patches that have a label, in fp32, times ``loss_weight`` (3.0).
"""
import torch
import torch.nn.functional as F

from bevdepth.ops.device_branch import autocast_off


class DepthLoss:
    """Depth BCE loss.

    Args:
        downsample_factor: image pixels per feature cell (16).
        d_bound: [d0, d1, step] of the depth bins (D = round((d1 - d0) / step)).
        loss_weight: multiplier of the loss (3.0 in the reference).
    """

    def __init__(self, downsample_factor, d_bound, loss_weight=3.0):
        self.downsample_factor = int(downsample_factor)
        self.d_bound = [float(v) for v in d_bound]
        self.depth_channels = int(round((self.d_bound[1] - self.d_bound[0]) / self.d_bound[2]))
        self.loss_weight = loss_weight

    def get_downsampled_gt_depth(self, depth_labels):
        """(B, N, H, W) metric depth (0 = no LiDAR point) -> (B * N * h * w, D) one-hot rows (all-zero = no label).

        Rows are ordered (camera, patch row, patch column), matching depth predictions (B * N, D, h, w) permuted to
        channels-last.
        """
        if depth_labels.dim() != 4:
            raise ValueError(f'depth labels must be (B, N, H, W), got shape {tuple(depth_labels.shape)}')
        batch_size, num_cams, height, width = depth_labels.shape
        ds = self.downsample_factor
        if height % ds or width % ds:
            raise ValueError(f'depth label size {height}x{width} is not a multiple of downsample_factor {ds}')
        patches = depth_labels.reshape(batch_size * num_cams, height // ds, ds, width // ds, ds)
        patches = patches.permute(0, 1, 3, 2, 4).reshape(-1, ds * ds)
        # Minimum non-zero depth per patch; empty patches get 1e5, which lands outside every bin.
        patches = torch.where(patches == 0.0, torch.full_like(patches, 1e5), patches)
        min_depth = patches.min(dim=-1).values
        bin_index = (min_depth - (self.d_bound[0] - self.d_bound[2])) / self.d_bound[2]
        # Index 0 is the "no label" class; indices 1..D are the bins (cut off by [:, 1:] below).
        bin_index = torch.where((bin_index < self.depth_channels + 1) & (bin_index >= 0.0), bin_index,
                                torch.zeros_like(bin_index))
        one_hot = F.one_hot(bin_index.long(), num_classes=self.depth_channels + 1)
        return one_hot[:, 1:].float()

    def __call__(self, depth_labels, depth_preds):
        """Weighted BCE between the key frame's depth labels and predicted depth probabilities.

        Args:
            depth_labels: (B, N, H, W) metric depth, or (B, S, N, H, W) of which the key frame [:, 0] is used.
            depth_preds: (B * N, D, h, w) softmax probabilities.

        Returns:
            scalar fp32 loss.
        """
        if depth_labels.dim() == 5:
            depth_labels = depth_labels[:, 0]
        labels = self.get_downsampled_gt_depth(depth_labels)
        if depth_preds.dim() != 4 or depth_preds.shape[1] != self.depth_channels:
            raise ValueError(f'depth predictions must be (B * N, {self.depth_channels}, h, w), '
                             f'got shape {tuple(depth_preds.shape)}')
        preds = depth_preds.permute(0, 2, 3, 1).reshape(-1, self.depth_channels)
        if preds.shape[0] != labels.shape[0]:
            raise ValueError(f'{preds.shape[0]} depth prediction cells but {labels.shape[0]} label patches: '
                             f'check downsample_factor and the label / prediction sizes')
        labels = labels.to(preds.device)
        fg_mask = labels.max(dim=1).values > 0.0
        # BCE is fp32-only under autocast (and collapses in fp16), so it runs with autocast off.
        with autocast_off(preds.device):
            loss = F.binary_cross_entropy(preds[fg_mask].float(), labels[fg_mask], reduction='none').sum()
            loss = loss / torch.clamp(fg_mask.sum(), min=1).float()
        return self.loss_weight * loss
