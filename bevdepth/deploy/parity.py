"""Parity checks without a trained checkpoint: make a freshly initialised model a meaningful ONNX-vs-PyTorch
test subject (docs/deployment.md, "Parity without a checkpoint")."""
import math

import torch

__all__ = ['randomise_for_parity', 'calibrate_heatmap_bias']


def randomise_for_parity(model, seed=0):
    """Give an untrained model trained-like eval statistics so an ONNX-vs-PyTorch comparison exercises every op.

    A freshly initialised model has BN running stats (0, 1), zero-initialised residual BNs and zero DCN offsets,
    which makes its head maps ~0.04 in magnitude and the deformable convolution a plain convolution: a 1e-3
    tolerance would then prove nothing. This draws BN running mean / var and affine parameters and small DCN
    offset weights (head maps of order 1). In place; returns ``model``. Follow it with ``calibrate_heatmap_bias``
    so decoding keeps a realistic number of boxes.
    """
    from bevdepth.ops.deform_conv import DeformConv2dPack

    generator = torch.Generator().manual_seed(seed)

    def draw(tensor, low, high):
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                draw(module.running_var, 0.5, 1.5)
                if module.affine:
                    draw(module.weight, 0.5, 1.5)
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, DeformConv2dPack):
                module.conv_offset.weight.copy_(0.05 * torch.randn(module.conv_offset.weight.shape,
                                                                   generator=generator))
    return model


def calibrate_heatmap_bias(model, imgs, mats_dict, num_positive=200):
    """Shift every heatmap bias by one common amount so that ``num_positive`` cells of this sample (over all
    tasks and classes) score above the decoder's threshold, like a trained model's few hundred candidates.

    Without it an untrained head scores ~half of all cells near the 0.1 threshold (or none at all), and the
    top-k / NMS selection among thousands of near-equal scores would hinge on float rounding. The gap between
    the last kept and the first dropped cell is placed symmetrically around the threshold. In place; returns
    the applied shift.

    Args:
        imgs: (1, 1, N, 3, H, W); mats_dict: the sample's matrices.
    """
    threshold = model.head.bbox_coder.get('score_threshold') or 0.1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        preds = model(imgs, mats_dict)
        logits = torch.cat([task_preds[0]['heatmap'].reshape(-1) for task_preds in preds])
        count = min(int(num_positive), logits.numel() - 1)
        top = logits.topk(count + 1).values
        shift = float(math.log(threshold / (1 - threshold)) - (top[count - 1] + top[count]) / 2)
        for task_head in model.head.task_heads:
            task_head.heatmap[-1].bias.add_(shift)
    model.train(was_training)
    return shift
