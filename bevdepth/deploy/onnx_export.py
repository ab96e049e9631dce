"""ONNX export of MatrixVT_Det and decoding of onnxruntime outputs with the training code's own decoder.

What is exported: the eval-mode network (upstream ``MatrixVT_Det``, whose forward is ``BaseBEVDepth.forward``) from
the 6 camera images to the raw head maps; decoding (top-k, circle NMS) stays in Python and reuses
``BEVDepthHead.get_bboxes``, so ONNX boxes go through exactly the code used for the PyTorch evaluation.

Two graph variants:

- ``dynamic_mats=False`` (default): the calibration of one sample is baked in. The ring / ray matrices
  (``MatrixVT.get_proj_mat``, binary (1, D, X*Y) and (1, N*W, X*Y)) are computed once in PyTorch and stored as
  constants through the backbone's ``static_mat`` hook; the 27 DepthNet camera numbers become constants too. Graph
  input: ``imgs`` (1, N, 3, H, W). Valid for every sample with the same matrices (nuScenes: same vehicle log at eval,
  because the eval ida / bda are fixed and the key-frame sensor2ego is the per-log camera extrinsic).
- ``dynamic_mats=True``: the 4x4 matrices are graph inputs too (``sensor2ego_mats``, ``intrin_mats``,
  ``ida_mats`` (1, 1, N, 4, 4), ``bda_mat`` (1, 4, 4)); the ring / ray matrices are built inside the graph by
  the model's own ``get_proj_mat`` (ScatterElements / ScatterND of ones, non-accumulating, which is the
  reference's binary semantics). ONNX has no matrix inverse, so ``aten::linalg_inv`` of 4x4 matrices is
  exported as an explicit adjugate / determinant expression (``inverse_4x4``).

Deformable convolution (DepthNet.depth_conv[4]):

- ``dcn='native'``: ONNX ``DeformConv`` (opset >= 19); onnxruntime's CPU provider runs it (measured with 1.32).
- ``dcn='grid_sample'``: a pure decomposition (GridSample bilinear sampling of the 9 taps + a grouped 1x1
  Conv), opset >= 16, for runtimes without ``DeformConv``. Same numbers up to float rounding.

Graph outputs are a flat tuple named ``task{t}.{reg,height,dim,rot,vel,heatmap}`` in task order.

Without a trained checkpoint, ``randomise_for_parity`` + ``calibrate_heatmap_bias`` turn a fresh model into a
meaningful parity-test subject (see docs/deployment.md). Bad input raises ``DeployError``.
"""
import contextlib
import io
import json
import warnings

import numpy as np
import torch

from bevdepth.deploy.errors import DeployError
from bevdepth.deploy.onnx_ops import dcn_mode, register_onnx_symbolics
from bevdepth.utils.io import atomic_write_bytes

__all__ = ['HEAD_NAMES', 'MATS_INPUT_NAMES', 'IMAGE_INPUT_NAME', 'DEFAULT_OPSET', 'DCN_MODES', 'METADATA_KEY',
           'head_output_names', 'MatrixVTExportWrapper', 'export_onnx']

HEAD_NAMES = ('reg', 'height', 'dim', 'rot', 'vel', 'heatmap')
IMAGE_INPUT_NAME = 'imgs'
# Matrices the network reads (DepthNet's 27 mlp_input numbers, the frustum geometry); MatrixVT does not read
# sensor2sensor_mats.
MATS_INPUT_NAMES = ('sensor2ego_mats', 'intrin_mats', 'ida_mats', 'bda_mat')
DEFAULT_OPSET = 19
DCN_MODES = ('native', 'grid_sample')
METADATA_KEY = 'bevdepth_export'
# Native DeformConv entered the ONNX standard in opset 19; GridSample in opset 16.
_MIN_OPSET = {'native': 19, 'grid_sample': 16}


def head_output_names(num_tasks):
    """Graph output names in output order: task0.reg, task0.height, ..., task{T-1}.heatmap."""
    return [f'task{task}.{name}' for task in range(num_tasks) for name in HEAD_NAMES]


