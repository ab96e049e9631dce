"""Samplers and dataset wrappers that make training order and augmentation reproducible and resumable.

Reference behaviour kept: the training order is Lightning's ``DistributedSampler(shuffle=True, seed)`` with
``set_epoch`` each epoch (Lightning's default for DDP), which is exactly ``ResumableDistributedSampler`` below;
evaluation uses ``DistributedSampler(shuffle=False)`` (padded to a multiple of the world size) or plain order.

For resume:
- ``ResumableDistributedSampler.resume(epoch, batches_done, batch_size)`` starts the epoch after the batches
  already trained, so a mid-epoch resume neither repeats nor skips samples;
- ``SeededSampleDataset`` draws each sample's augmentation from a seed derived from (seed, epoch, index), so
  the augmentation of a sample does not depend on how many samples the process (or a dataloader worker) has
  drawn before: identical across resumes, worker counts and prefetching. The reference drew from each worker's
  global numpy stream instead; the distribution of augmentations is the same.
"""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed, epoch, index):
    """A 32-bit seed for one (seed, epoch, dataset index) triple."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can begin an epoch part-way through (after a mid-epoch resume).

    Same order as ``torch.utils.data.DistributedSampler(dataset, num_replicas, rank, shuffle, seed)``: the
    permutation of epoch ``e`` is ``torch.randperm(n, generator=seed + e)``, padded to a multiple of
    ``num_replicas`` and split ``rank::num_replicas``. With one replica this is a seeded shuffle.

    Yields ``(index, epoch)`` pairs when ``with_epoch`` is set, for :class:`SeededSampleDataset`.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, with_epoch=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.with_epoch = with_epoch
        self._skip_samples = 0

    def resume(self, epoch, batches_done, batch_size):
        """Make the next iteration yield epoch ``epoch`` minus its first ``batches_done`` batches."""
        if batches_done < 0 or batches_done * batch_size > self.num_samples:
            raise ValueError(f'cannot resume after {batches_done} batches of {batch_size}: this rank has only '
                             f'{self.num_samples} samples per epoch (was the world size or batch size changed?)')
        self.epoch = int(epoch)
        self._skip_samples = int(batches_done) * int(batch_size)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self._skip_samples = 0
        super().set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip_samples = self._skip_samples, 0  # only the first iteration after resume() skips
        indices = indices[skip:]
        if self.with_epoch:
            return iter([(index, self.epoch) for index in indices])
        return iter(indices)


class SeededSampleDataset(Dataset):
    """Wraps a dataset so that ``item = dataset[index]`` runs with RNGs seeded from (seed, epoch, index).

    Indexed with ``(index, epoch)`` pairs from :class:`ResumableDistributedSampler` (``with_epoch=True``).
    A dataset with a ``reseed(seed)`` method (NuscDetDataset owns a numpy Generator) is reseeded through it;
    the global numpy / python / torch CPU generators are seeded too, and restored afterwards, so the training
    process's own random stream (dropout) is not disturbed by data loading.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        # Attributes of the wrapped dataset (e.g. ``infos``) stay reachable.
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, epoch = key
        seed = sample_seed(self.seed, epoch, index)
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        try:
            np.random.seed(seed)
            random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if hasattr(self.dataset, 'reseed'):
                    self.dataset.reseed(seed)
                return self.dataset[index]
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
