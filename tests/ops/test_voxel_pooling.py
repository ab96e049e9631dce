"""Pure-PyTorch LSS voxel pooling vs a naive loop (values, gradients, out-of-range drops)."""
import pytest
import torch

from bevdepth.ops.voxel_pooling import voxel_pooling


def naive_voxel_pooling(geom, feats, voxel_num):
    num_x, num_y, num_z = voxel_num
    batch = geom.shape[0]
    num_channels = feats.shape[-1]
    out = torch.zeros(batch, num_channels, num_y, num_x, dtype=feats.dtype)
    geom_flat = geom.reshape(batch, -1, 3)
    feat_flat = feats.reshape(batch, -1, num_channels)
    for b in range(batch):
        for p in range(geom_flat.shape[1]):
            x, y, z = (int(v) for v in geom_flat[b, p])
            if 0 <= x < num_x and 0 <= y < num_y and 0 <= z < num_z:
                out[b, :, y, x] += feat_flat[b, p]
    return out


def make_inputs(seed, shape=(2, 2, 3, 2, 4), channels=5, voxel_num=(6, 5, 2)):
    gen = torch.Generator().manual_seed(seed)
    coords = []
    for n in voxel_num:
        # include out-of-range values on both sides
        coords.append(torch.randint(-2, n + 2, shape, generator=gen))
    geom = torch.stack(coords, -1).int()
    feats = torch.randn(*shape, channels, generator=gen, dtype=torch.float64)
    return geom, feats, torch.tensor(voxel_num)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_naive_loop(seed):
    geom, feats, voxel_num = make_inputs(seed)
    out = voxel_pooling(geom, feats, voxel_num)
    assert out.shape == (2, 5, 5, 6)
    torch.testing.assert_close(out, naive_voxel_pooling(geom, feats, voxel_num.tolist()), rtol=1e-12, atol=1e-12)


def test_gradient_is_cell_gradient_for_kept_and_zero_for_dropped():
    geom, feats, voxel_num = make_inputs(3)
    feats.requires_grad_(True)
    grad_out = torch.randn(2, 5, 5, 6, dtype=torch.float64)
    (voxel_pooling(geom, feats, voxel_num) * grad_out).sum().backward()

    expected = torch.zeros_like(feats)
    num_x, num_y, num_z = voxel_num.tolist()
    geom_flat = geom.reshape(2, -1, 3)
    expected_flat = expected.view(2, -1, feats.shape[-1])
    for b in range(2):
        for p in range(geom_flat.shape[1]):
            x, y, z = geom_flat[b, p].tolist()
            if 0 <= x < num_x and 0 <= y < num_y and 0 <= z < num_z:
                expected_flat[b, p] = grad_out[b, :, y, x]
    torch.testing.assert_close(feats.grad, expected, rtol=0, atol=0)


def test_all_points_dropped_gives_zeros():
    geom, feats, voxel_num = make_inputs(4)
    geom[..., 2] = 7  # z out of range everywhere
    out = voxel_pooling(geom, feats, voxel_num)
    assert torch.count_nonzero(out) == 0


def test_gradcheck_small():
    geom, feats, voxel_num = make_inputs(5, shape=(1, 1, 2, 2, 2), channels=2, voxel_num=(3, 3, 1))
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: voxel_pooling(geom, f, voxel_num), (feats,))


def test_shape_mismatch_raises():
    geom, feats, voxel_num = make_inputs(6)
    with pytest.raises(ValueError, match='geom_xyz'):
        voxel_pooling(geom[..., :2], feats, voxel_num)
