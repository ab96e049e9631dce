"""mmdet-compatible ResNet: keys, torchvision weight loading, freezing, init, BEV-trunk layout."""
import pathlib

import pytest
import torch
import torchvision
from torch import nn

from bevdepth.layers.backbones.imagenet_weights import PretrainedWeightsError
from bevdepth.layers.backbones.resnet import BasicBlock, Bottleneck, ResNet

FIXTURE_KEYS = pathlib.Path(__file__).resolve().parents[2] / 'fixtures' / 'matrixvt_state_dict.txt'


def _reference_shapes(prefix):
    """{key without prefix: shape tuple} of the reference state-dict lines starting with ``prefix``."""
    shapes = {}
    for line in FIXTURE_KEYS.read_text().splitlines():
        key, shape = line.split(' ', 1)
        if key.startswith(prefix):
            shapes[key[len(prefix):]] = () if shape == 'scalar' else tuple(
                int(v) for v in shape.strip('(,)').split(',') if v.strip())
    return shapes


def _shapes(module):
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_resnet50_matches_reference_image_backbone_keys():
    model = ResNet(depth=50, frozen_stages=0, out_indices=[0, 1, 2, 3], norm_eval=False)
    assert _shapes(model) == _reference_shapes('backbone.img_backbone.')
    assert len(model.state_dict()) == 318


def test_bev_trunk_matches_reference_keys_and_shapes():
    trunk = ResNet(in_channels=80, depth=18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
                   out_indices=[0, 1, 2], norm_eval=False, base_channels=160, with_maxpool=False)
    assert _shapes(trunk) == _reference_shapes('head.trunk.')
    outs = trunk(torch.randn(1, 80, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 160, 16, 16), (1, 320, 8, 8), (1, 640, 4, 4)]
    assert trunk.maxpool is None


def test_loads_torchvision_resnet50_and_reproduces_its_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / 'tv_resnet50.pth'
    torch.save(reference.state_dict(), path)

    model = ResNet(depth=50, pretrained=str(path))
    model.init_weights()
    model.eval()
    own = model.state_dict()
    expected_keys = {k for k in reference.state_dict() if not k.startswith('fc.')}
    assert set(own) == expected_keys
    for key in expected_keys:
        assert torch.equal(own[key], reference.state_dict()[key]), key

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        feat = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            feat = layer(feat)
            expected.append(feat)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp)
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]


def test_torchvision_weights_are_the_v1_file_of_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise OSError('network blocked in tests')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(PretrainedWeightsError, match='resnet18-f37072fd.pth'):
        ResNet(depth=18, pretrained='torchvision')
    (tmp_path / 'checkpoints').mkdir(exist_ok=True)  # the failed download made it
    # torchvision's default (V2) file of another recipe is never taken for the V1 one.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / 'checkpoints' / 'resnet18-v2.pth')
    with pytest.raises(PretrainedWeightsError, match='resnet18-f37072fd.pth'):
        ResNet(depth=18, pretrained='torchvision')
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / 'checkpoints' / 'resnet18-f37072fd.pth')
    model = ResNet(depth=18, pretrained='torchvision')
    assert model.init_weights() is None and model.pretrained_tensors_loaded == 120  # fc.* left over
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_wrong_checkpoint_and_bad_arguments_raise(tmp_path):
    path = tmp_path / 'r18.pth'
    torch.save({'state_dict': torchvision.models.resnet18(weights=None).state_dict()}, path)
    model = ResNet(depth=34, pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match=r'not a ResNet-34 checkpoint of this layout: 80 missing keys'):
        model.init_weights()
    extra = torchvision.models.resnet18(weights=None).state_dict()
    extra['layer5.weight'] = torch.zeros(1)
    extra['conv1.weight'] = torch.zeros(64, 3, 3, 3)
    torch.save(extra, path)
    with pytest.raises(PretrainedWeightsError, match=r"1 unexpected keys \['layer5.weight'\], 1 shape mismatches "
                                                     r"\(file vs model\) \['conv1.weight \(64, 3, 3, 3\) vs "):
        ResNet(depth=18, pretrained=str(path)).init_weights()
    path.write_bytes(b'PK\x03\x04 truncated download')
    with pytest.raises(PretrainedWeightsError, match='cannot be read'):
        ResNet(depth=18, pretrained=str(path)).init_weights()
    assert ResNet(depth=18, pretrained='none').pretrained_path is None
    with pytest.raises(PretrainedWeightsError, match='does not exist'):
        ResNet(depth=18, pretrained=str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError, match='invalid ResNet depth'):
        ResNet(depth=42)
    with pytest.raises(ValueError, match='out_indices'):
        ResNet(depth=18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(0, 3))


def test_frozen_stem_stays_frozen_and_in_eval_mode():
    model = ResNet(depth=18, frozen_stages=0)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'conv1.weight', 'bn1.weight', 'bn1.bias'}
    model.train()
    assert not model.bn1.training
    assert model.layer1[0].bn1.training
    # The frozen BN's running stats must not move during training.
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)
    assert not torch.equal(model.layer1[0].bn1.running_mean, torch.zeros(64))

    model = ResNet(depth=18, frozen_stages=2)
    model.train()
    assert not model.layer2[0].bn1.training and model.layer3[0].bn1.training
    assert not any(p.requires_grad for p in model.layer2.parameters())


def test_norm_eval_keeps_every_bn_in_eval():
    model = ResNet(depth=18, norm_eval=True).train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training


def test_init_weights_kaiming_and_zero_init_residual():
    torch.manual_seed(0)
    model = ResNet(depth=18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(0, 1, 2),
                   in_channels=80, base_channels=160, with_maxpool=False)
    model.init_weights()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    for block in blocks:
        assert torch.count_nonzero(block.bn2.weight) == 0 and torch.count_nonzero(block.bn2.bias) == 0
        assert torch.all(block.bn1.weight == 1)
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k)).
    weight = model.layer3[0].conv2.weight
    expected_std = (2.0 / (weight.shape[0] * 9)) ** 0.5
    assert abs(weight.std().item() - expected_std) / expected_std < 0.05

    bottleneck_model = ResNet(depth=50, num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,))
    bottleneck_model.init_weights()
    for block in bottleneck_model.modules():
        if isinstance(block, Bottleneck):
            assert torch.count_nonzero(block.bn3.weight) == 0 and torch.all(block.bn2.weight == 1)

    no_zero = ResNet(depth=18, num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,),
                     zero_init_residual=False)
    no_zero.init_weights()
    assert torch.all(no_zero.layer1[0].bn2.weight == 1)


def test_basic_block_and_strides_dilations():
    block = BasicBlock(8, 8)
    assert [k for k in block.state_dict() if k.endswith('weight')] == ['conv1.weight', 'bn1.weight',
                                                                        'conv2.weight', 'bn2.weight']
    assert block(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)
    model = ResNet(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (8, 8), (8, 8)]
    assert model.layer4[0].conv1.dilation == (4, 4) and model.layer4[0].conv2.dilation == (1, 1)
