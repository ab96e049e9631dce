"""torchvision ImageNet V1 weights: cache look-up, download (blocked here), waiting for local rank 0."""
import os
import threading
import urllib.error

import pytest
import torch

from bevdepth.layers.backbones import imagenet_weights
from bevdepth.layers.backbones.imagenet_weights import PretrainedWeightsError


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    return tmp_path


def test_v1_file_names_and_cache_folder(torch_home):
    assert imagenet_weights.weights_file_name(50) == 'resnet50-0676ba61.pth'
    assert imagenet_weights.weights_url(50) == 'https://download.pytorch.org/models/resnet50-0676ba61.pth'
    assert imagenet_weights.cache_dir() == os.path.join(str(torch_home), 'hub', 'checkpoints')


def test_offline_without_the_file_gives_one_line_naming_file_folder_and_flags(torch_home, monkeypatch):
    calls = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(PretrainedWeightsError) as error:
        imagenet_weights.download_weights(50, timeout_s=1)
    message = str(error.value)
    assert '\n' not in message
    for part in ('resnet50-0676ba61.pth', imagenet_weights.cache_dir(), '--pretrained PATH', '--pretrained none',
                 'name resolution'):
        assert part in message
    assert calls == [(imagenet_weights.weights_url(50), '0676ba61')]  # sha256 prefix checked on download
    assert not os.listdir(imagenet_weights.cache_dir())  # nothing half-written


def test_download_happens_once_then_the_cache_is_used(torch_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        torch.save({'x': torch.zeros(1)}, dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    first = imagenet_weights.download_weights(50)
    second = imagenet_weights.download_weights(50)
    assert first == second == imagenet_weights.cached_weights_path(50) and os.path.isfile(first)
    assert len(calls) == 1


def test_other_ranks_wait_for_the_file(torch_home):
    with pytest.raises(PretrainedWeightsError, match='local rank 0 did not provide it within 0 s'):
        imagenet_weights.wait_for_weights(50, timeout_s=0)
    os.makedirs(imagenet_weights.cache_dir())
    writer = threading.Timer(0.2, lambda: open(imagenet_weights.cached_weights_path(50), 'wb').close())
    writer.start()
    assert imagenet_weights.wait_for_weights(50, timeout_s=10) == imagenet_weights.cached_weights_path(50)
    writer.join()