# --------------------------------------------------------------------------------------------------------
# Export wrapper
# --------------------------------------------------------------------------------------------------------
def _batch_one_mats(sample_mats, num_cams):
    """Check and normalise a mats dict to batch 1, float32: (1, 1, N, 4, 4) camera mats, (1, 4, 4) bda."""
    mats = {}
    for name in MATS_INPUT_NAMES:
        if name not in sample_mats:
            raise DeployError(f'sample_mats is missing {name!r}; pass the mats_dict of one collated sample '
                              f'(keys {", ".join(MATS_INPUT_NAMES)})')
        value = torch.as_tensor(sample_mats[name]).detach().to(torch.float32).cpu()
        expected = (1, 4, 4) if name == 'bda_mat' else (1, 1, num_cams, 4, 4)
        if value.numel() == int(np.prod(expected)):
            value = value.reshape(expected)
        if tuple(value.shape) != expected:
            raise DeployError(f'sample_mats[{name!r}] has shape {tuple(value.shape)}, expected {expected} '
                              f'(one sample, key frame only)')
        mats[name] = value
    return mats


class MatrixVTExportWrapper(torch.nn.Module):
    """Inference graph of ``MatrixVT_Det``: images [+ matrices] -> flat tuple of head maps.

    forward(imgs (1, N, 3, H, W)) for baked calibration, or
    forward(imgs, sensor2ego_mats (1, 1, N, 4, 4), intrin_mats, ida_mats, bda_mat (1, 4, 4)) with
    ``dynamic_mats=True``. Returns T * 6 tensors (B, C, Y, X) in ``head_output_names`` order.

    The baked variant expects the backbone's ``static_mat`` to hold the sample's (ring, ray) matrices while it
    is traced (``export_onnx`` arranges that); the dynamic variant needs ``static_mat`` to be None.
    """

    def __init__(self, model, sample_mats, dynamic_mats=False):
        super().__init__()
        self.model = model
        self.dynamic_mats = dynamic_mats
        self.num_cams = int(torch.as_tensor(sample_mats['sensor2ego_mats']).shape[-3])
        for name, value in _batch_one_mats(sample_mats, self.num_cams).items():
            self.register_buffer(name, value, persistent=False)

    def mats_dict(self):
        return {name: getattr(self, name) for name in MATS_INPUT_NAMES}

    def forward(self, imgs, *mats):
        if self.dynamic_mats:
            if len(mats) != len(MATS_INPUT_NAMES):
                raise DeployError(f'dynamic-mats wrapper takes imgs and {len(MATS_INPUT_NAMES)} matrices '
                                  f'({", ".join(MATS_INPUT_NAMES)}), got {len(mats)}')
            mats_dict = dict(zip(MATS_INPUT_NAMES, mats))
        else:
            mats_dict = self.mats_dict()
        preds = self.model(imgs.unsqueeze(1), mats_dict)
        return tuple(task_preds[0][name] for task_preds in preds for name in HEAD_NAMES)


@contextlib.contextmanager
def _export_state(model, static_mat):
    """Eval mode, dense projection, no projection cache and the given ``static_mat`` (None: built from the
    matrices) for the duration; everything is restored afterwards, so exporting never changes the caller's
    model."""
    backbone = model.backbone
    saved = dict(static_mat=backbone.static_mat, projection=backbone.projection,
                 auto_cache=getattr(backbone, 'auto_cache', None))
    was_training = model.training
    model.eval()
    try:
        backbone.projection = 'dense'  # sparse index structures have no fixed-shape ONNX form
        backbone.static_mat = static_mat
        if saved['auto_cache'] is not None:
            # A cache hit during tracing would freeze one calibration into a dynamic-mats graph.
            backbone.auto_cache = False
        yield
    finally:
        for name, value in saved.items():
            if value is not None or name == 'static_mat':
                setattr(backbone, name, value)
        model.train(was_training)


