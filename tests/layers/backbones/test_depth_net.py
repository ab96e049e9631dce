"""DepthNet and its parts: output shape, mlp_input layout, reference state-dict keys, init rules."""
import pathlib

import pytest
import torch

from bevdepth.layers.backbones.depth_net import ASPP, DepthNet, Mlp, SELayer, get_mlp_input
from bevdepth.ops.deform_conv import DeformConv2dPack

SPEC_STATE_DICT = pathlib.Path(__file__).resolve().parents[2] / 'fixtures' / 'matrixvt_state_dict.txt'  # the 912 reference keys


def random_mats(batch_size, num_cams, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        sensor2ego_mats=torch.randn(batch_size, 1, num_cams, 4, 4, generator=gen),
        intrin_mats=torch.randn(batch_size, 1, num_cams, 4, 4, generator=gen),
        ida_mats=torch.randn(batch_size, 1, num_cams, 4, 4, generator=gen),
        sensor2sensor_mats=torch.randn(batch_size, 1, num_cams, 4, 4, generator=gen),
        bda_mat=torch.randn(batch_size, 4, 4, generator=gen),
    )


def test_mlp_input_layout():
    mats = random_mats(2, 3)
    mlp_input = get_mlp_input(mats)
    assert mlp_input.shape == (6, 27)
    b, n = 1, 2
    intrin, ida = mats['intrin_mats'][b, 0, n], mats['ida_mats'][b, 0, n]
    bda, s2e = mats['bda_mat'][b], mats['sensor2ego_mats'][b, 0, n]
    expected = torch.stack([
        intrin[0, 0], intrin[1, 1], intrin[0, 2], intrin[1, 2],
        ida[0, 0], ida[0, 1], ida[0, 3], ida[1, 0], ida[1, 1], ida[1, 3],
        bda[0, 0], bda[0, 1], bda[1, 0], bda[1, 1], bda[2, 2],
        *s2e[:3, :].reshape(-1),
    ])
    assert torch.equal(mlp_input[b * 3 + n], expected)


def test_mlp_input_uses_key_frame_and_identity_bda_default():
    mats = random_mats(1, 2)
    two_sweeps = {k: (torch.cat([v, torch.randn_like(v)], 1) if k != 'bda_mat' else v) for k, v in mats.items()}
    assert torch.equal(get_mlp_input(two_sweeps), get_mlp_input(mats))
    no_bda = {k: v for k, v in mats.items() if k != 'bda_mat'}
    assert get_mlp_input(no_bda)[:, 10:15].tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]] * 2


def test_output_shape_and_gradients():
    torch.manual_seed(0)
    net = DepthNet(in_channels=16, mid_channels=16, context_channels=8, depth_channels=12)
    x = torch.randn(2 * 3, 16, 4, 11, requires_grad=True)
    out = net(x, random_mats(2, 3))
    assert out.shape == (6, 12 + 8, 4, 11)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert net.depth_mlp.fc1.weight.grad is not None and net.context_se.conv_expand.weight.grad is not None


def test_eval_is_deterministic():
    torch.manual_seed(0)
    net = DepthNet(16, 16, 8, 12).eval()
    x = torch.randn(3, 16, 4, 5)
    mats = random_mats(1, 3)
    torch.testing.assert_close(net(x, mats), net(x, mats))


def test_parts():
    mlp = Mlp(27, 32, 16)
    assert mlp(torch.randn(5, 27)).shape == (5, 16)
    se = SELayer(8)
    x = torch.randn(2, 8, 3, 3)
    gate = torch.sigmoid(se.conv_expand(torch.relu(se.conv_reduce(torch.ones(2, 8, 1, 1)))))
    torch.testing.assert_close(se(x, torch.ones(2, 8, 1, 1)), x * gate)
    aspp = ASPP(8, 4).eval()
    assert aspp(torch.randn(2, 8, 5, 7)).shape == (2, 4, 5, 7)
    assert torch.all(aspp.bn1.weight == 1) and torch.all(aspp.aspp2.bn.bias == 0)


def test_dcn_config_of_reference():
    net = DepthNet(16, 16, 8, 12)
    dcn = net.depth_conv[4]
    assert isinstance(dcn, DeformConv2dPack)
    assert dcn.groups == 4 and dcn.deform_groups == 1 and dcn.padding == (1, 1)
    assert tuple(dcn.weight.shape) == (16, 4, 3, 3) and tuple(dcn.conv_offset.weight.shape) == (18, 16, 3, 3)
    assert net.depth_conv[3].dropout.p == 0.5


def test_full_size_state_dict_matches_reference():
    if not SPEC_STATE_DICT.is_file():
        pytest.skip('tests/fixtures/matrixvt_state_dict.txt not present')
    prefix = 'backbone.depth_net.'
    expected = []
    for line in SPEC_STATE_DICT.read_text().splitlines():
        key, shape = line.split(' ', 1)
        if key.startswith(prefix):
            dims = () if shape == 'scalar' else tuple(int(v) for v in shape.strip('()').split(',') if v.strip())
            expected.append((key[len(prefix):], dims))
    net = DepthNet(512, 512, 80, 112)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected
    assert len(expected) == 107
