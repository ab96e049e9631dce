"""ResumableDistributedSampler and SeededSampleDataset: reference order, mid-epoch resume, per-sample seeds."""
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from bevdepth.engine.samplers import ResumableDistributedSampler, SeededSampleDataset, sample_seed


@pytest.mark.parametrize('num_replicas', [1, 2, 3])
def test_order_equals_torch_distributed_sampler(num_replicas):
    data = list(range(11))
    for rank in range(num_replicas):
        ours = ResumableDistributedSampler(data, num_replicas=num_replicas, rank=rank, seed=5)
        theirs = DistributedSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=5)
        for epoch in (0, 1, 7):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
    # Different epochs give different permutations.
    sampler = ResumableDistributedSampler(data, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_resume_skips_the_trained_batches_once():
    data = list(range(20))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=0)
    full.set_epoch(3)
    expected = list(full)
    sampler = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=0)
    sampler.resume(epoch=3, batches_done=2, batch_size=3)
    sampler.set_epoch(3)  # Lightning sets the same epoch again: the skip must survive it
    assert list(sampler) == expected[6:]
    assert list(sampler) == expected  # only the first iteration after resume() skips
    sampler.resume(epoch=3, batches_done=1, batch_size=3)
    sampler.set_epoch(4)  # a new epoch cancels a pending skip
    assert len(list(sampler)) == 10
    with pytest.raises(ValueError, match='world size or batch size'):
        sampler.resume(epoch=3, batches_done=5, batch_size=3)


def test_with_epoch_pairs_and_seeded_items():
    sampler = ResumableDistributedSampler(list(range(4)), seed=0, with_epoch=True)
    sampler.set_epoch(2)
    pairs = list(sampler)
    assert sorted(index for index, _ in pairs) == [0, 1, 2, 3] and {epoch for _, epoch in pairs} == {2}

    class Draws:
        def __init__(self):
            self.rng = np.random.default_rng(123)

        def reseed(self, seed):
            self.rng = np.random.default_rng(seed)

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return (float(self.rng.uniform()), float(np.random.uniform()), float(torch.rand(1)))

    dataset = SeededSampleDataset(Draws(), seed=7)
    np.random.seed(0)
    torch.manual_seed(0)
    outer = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    first = dataset[(1, 2)]
    assert dataset[(1, 2)] == first  # same (seed, epoch, index) -> same augmentation, whatever came before
    assert dataset[(1, 3)] != first and dataset[(2, 2)] != first
    # The caller's global RNG streams are untouched (dropout continues identically).
    assert np.array_equal(np.random.get_state()[1], outer[0]) and torch.equal(torch.get_rng_state(), outer[1])
    assert sample_seed(7, 2, 1) == sample_seed(7, 2, 1) != sample_seed(8, 2, 1)
    assert len(dataset) == 4