def _proj_mat_for(model, mats_dict):
    """The dense (ring (1, D, L2), ray (1, R, L2)) matrices of one sample, freshly built by the backbone."""
    with _export_state(model, None), torch.no_grad():
        ring, ray = model.backbone.get_proj_mat(mats_dict, projection='dense')
    return ring.detach().clone(), ray.detach().clone()


def export_onnx(model, sample_mats, out_path, opset=DEFAULT_OPSET, dynamic_mats=False, dcn='native',
                image_size=None, settings=None):
    """Export ``model`` (a ``MatrixVT_Det``) to ONNX at ``out_path`` (written atomically).

    Args:
        model: MatrixVT_Det on CPU (moved to CPU for export if it is not).
        sample_mats: mats_dict of one collated sample: sensor2ego_mats / intrin_mats / ida_mats (1, 1, N, 4, 4)
            and bda_mat (1, 4, 4). Baked into the graph unless ``dynamic_mats``; always the trace example.
        out_path: destination .onnx file.
        opset: ONNX opset (>= 19 for dcn='native', >= 16 for dcn='grid_sample').
        dynamic_mats: make the matrices graph inputs (see module docstring).
        dcn: 'native' (ONNX DeformConv) or 'grid_sample' (decomposition).
        image_size: (H, W) of the input images; defaults to the backbone's ``final_dim``.
        settings: the structural settings of the model's experiment, kept in the metadata so inference rebuilds
            the same experiment (bevdepth/configs/settings.py).
    Returns:
        dict of the export metadata (also stored in the model's ``metadata_props``).
    """
    import onnx

    if dcn not in DCN_MODES:
        raise DeployError(f'dcn must be one of {DCN_MODES}, got {dcn!r}')
    if opset < _MIN_OPSET[dcn]:
        raise DeployError(f'dcn={dcn!r} needs opset >= {_MIN_OPSET[dcn]}, got {opset}')
    if not hasattr(model, 'backbone') or not hasattr(model.backbone, 'static_mat'):
        raise DeployError('export_onnx expects a MatrixVT_Det (model.backbone.static_mat is missing)')
    model = model.cpu()
    image_h, image_w = image_size or model.backbone.final_dim
    wrapper = MatrixVTExportWrapper(model, sample_mats, dynamic_mats=dynamic_mats)
    num_cams = wrapper.num_cams
    mats_dict = wrapper.mats_dict()
    imgs = torch.zeros(1, num_cams, 3, image_h, image_w)
    num_tasks = len(model.head.task_heads)
    output_names = head_output_names(num_tasks)
    input_names = [IMAGE_INPUT_NAME] + (list(MATS_INPUT_NAMES) if dynamic_mats else [])
    args = (imgs,) + (tuple(mats_dict[name] for name in MATS_INPUT_NAMES) if dynamic_mats else ())

    register_onnx_symbolics(opset)
    baked = None if dynamic_mats else _proj_mat_for(model, mats_dict)
    buffer = io.BytesIO()
    with _export_state(model, baked), dcn_mode(model, dcn), torch.no_grad(), \
            warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deliberate: torch 2.14's default dynamo exporter
        # needs the onnxscript package (not a dependency) and its own translation tables for our custom
        # symbolics. Its deprecation notice and the tracer's shape-check warnings are noise here.
        warnings.filterwarnings('ignore', category=DeprecationWarning, message='.*legacy TorchScript-based ONNX')
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, do_constant_folding=True)

    metadata = dict(
        dynamic_mats=bool(dynamic_mats), dcn=dcn, opset=int(opset), num_cams=num_cams,
        image_size=[int(image_h), int(image_w)], num_tasks=num_tasks, output_names=output_names,
        input_names=input_names,
        baked_mats=None if dynamic_mats else {name: mats_dict[name].tolist() for name in MATS_INPUT_NAMES},
        settings=dict(settings or {}),
    )
    onnx_model = onnx.load_from_string(buffer.getvalue())
    entry = onnx_model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata)
    atomic_write_bytes(out_path, onnx_model.SerializeToString())
    return metadata
