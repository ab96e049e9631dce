"""BaseLSSFPN (LSS path): frustum, geometry round trip, splat against a naive accumulation, sweeps, shapes."""
import math

import pytest
import torch

from bevdepth.configs import nuscenes as nus_conf
from bevdepth.configs import tiny as tiny_conf
from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN, create_frustum, frustum_to_ego

FINAL_DIM = (64, 192)  # feature map 4 x 12; width a multiple of 32 for the ResNet / FPN strides


def test_reference_frustum():
    frustum = create_frustum((256, 704), 16, [2.0, 58.0, 0.5])
    assert frustum.shape == (112, 16, 44, 4)
    torch.testing.assert_close(frustum[0, 0, :, 0], torch.linspace(0, 703, 44))
    torch.testing.assert_close(frustum[0, :, 0, 1], torch.linspace(0, 255, 16))
    torch.testing.assert_close(frustum[:, 0, 0, 2], torch.arange(2.0, 58.0, 0.5))
    assert torch.all(frustum[..., 3] == 1)


def rotation_z(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def make_mats(batch_size=2, num_cams=6, num_sweeps=1, seed=0, final_dim=FINAL_DIM):
    """Cameras looking outward around the ego, with a mild random image / BEV transform."""
    gen = torch.Generator().manual_seed(seed)
    sensor2ego = torch.zeros(batch_size, num_sweeps, num_cams, 4, 4)
    intrin = torch.zeros(batch_size, num_sweeps, num_cams, 4, 4)
    ida = torch.zeros(batch_size, num_sweeps, num_cams, 4, 4)
    cam_axes = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # ego <- camera for yaw 0
    for n in range(num_cams):
        yaw = 2 * math.pi * n / num_cams
        sensor2ego[:, :, n, :3, :3] = rotation_z(yaw) @ cam_axes
        sensor2ego[:, :, n, :3, 3] = torch.tensor([math.cos(yaw), math.sin(yaw), 1.5])
        sensor2ego[:, :, n, 3, 3] = 1
        scale = final_dim[1] / 1600
        intrin[:, :, n] = torch.diag(torch.tensor([1266.0 * scale, 1266.0 * scale, 1.0, 1.0]))
        intrin[:, :, n, 0, 2], intrin[:, :, n, 1, 2] = 800 * scale, 450 * scale
    ida[:] = torch.eye(4)
    ida[..., 0, 0] += 0.05 * torch.randn(batch_size, num_sweeps, num_cams, generator=gen)
    ida[..., 0, 1] = 0.05 * torch.randn(batch_size, num_sweeps, num_cams, generator=gen)
    ida[..., :2, 3] = 3 * torch.randn(batch_size, num_sweeps, num_cams, 2, generator=gen)
    bda = torch.eye(4).repeat(batch_size, 1, 1)
    bda[:, :3, :3] = rotation_z(0.3) * 1.02
    return dict(sensor2ego_mats=sensor2ego, intrin_mats=intrin, ida_mats=ida,
                sensor2sensor_mats=torch.eye(4).expand(batch_size, num_sweeps, num_cams, 4, 4).clone(), bda_mat=bda)


def test_geometry_round_trip():
    """Ego points projected back through bda^-1, ego->camera, K and ida give the frustum's (u, v, d)."""
    frustum = create_frustum(FINAL_DIM, 16, [2.0, 10.0, 2.0])
    mats = make_mats(batch_size=2, num_cams=3, seed=1)
    s2e, intrin, ida, bda = (mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                             mats['bda_mat'])
    geom = frustum_to_ego(frustum, s2e, intrin, ida, bda).double()
    assert geom.shape == (2, 3, 4, 4, 12, 3)
    b, n = 1, 2
    points = torch.cat([geom[b, n].reshape(-1, 3), torch.ones(geom[b, n].numel() // 3, 1, dtype=torch.float64)], 1)
    cam = torch.inverse(bda[b].double() @ s2e[b, n].double()) @ points.T  # (4, P) camera frame
    pix = intrin[b, n].double() @ cam
    uvd = torch.stack([pix[0] / pix[2], pix[1] / pix[2], cam[2], torch.ones_like(cam[2])])
    aug = ida[b, n].double() @ uvd
    torch.testing.assert_close(aug[:3].T, frustum.reshape(-1, 4)[:, :3].double(), rtol=1e-4, atol=1e-3)


def test_geometry_without_bda_matches_identity_bda():
    frustum = create_frustum(FINAL_DIM, 16, [2.0, 10.0, 2.0])
    mats = make_mats(batch_size=1, num_cams=2)
    args = (frustum, mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0])
    torch.testing.assert_close(frustum_to_ego(*args, None), frustum_to_ego(*args, torch.eye(4)[None]))


def tiny_conf_small_images(**overrides):
    conf = tiny_conf.backbone_conf()
    conf['final_dim'] = FINAL_DIM
    conf.update(overrides)
    return conf


@pytest.fixture(scope='module')
def tiny_lss():
    torch.manual_seed(0)
    return BaseLSSFPN(**tiny_conf_small_images())


def test_buffers_in_reference_order(tiny_lss):
    keys = list(tiny_lss.state_dict())
    assert keys[:4] == ['voxel_size', 'voxel_coord', 'voxel_num', 'frustum']
    assert tiny_lss.voxel_num.tolist() == [64, 64, 1]
    full = nus_conf.backbone_conf()
    assert [int(round((b[1] - b[0]) / b[2])) for b in (full['x_bound'], full['y_bound'], full['z_bound'])] == [128,
                                                                                                            128, 1]


def naive_splat(model, depth_feature, mats):
    """Per camera and depth bin, accumulate depth * context of every in-range pixel into its (y, x) cell."""
    num_depth, channels = model.depth_channels, model.output_channels
    depth = depth_feature[:, :num_depth].softmax(1)
    context = depth_feature[:, num_depth:num_depth + channels]
    geom = model.get_geometry(mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                              mats['bda_mat'])
    cells = ((geom - (model.voxel_coord - model.voxel_size / 2.0)) / model.voxel_size).int().long()
    batch_size, num_cams = geom.shape[:2]
    num_x, num_y, num_z = model.voxel_num.tolist()
    bev = torch.zeros(batch_size, channels, num_y, num_x)
    for b in range(batch_size):
        for n in range(num_cams):
            cam = b * num_cams + n
            for d in range(num_depth):
                x, y, z = cells[b, n, d].unbind(-1)  # (h, w)
                kept = (x >= 0) & (x < num_x) & (y >= 0) & (y < num_y) & (z >= 0) & (z < num_z)
                values = (depth[cam, d][kept][:, None] * context[cam].permute(1, 2, 0)[kept])  # (k, C)
                bev[b].index_put_((torch.arange(channels)[None, :].expand_as(values), y[kept][:, None].expand_as(
                    values), x[kept][:, None].expand_as(values)), values, accumulate=True)
    return bev


def test_splat_matches_naive_accumulation(tiny_lss):
    model = tiny_lss.eval()
    mats = make_mats(batch_size=2, seed=3)
    imgs = torch.randn(2, 1, 6, 3, *FINAL_DIM)
    with torch.no_grad():
        feats = model.get_cam_feats(imgs)[:, 0]
        depth_feature = model.depth_net(feats.reshape(12, *feats.shape[2:]), mats)
        bev, depth = model(imgs, mats, is_return_depth=True)
    assert bev.shape == (2, 32, 64, 64) and depth.shape == (12, 56, 4, 12)
    expected = naive_splat(model, depth_feature, mats)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(bev, expected, rtol=1e-4, atol=1e-5)


def test_training_backward_and_sweeps(tiny_lss):
    model = tiny_lss.train()
    mats = make_mats(batch_size=1, num_sweeps=2, seed=4)
    bev, depth = model(torch.randn(1, 2, 6, 3, *FINAL_DIM), mats, is_return_depth=True)
    assert bev.shape == (1, 64, 64, 64) and depth.shape == (6, 56, 4, 12)
    weight = model.depth_net.context_conv.weight
    (sweep_grad,) = torch.autograd.grad(bev[:, 32:].sum(), weight, retain_graph=True, allow_unused=True)
    assert sweep_grad is None or torch.count_nonzero(sweep_grad) == 0  # only the key frame carries gradient
    (key_grad,) = torch.autograd.grad(bev[:, :32].sum(), weight)
    assert torch.count_nonzero(key_grad) > 0


def test_use_da_and_bad_input():
    torch.manual_seed(0)
    model = BaseLSSFPN(**tiny_conf_small_images(), use_da=True).eval()
    assert any(k.startswith('depth_aggregation_net.') for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(1, 1, 6, 3, *FINAL_DIM), make_mats(batch_size=1)).shape == (1, 32, 64, 64)
    with pytest.raises(ValueError, match='sweep_imgs must be'):
        model(torch.randn(1, 6, 3, *FINAL_DIM), make_mats(batch_size=1))
