"""Running an exported MatrixVT graph with onnxruntime (CPU) and decoding its outputs with the training code's
own decoder (``BEVDepthHead.get_bboxes``)."""
import json
import os

import numpy as np
import torch

from bevdepth.deploy.errors import DeployError
from bevdepth.deploy.onnx_export import HEAD_NAMES, IMAGE_INPUT_NAME, MATS_INPUT_NAMES, METADATA_KEY

__all__ = ['create_session', 'read_export_metadata', 'mats_mismatch', 'run_session', 'outputs_to_preds',
           'decode_outputs']


def create_session(onnx_path, num_threads=None):
    """An onnxruntime CPU session for ``onnx_path`` (clear error when the file is missing)."""
    import onnxruntime

    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f'ONNX model {onnx_path} not found; create it with scripts/export_onnx.py')
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    try:
        return onnxruntime.InferenceSession(onnx_path, sess_options=options, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...): a truncated or foreign file
        reason = ' '.join(str(error).split())[:200] or type(error).__name__
        raise DeployError(f'ONNX model {onnx_path} cannot be loaded ({reason}): re-export it with '
                          f'scripts/export_onnx.py') from None


def read_export_metadata(session):
    """The export metadata dict stored by ``export_onnx`` in the graph (dynamic_mats, baked_mats, ...)."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise DeployError('this ONNX file was not written by bevdepth.deploy.export_onnx (no export metadata); '
                          're-export it with scripts/export_onnx.py')
    return json.loads(props[METADATA_KEY])


def mats_mismatch(metadata, mats_dict, atol=1e-4):
    """Largest |difference| between a sample's matrices and the baked ones, or None if all within ``atol``.

    Returns (name, max_abs_diff) of the first matrix that differs; None for dynamic-mats graphs.
    """
    if metadata['dynamic_mats']:
        return None
    for name in MATS_INPUT_NAMES:
        baked = np.asarray(metadata['baked_mats'][name], dtype=np.float64)
        given = torch.as_tensor(mats_dict[name]).detach().cpu().double().numpy().reshape(baked.shape)
        diff = float(np.abs(baked - given).max())
        if diff > atol:
            return name, diff
    return None


def run_session(session, imgs, mats_dict=None):
    """Run the graph on one sample. imgs: (1, N, 3, H, W) or (1, 1, N, 3, H, W) tensor / array.
    Returns the list of output arrays in graph output order."""
    imgs = torch.as_tensor(imgs).detach().cpu().float()
    if imgs.dim() == 6:
        if imgs.shape[1] != 1:
            raise DeployError(f'ONNX MatrixVT takes the key frame only, got {imgs.shape[1]} sweeps')
        imgs = imgs[:, 0]
    feeds = {IMAGE_INPUT_NAME: imgs.numpy()}
    input_names = [i.name for i in session.get_inputs()]
    for name in input_names[1:]:
        if mats_dict is None:
            raise DeployError('this ONNX graph takes the camera matrices as inputs; pass mats_dict')
        value = torch.as_tensor(mats_dict[name]).detach().cpu().float()
        feeds[name] = value[:1, :1].numpy() if name != 'bda_mat' else value[:1].numpy()
    return session.run(None, feeds)


def outputs_to_preds(outputs, output_names):
    """Flat ONNX outputs -> the head's structure: tuple over tasks of [dict(reg, height, dim, rot, vel, heatmap)]
    of torch tensors, as returned by ``BEVDepthHead.forward``."""
    if len(outputs) != len(output_names):
        raise DeployError(f'got {len(outputs)} outputs for {len(output_names)} names')
    num_tasks = len(output_names) // len(HEAD_NAMES)
    preds = [[{}] for _ in range(num_tasks)]
    for name, value in zip(output_names, outputs):
        task, head = name.split('.')
        preds[int(task[len('task'):])][0][head] = torch.as_tensor(np.asarray(value))
    return tuple(preds)


def decode_outputs(head, outputs, output_names, img_metas):
    """Decode + circle-NMS ONNX outputs with the training code's decoder (``head.get_bboxes``).

    Returns per sample [boxes (n, 9), scores (n,), labels (n,)] as numpy arrays (like ``eval_step``).
    """
    preds = outputs_to_preds(outputs, output_names)
    results = head.get_bboxes(preds, img_metas)
    return [[item.detach().cpu().numpy() if torch.is_tensor(item) else np.asarray(item) for item in result[:3]]
            for result in results]
