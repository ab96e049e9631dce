"""Deployment: ONNX export of MatrixVT_Det and onnxruntime inference (see docs/deployment.md).

onnx_export: the export wrapper and ``export_onnx``; onnx_ops: the ONNX translations it needs (4x4 inverse,
DeformConv / GridSample DCN, trace-safe projection); onnx_runtime: sessions, running and decoding;
experiment_loading: experiment files and checkpoints; parity: test subjects without a checkpoint.
"""
from bevdepth.deploy.errors import DeployError
from bevdepth.deploy.experiment_loading import (build_experiment, build_experiment_for_checkpoint, load_experiment_class,
                                                load_model_weights)
from bevdepth.deploy.onnx_export import (DCN_MODES, DEFAULT_OPSET, HEAD_NAMES, MATS_INPUT_NAMES,
                                         MatrixVTExportWrapper, export_onnx, head_output_names)
from bevdepth.deploy.onnx_ops import dcn_mode, deform_conv2d_grid_sample, inverse_4x4, register_onnx_symbolics
from bevdepth.deploy.onnx_runtime import (create_session, decode_outputs, mats_mismatch, outputs_to_preds,
                                          read_export_metadata, run_session)
from bevdepth.deploy.parity import calibrate_heatmap_bias, randomise_for_parity

__all__ = ['DCN_MODES', 'DEFAULT_OPSET', 'DeployError', 'HEAD_NAMES', 'MATS_INPUT_NAMES', 'MatrixVTExportWrapper',
           'build_experiment', 'build_experiment_for_checkpoint', 'calibrate_heatmap_bias', 'create_session', 'dcn_mode', 'decode_outputs',
           'deform_conv2d_grid_sample', 'export_onnx', 'head_output_names', 'inverse_4x4', 'load_experiment_class',
           'load_model_weights', 'mats_mismatch', 'outputs_to_preds', 'randomise_for_parity', 'read_export_metadata',
           'register_onnx_symbolics', 'run_session']
