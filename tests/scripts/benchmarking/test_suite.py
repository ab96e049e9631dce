"""benchmarking.suite helpers checked without a benchmark run: the reference loop on hand-computed cells and the
interleaved timing order."""
import pytest
import torch

from benchmarking.suite import measure_interleaved, reference_loop_ring_ray


def test_reference_loop_matches_hand_computed_cells():
    # One camera, W = 2 columns, D = 2 bins, H = 1 row, L = 4 cells per side; cell units = metres here.
    geom = torch.tensor([[[[[[0.5, 0.5, 0.0], [1.5, 2.5, 0.0]]],  # bin 0: (x, y) cells (0, 0), (1, 2)
                           [[[0.5, 0.5, 0.0], [-0.5, 9.0, 0.0]]]]]])  # bin 1: (0, 0) again, truncation to (0, 9)
    ring, ray = reference_loop_ring_ray(geom, torch.tensor([0.5, 0.5, 0.5]), torch.ones(3), 4)
    assert ring.shape == (1, 2, 16) and ray.shape == (1, 2, 16)
    assert ring[0, 0].nonzero().view(-1).tolist() == [0, 2 * 4 + 1]
    assert ring[0, 1].nonzero().view(-1).tolist() == [0]  # (0, 9) is invalid -> null cell, zeroed
    assert ray[0, 0].nonzero().view(-1).tolist() == [0]  # ray 0 hits cell 0 twice: binary, not 2
    assert ray[0, 0, 0] == 1
    assert ray[0, 1].nonzero().view(-1).tolist() == [9]


def test_measure_interleaved_times_warm_runs():
    calls = []
    times = measure_interleaved(dict(short=lambda: calls.append('short'), long=lambda: calls.append('long')),
                                repeats=3, warmup=1, rewarm_below_s=1.0)
    # warm-up round, then every timed run right after an untimed one of the same callable
    assert calls == ['short', 'long'] + ['short', 'short', 'long', 'long'] * 3
    assert all(len(value['runs_s']) == 3 for value in times.values())
    calls.clear()
    measure_interleaved(dict(a=lambda: calls.append('a')), repeats=2, warmup=1, rewarm_below_s=0.0)
    assert calls == ['a'] * 3  # callables slower than rewarm_below_s are their own warm-up


def test_contended_mode_starts_and_stops_its_competitor():
    from benchmarking.suite import competitor

    with competitor() as process:
        assert process.poll() is None  # busy beside the measurement
    assert process.poll() is not None  # stopped afterwards
    with pytest.raises(RuntimeError):
        with competitor() as process:
            raise RuntimeError('a failing measurement')
    assert process.poll() is not None
