"""ResNet with mmdet's (2.x) module names, arguments and init, in plain PyTorch (mmdet 2.x ``ResNet``).

Used twice: the image backbone (ResNet-50, frozen stem, optional ImageNet weights) and the BEV trunk inside the
head (ResNet-18 layout, 80 input channels, 160 base channels, 3 stages, no max-pool). Module names are
``conv1, bn1, layer1..layerN`` with ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN), exactly as mmdet and
torchvision, so torchvision ImageNet checkpoints and reference checkpoints load unchanged.

Initialisation follows mmdet: the constructor leaves PyTorch's default init, ``init_weights()`` applies either the
pretrained checkpoint or Kaiming(fan_out, relu) convs + BN(1, 0) + zero-init of the last BN of every block.
The owners (``BaseLSSFPN`` and ``BEVDepthHead``) call ``init_weights()`` like the reference does.
"""
import os

import torch
from torch import nn

from bevdepth.layers.backbones import imagenet_weights
from bevdepth.layers.backbones.imagenet_weights import PretrainedWeightsError

# depth -> (block, blocks per stage), as torchvision / mmdet.
_ARCH_SETTINGS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}

class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (mmdet ``BasicBlock``, keys conv1, bn1, conv2, bn2[, downsample])."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @property
    def last_norm(self):
        return self.bn2

    def forward(self, x):
        """x (B, inplanes, H, W) -> (B, planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, 'pytorch' style) -> 1x1 x4 with a residual (mmdet ``Bottleneck``)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @property
    def last_norm(self):
        return self.bn3

    def forward(self, x):
        """x (B, inplanes, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_res_layer(block, inplanes, planes, num_blocks, stride, dilation):
    """One stage (mmdet ``ResLayer``, avg_down False): the first block carries stride and downsample."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
    inplanes = planes * block.expansion
    for _ in range(1, num_blocks):
        layers.append(block(inplanes, planes, stride=1, dilation=dilation))
    return nn.Sequential(*layers)


def resolve_pretrained(pretrained, depth):
    """Path of the checkpoint to load for ``pretrained``.

    ``pretrained``: None / 'none' (no checkpoint), 'torchvision' (torchvision's ImageNet ``IMAGENET1K_V1`` file in
    the torch hub cache, downloaded by local rank 0 when absent: bevdepth.layers.backbones.imagenet_weights) or a
    checkpoint path.
    """
    if pretrained is None or str(pretrained) == 'none':
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be None, 'none', 'torchvision' or a checkpoint path, got {pretrained!r}")
    if str(pretrained) in ('torchvision', f'torchvision://resnet{depth}'):
        return imagenet_weights.obtain_weights(depth)
    path = os.path.expanduser(str(pretrained))
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f'pretrained checkpoint {path} does not exist: fix --pretrained PATH, or pass '
                                     f"--pretrained torchvision / none")
    return path


def _load_backbone_state_dict(path):
    """A plain ResNet state dict from a torchvision / mmcv / Lightning-style checkpoint file."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated / not a torch file: the loader's own message is many lines
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedWeightsError(f'pretrained checkpoint {path} cannot be read ({first_line}): download it '
                                     f'again or pass another --pretrained') from None
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model'):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(value) for value in checkpoint.values()):
        raise PretrainedWeightsError(f'pretrained checkpoint {path} does not hold a state dict of tensors: pass a '
                                     f'ResNet checkpoint with --pretrained')
    return {(key[len('module.'):] if key.startswith('module.') else key): value for key, value in checkpoint.items()}


class ResNet(nn.Module):
    """mmdet-compatible ResNet (style 'pytorch', BN, no DCN / plugins / deep stem).

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: input channels (3 for images, 80 for the BEV trunk).
        stem_channels: channels of the 7x7 stem conv (default ``base_channels``).
        base_channels: planes of the first stage; stage i has ``base_channels * 2**i`` planes.
        num_stages: 1..4 stages used.
        strides, dilations: per stage.
        out_indices: stages whose outputs are returned.
        frozen_stages: -1 none; 0 freezes the stem (conv1 + bn1, bn1 kept in eval mode); k also stages 1..k.
        norm_eval: keep every BN in eval mode during training.
        zero_init_residual: zero the last BN of every block in ``init_weights()`` (not with pretrained weights).
        with_maxpool: False removes the stem max-pool (the reference deletes it for the BEV trunk).
        pretrained: None / 'none', a checkpoint path, or 'torchvision' (the ImageNet V1 file in the torch hub cache,
            downloaded once when absent).

    forward: x (B, in_channels, H, W) -> tuple of (B, C_i, H_i, W_i) for i in out_indices.
    """

    def __init__(self, depth, in_channels=3, stem_channels=None, base_channels=64, num_stages=4,
                 strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), out_indices=(0, 1, 2, 3), frozen_stages=-1,
                 norm_eval=False, zero_init_residual=True, with_maxpool=True, pretrained=None):
        super().__init__()
        if depth not in _ARCH_SETTINGS:
            raise ValueError(f'invalid ResNet depth {depth}: use one of {sorted(_ARCH_SETTINGS)}')
        if not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be 1..4, got {num_stages}')
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f'strides {strides} and dilations {dilations} need one entry per stage ({num_stages})')
        if not out_indices or max(out_indices) >= num_stages:
            raise ValueError(f'out_indices {out_indices} must be non-empty and index the {num_stages} stages')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be -1..{num_stages}, got {frozen_stages}')
        block_name, stage_blocks = _ARCH_SETTINGS[depth]
        self.block = BasicBlock if block_name == 'basic' else Bottleneck
        self.depth = depth
        self.stage_blocks = stage_blocks[:num_stages]
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        # Resolve now so a wrong path fails at construction, not at init_weights().
        self.pretrained_path = resolve_pretrained(pretrained, depth)
        self.pretrained_tensors_loaded = 0
        stem_channels = base_channels if stem_channels is None else stem_channels

        self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if with_maxpool else None

        inplanes = stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2**i
            layer = _make_res_layer(self.block, inplanes, planes, num_blocks, strides[i], dilations[i])
            inplanes = planes * self.block.expansion
            layer_name = f'layer{i + 1}'
            self.add_module(layer_name, layer)
            self.res_layers.append(layer_name)
        self.feat_dim = inplanes
        self._freeze_stages()

    def init_weights(self):
        """Load the pretrained checkpoint, or apply mmdet's default init (Kaiming convs, BN 1/0, zero residual)."""
        if self.pretrained_path is not None:
            self.load_pretrained(self.pretrained_path)
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode='fan_out', nonlinearity='relu')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_norm.weight)
                    nn.init.zeros_(module.last_norm.bias)

    def load_imagenet(self, source):
        """Load initial weights from ``source`` ('torchvision' = ImageNet IMAGENET1K_V1, downloaded once, or a
        checkpoint path) after construction; returns the number of tensors loaded."""
        path = resolve_pretrained(source, self.depth)
        self.pretrained_path = path
        return self.load_pretrained(path)

    def load_pretrained(self, path):
        """Copy a ResNet checkpoint into this module; ``fc.*`` may be left over, anything else must match.

        Returns the number of tensors loaded (also kept as ``self.pretrained_tensors_loaded``).
        """
        state_dict = _load_backbone_state_dict(path)
        own_state = self.state_dict()
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith('fc.')}
        unexpected = sorted(set(state_dict) - set(own_state))
        # Old torchvision files have no num_batches_tracked; those keep their fresh value.
        missing = sorted(key for key in set(own_state) - set(state_dict) if not key.endswith('num_batches_tracked'))
        wrong_shape = [f'{key} {tuple(value.shape)} vs {tuple(own_state[key].shape)}'
                       for key, value in state_dict.items() if key in own_state and value.shape != own_state[key].shape]
        if unexpected or missing or wrong_shape:
            raise PretrainedWeightsError(
                f'{path} is not a ResNet-{self.depth} checkpoint of this layout: {len(missing)} missing keys '
                f'{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong_shape)} shape '
                f'mismatches (file vs model) {wrong_shape[:3]}; pass a torchvision-layout ResNet-{self.depth} file '
                f'or --pretrained none')
        self.load_state_dict(state_dict, strict=False)
        self.pretrained_tensors_loaded = len(state_dict)
        return len(state_dict)

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            self.bn1.eval()
            for module in (self.conv1, self.bn1):
                for param in module.parameters():
                    param.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            layer = getattr(self, f'layer{i}')
            layer.eval()
            for param in layer.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        """Train mode that keeps frozen stages (and every BN when norm_eval) in eval mode, as mmdet."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x):
        """x (B, in_channels, H, W) -> tuple of stage outputs for ``out_indices``."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
