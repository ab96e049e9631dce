"""The bad-input table (docs/troubleshooting.md): every row stops with one clear line, or warns.

Each row checks three things: the line the user sees says what is wrong and how to fix it (a regex), the run
ends with a non-zero exit status (or the library raises), and no file that existed before was changed or
removed (dataroot, info files, earlier results).

How rows are driven:
- the experiment's command line. ``python exps/nuscenes/tiny/matrixvt_tiny_synthetic.py`` is run as a real
  process for the missing-dataroot row. The other CLI rows run the same file in this process with
  ``runpy.run_path(..., run_name='__main__')`` and a patched ``sys.argv``: the same code and the same
  ``error: ...`` line and exit status, without paying ~8 s of process start-up and imports per row;
- ``python scripts/gen_info.py`` as a real process for its rows;
- the library where the error only shows while loading a sample (images, LiDAR, depth cache), in the
  evaluator, or in the model constructor.
"""
import contextlib
import copy
import dataclasses
import io
import os
import pathlib
import pickle
import re
import runpy
import shutil
import subprocess
import sys
from typing import Callable, Optional

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_EXP = REPO_ROOT / 'exps' / 'nuscenes' / 'tiny' / 'matrixvt_tiny_synthetic.py'
GEN_INFO = REPO_ROOT / 'scripts' / 'gen_info.py'


@dataclasses.dataclass
class Outcome:
    """What the user sees: the error line (exception message, or the last ``error:``/``warning:`` line)."""
    line: str
    exit_code: Optional[int] = None     # None: raised in-process by the library (counts as failing)
    output: str = ''                    # everything the command printed (stdout + stderr)


@dataclasses.dataclass
class Context:
    tmp_path: pathlib.Path
    request: pytest.FixtureRequest

    @property
    def dataroot(self) -> pathlib.Path:
        return self.request.getfixturevalue('synthetic_dataroot')


# ------------------------------------------------------------------------------------------------ drivers
def _last_line(text, prefix=None):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if prefix is not None:
        lines = [line for line in lines if line.startswith(prefix)]
    return lines[-1] if lines else ''


def _cli_subprocess(ctx, *args, script=TINY_EXP, timeout=180):
    """``python <script> args`` as a real process; the line is the last line of its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ctx.tmp_path, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return Outcome(_last_line(result.stderr), exit_code=result.returncode, output=result.stdout + result.stderr)


def run_exp_in_process(argv, cwd):
    """Run the tiny experiment file as ``__main__`` with ``argv``; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, 'argv', [str(TINY_EXP), *map(str, argv)])
        patch.chdir(cwd)
        for name in ('PL_GLOBAL_SEED', 'PL_SEED_WORKERS', 'TORCH_DEVICE_BACKEND_AUTOLOAD'):
            # setenv records the original state (set or not), so what the run sets is undone afterwards
            # (seed_everything sets the PL_* ones, the experiment file TORCH_DEVICE_BACKEND_AUTOLOAD).
            patch.setenv(name, '')
            patch.delenv(name)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(TINY_EXP), run_name='__main__')
                status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def _cli(ctx, *args, workers=0):
    """The tiny experiment's CLI in this process; the line is the last line it wrote to stderr."""
    status, stdout, stderr = run_exp_in_process(
        [*args, '--default_root_dir', ctx.tmp_path / 'run', '--num_workers', workers], ctx.tmp_path)
    return Outcome(_last_line(stderr), exit_code=status, output=stdout + stderr)


def _raised(fn, *exception_types):
    with pytest.raises(exception_types) as info:
        fn()
    return Outcome(f'{type(info.value).__name__}: {info.value}')


def _train_infos(ctx):
    with open(ctx.dataroot / 'nuscenes_infos_train.pkl', 'rb') as f:
        return pickle.load(f)


def _dataset(ctx, infos, data_root=None, **kwargs):
    from bevdepth.configs import nuscenes, tiny
    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset

    info_path = ctx.tmp_path / 'infos.pkl'
    with open(info_path, 'wb') as f:
        pickle.dump(infos, f)
    return NuscDetDataset(ida_aug_conf=tiny.ida_aug_conf(), bda_aug_conf=tiny.bda_aug_conf(),
                          classes=nuscenes.CLASSES, data_root=data_root or ctx.dataroot, info_paths=[info_path],
                          is_train=False, **kwargs)


def _point_camera_at(ctx, infos, path, cam='CAM_FRONT'):
    """Make sample 0's ``cam`` image ``path`` (a file outside the dataroot, reached through a relative path)."""
    infos = copy.deepcopy(infos)
    infos[0]['cam_infos'][cam]['filename'] = os.path.relpath(path, ctx.dataroot)
    return infos


def _real_jpeg(ctx):
    info = _train_infos(ctx)[0]
    return (ctx.dataroot / info['cam_infos']['CAM_FRONT']['filename']).read_bytes()


def _first_camera():
    from bevdepth.configs import tiny
    return tiny.ida_aug_conf()['cams'][0]


def _dataroot_view(ctx, name, infos=None):
    """A dataroot that shares the synthetic tables (symlink) but has its own info files.

    ``infos=None``: the synthetic root's info files are copied, images are not reachable (another dataroot).
    ``infos=list``: the images are reachable too, and both splits hold ``infos``.
    """
    root = ctx.tmp_path / name
    root.mkdir()
    (root / 'v1.0-mini').symlink_to(ctx.dataroot / 'v1.0-mini', target_is_directory=True)
    for split in ('train', 'val'):
        target = root / f'nuscenes_infos_{split}.pkl'
        if infos is None:
            shutil.copyfile(ctx.dataroot / target.name, target)
        else:
            target.write_bytes(pickle.dumps(infos))
    if infos is not None:
        for folder in ('samples', 'sweeps', 'depth_gt'):
            (root / folder).symlink_to(ctx.dataroot / folder, target_is_directory=True)
    return root


# A tiny training run with -b 1 (one optimiser step): the batch-size-1 row reads its output, and the EMA
# weights it writes are a valid checkpoint for the rows that need one.
@pytest.fixture(scope='module')
def tiny_run_b1(synthetic_dataroot, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('tiny_run_b1')
    status, stdout, stderr = run_exp_in_process(
        ['--data_root', synthetic_dataroot, '--version', 'v1.0-mini', '-b', 1, '--max_epochs', 1,
         '--limit_train_batches', 1, '--num_workers', 0, '--default_root_dir', workdir / 'run'], workdir)
    output = stdout + stderr
    assert status == 0, output[-3000:]
    weights = sorted((workdir / 'run' / 'lightning_logs').glob('version_*/0.pth'))
    assert weights, output[-3000:]
    return status, output, weights[0]


# ---------------------------------------------------------------------------------------------------- rows
def missing_dataroot(ctx):
    return _cli_subprocess(ctx, '--data_root', ctx.tmp_path / 'no_such_dataroot', '--version', 'v1.0-mini')


def gen_info_missing_dataroot(ctx):
    return _cli_subprocess(ctx, '--dataroot', ctx.tmp_path / 'no_such_dataroot', '--version', 'v1.0-mini',
                           script=GEN_INFO)


def gen_info_missing_version_folder(ctx):
    # gen_info writes next to the tables by default: the good info files there must survive the failure.
    return _cli_subprocess(ctx, '--dataroot', ctx.dataroot, '--version', 'v1.0-trainval', script=GEN_INFO)


def _one_val_sample_dataroot(ctx):
    """The synthetic tables and images, with one val sample in both info files (keeps -e / training short)."""
    with open(ctx.dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        first = pickle.load(f)[:1]
    return _dataroot_view(ctx, 'one_sample_dataroot', infos=first)


def eval_with_wrong_version(ctx):
    weights = ctx.request.getfixturevalue('tiny_run_b1')[2]
    return _cli(ctx, '-e', '--ckpt_path', weights, '--data_root', _one_val_sample_dataroot(ctx),
                '--version', 'v1.0-trainval')


def train_with_wrong_version(ctx):
    return _cli(ctx, '--data_root', _one_val_sample_dataroot(ctx), '--version', 'v1.0-trainval', '-b', 1,
                '--max_epochs', 1, '--limit_train_batches', 1)


def unknown_version(ctx):
    from bevdepth.configs.nuscenes import CLASSES
    from bevdepth.evaluators.det_evaluators import DetNuscEvaluator

    evaluator = DetNuscEvaluator(CLASSES, data_root=ctx.dataroot, version='v2.0-mini', output_dir=ctx.tmp_path)
    return _raised(lambda: evaluator.eval_set, ValueError)


def info_of_another_dataroot(ctx):
    other_root = _dataroot_view(ctx, 'other_dataroot')
    return _cli(ctx, '--data_root', other_root, '--version', 'v1.0-mini', '--max_epochs', 1)


def missing_image(ctx):
    infos = _point_camera_at(ctx, _train_infos(ctx), ctx.tmp_path / 'missing' / 'CAM_FRONT.jpg')
    dataset = _dataset(ctx, infos)
    return _raised(lambda: dataset[0], ValueError)


def missing_image_in_dataloader_worker(ctx):
    """The usual way a missing image shows up: mid-training, read by a DataLoader worker process (which
    re-raises it as 'Caught DataError in DataLoader worker process 0. Original Traceback ...')."""
    infos = copy.deepcopy(_train_infos(ctx)[:2])
    first_cam = _first_camera()
    for index, info in enumerate(infos):
        for cam, cam_info in info['cam_infos'].items():
            if index > 0 or cam != first_cam:  # sample 0 keeps one image: the construction-time check passes
                cam_info['filename'] = f'samples/{cam}/missing.jpg'
    root = _dataroot_view(ctx, 'missing_images_dataroot', infos=infos)
    return _cli(ctx, '--data_root', root, '--version', 'v1.0-mini', '-b', 1, '--max_epochs', 1, workers=1)


def image_of_another_aspect_in_training(ctx):
    """A cropped copy (1600x800) of a camera image in the training split: the calibration no longer describes its
    pixels. Sample 1 holds it, so it is met mid-training, by the data loader."""
    import cv2

    cropped = ctx.tmp_path / 'cropped.jpg'
    image = cv2.imdecode(np.frombuffer(_real_jpeg(ctx), np.uint8), cv2.IMREAD_COLOR)
    cv2.imwrite(str(cropped), image[:image.shape[0] * 8 // 9])
    infos = copy.deepcopy(_train_infos(ctx)[:2])
    infos[1]['cam_infos']['CAM_FRONT']['filename'] = os.path.relpath(cropped, ctx.tmp_path / 'cropped_dataroot')
    root = _dataroot_view(ctx, 'cropped_dataroot', infos=infos)
    return _cli(ctx, '--data_root', root, '--version', 'v1.0-mini', '-b', 1, '--max_epochs', 1)


def truncated_jpeg(ctx):
    path = ctx.tmp_path / 'truncated.jpg'
    data = _real_jpeg(ctx)
    path.write_bytes(data[:len(data) // 2])
    dataset = _dataset(ctx, _point_camera_at(ctx, _train_infos(ctx), path))
    return _raised(lambda: dataset[0], ValueError)


def corrupt_jpeg(ctx):
    path = ctx.tmp_path / 'corrupt.jpg'
    path.write_bytes(b'\xff\xd8' + b'this is not image data' * 50 + b'\xff\xd9')
    dataset = _dataset(ctx, _point_camera_at(ctx, _train_infos(ctx), path))
    return _raised(lambda: dataset[0], ValueError)


def missing_lidar_file(ctx):
    infos = copy.deepcopy(_train_infos(ctx))
    infos[0]['lidar_infos']['LIDAR_TOP']['filename'] = 'samples/LIDAR_TOP/no_such_sweep.pcd.bin'
    return _raised(lambda: _dataset(ctx, infos, return_depth=True, depth_source='online'), ValueError)


def missing_depth_cache(ctx):
    path = ctx.tmp_path / 'image_without_depth_cache.jpg'
    path.write_bytes(_real_jpeg(ctx))
    infos = _point_camera_at(ctx, _train_infos(ctx), path, cam=_first_camera())
    return _raised(lambda: _dataset(ctx, infos, return_depth=True, depth_source='cache'), ValueError)


def empty_split(ctx):
    empty_root = _dataroot_view(ctx, 'empty_split_dataroot', infos=[])
    return _cli(ctx, '--data_root', empty_root, '--version', 'v1.0-mini', '--max_epochs', 1)


def checkpoint_does_not_exist(ctx):
    return _cli(ctx, '-e', '--ckpt_path', ctx.tmp_path / 'no_such.pth', '--data_root', ctx.dataroot,
                '--version', 'v1.0-mini')


def checkpoint_of_another_architecture(ctx):
    import torch
    path = ctx.tmp_path / 'other_arch.pth'
    torch.save({'epoch': 0, 'global_step': 0,
                'state_dict': {'model.backbone.img_backbone.conv1.weight': torch.zeros(64, 3, 3, 3),
                               'model.other_head.weight': torch.zeros(1)}}, path)
    return _cli(ctx, '-e', '--ckpt_path', path, '--data_root', ctx.dataroot, '--version', 'v1.0-mini')


def prediction_tokens_do_not_match(ctx):
    import numpy as np
    from bevdepth.configs.nuscenes import CLASSES
    from bevdepth.evaluators.det_evaluators import DetNuscEvaluator

    # A submission of an earlier evaluation sits in the output folder: it must not be overwritten.
    (ctx.tmp_path / 'results_nusc.json').write_text('{"meta": {}, "results": {}}')
    evaluator = DetNuscEvaluator(CLASSES, data_root=ctx.dataroot, version='v1.0-mini', output_dir=ctx.tmp_path)
    boxes = np.array([[10.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0, 0.0, 0.0]], dtype=np.float32)
    results = [(boxes, np.array([0.9], dtype=np.float32), np.array([0]))]
    meta = {'token': 'not_a_sample_of_mini_val', 'ego2global_translation': [0.0, 0.0, 0.0],
            'ego2global_rotation': [1.0, 0.0, 0.0, 0.0]}
    return _raised(lambda: evaluator.evaluate(results, [meta]), ValueError)


def batch_size_one(ctx):
    status, output, _ = ctx.request.getfixturevalue('tiny_run_b1')
    return Outcome(_last_line(output, prefix='warning:'), exit_code=status, output=output)


def non_square_bev_grid(ctx):
    from bevdepth.configs import tiny
    from bevdepth.layers.backbones.matrixvt import MatrixVT

    conf = tiny.backbone_conf()
    conf['y_bound'] = [-25.6, 25.6, 1.6]
    return _raised(lambda: MatrixVT(**conf), ValueError)


def learning_rate_zero(ctx):
    return _cli(ctx, '--learning_rate', '0', '--data_root', ctx.dataroot, '--version', 'v1.0-mini')


def learning_rate_negative(ctx):
    return _cli(ctx, '--learning_rate', '-0.0002', '--data_root', ctx.dataroot, '--version', 'v1.0-mini')


@dataclasses.dataclass
class Row:
    name: str
    drive: Callable[[Context], Outcome]
    message: str                     # regex the line must match (re.search)
    exit_code: Optional[int] = None  # CLI rows: the expected exit status (the library rows raise)


ERROR = 1  # bad input files / data (bevdepth/engine/entry_point.py)
USAGE = 2  # flags that cannot work (argparse's status too)

ROWS = [
    Row('missing dataroot', missing_dataroot,
        r'^error: nuScenes dataroot \S*no_such_dataroot not found: pass --data_root <dataroot>', ERROR),
    Row('gen_info: missing dataroot', gen_info_missing_dataroot,
        r'^error: nuScenes dataroot \S*no_such_dataroot does not exist: pass --dataroot', 1),
    Row('gen_info: missing version folder', gen_info_missing_version_folder,
        r'^error: nuScenes dataroot \S+ has no v1\.0-trainval/ folder of tables: .* pass the --version you have', 1),
    Row('-e with a version folder that is not in the dataroot', eval_with_wrong_version,
        r"^error: nuScenes tables 'v1\.0-trainval' not found under \S*one_sample_dataroot: pass --data_root "
        r'<dataroot> and the matching --version', ERROR),
    Row('training with a version folder that is not in the dataroot', train_with_wrong_version,
        r"^error: nuScenes tables 'v1\.0-trainval' not found under \S*one_sample_dataroot: pass --data_root "
        r'<dataroot> and the matching --version', ERROR),
    Row('unknown version name', unknown_version,
        r"^ValueError: cannot evaluate nuScenes version 'v2\.0-mini': only \[.*'v1\.0-mini'.*\] have annotated"),
    Row('info file from another dataroot/version', info_of_another_dataroot,
        r'^error: info file \S*other_dataroot/nuscenes_infos_train\.pkl was generated for another dataroot or '
        r"version: none of its first sample's images .* exist under data_root \S*other_dataroot; regenerate it",
        ERROR),
    Row('missing image', missing_image,
        r'^DataError: image file \S*missing/CAM_FRONT\.jpg does not exist: check data_root'),
    Row('missing image, read in a DataLoader worker during training', missing_image_in_dataloader_worker,
        r'^error: image file \S*missing_images_dataroot/samples/CAM_\w+/missing\.jpg does not exist: check data_root',
        ERROR),
    Row('image of another aspect ratio than its calibration, met during training', image_of_another_aspect_in_training,
        r'^error: image file \S*cropped\.jpg is 1600x800 \(aspect 2\.000\) but its calibration describes 1600x900 '
        r'\(aspect 1\.778\): the intrinsics do not fit these pixels', ERROR),
    Row('truncated JPEG', truncated_jpeg,
        r'^DataError: image file \S*truncated\.jpg is a truncated JPEG \(no end-of-image marker\)'),
    Row('corrupt JPEG', corrupt_jpeg,
        r'^DataError: image file \S*corrupt\.jpg is corrupt or not an image OpenCV can decode'),
    Row('missing LiDAR file', missing_lidar_file,
        r'^DataError: LiDAR file \S*no_such_sweep\.pcd\.bin does not exist: extract the nuScenes LiDAR blobs'),
    Row('missing depth cache', missing_depth_cache,
        r'^DataError: depth cache \S*image_without_depth_cache\S* is missing: run python scripts/gen_depth_gt\.py'),
    Row('empty split', empty_split,
        r'^error: info file\(s\) \S*empty_split_dataroot/nuscenes_infos_train\.pkl hold zero samples: the split is '
        r'empty', ERROR),
    Row('checkpoint path does not exist', checkpoint_does_not_exist,
        r'^error: checkpoint \S*no_such\.pth does not exist: check --ckpt_path', ERROR),
    Row('checkpoint of another architecture', checkpoint_of_another_architecture,
        r'^error: checkpoint \S*other_arch\.pth does not fit MatrixVTTinyExp \(another architecture or '
        r"config\?\): \d+ missing keys \['[^']+', .*1 unexpected keys \['other_head\.weight'\], "
        r"1 shape mismatches \(checkpoint vs model\) \['backbone\.img_backbone\.conv1\.weight", ERROR),
    Row('prediction tokens do not match the split', prediction_tokens_do_not_match,
        r"^SubmissionMismatchError: prediction tokens do not match split 'mini_val': 1 predicted, \d+ in the split, "
        r"\d+ missing \(e\.g\. .*\), 1 extra \(e\.g\. \['not_a_sample_of_mini_val'\]\)"),
    Row('batch size 1 per device with BatchNorm (warning, training goes on)', batch_size_one,
        r'^warning: .*batch_size_per_device 1\b.*BatchNorm.*-b 2', 0),
    Row('non-square BEV grid for MatrixVT', non_square_bev_grid,
        r'^ValueError: MatrixVT needs a square BEV grid, got 64 x 32 cells'),
    Row('--learning_rate 0', learning_rate_zero,
        r'^error: --learning_rate must be > 0, got 0\.0$', USAGE),
    Row('--learning_rate negative', learning_rate_negative,
        r'^error: --learning_rate must be > 0, got -0\.0002$', USAGE),
]


def _file_states(*folders):
    """{path: (inode, size, mtime_ns)} of every file under ``folders`` (symlinks not followed)."""
    states = {}
    for folder in folders:
        for path in pathlib.Path(folder).rglob('*'):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                states[path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return states


@pytest.mark.parametrize('row', ROWS, ids=[row.name for row in ROWS])
def test_bad_input_stops_with_one_clear_line(row, tmp_path, request, synthetic_dataroot):
    if row.drive in (gen_info_missing_dataroot, gen_info_missing_version_folder) and not GEN_INFO.is_file():
        pytest.fail(f'{GEN_INFO} does not exist')
    before = _file_states(synthetic_dataroot, tmp_path)
    outcome = row.drive(Context(tmp_path, request))
    print(f'[{row.name}] exit {outcome.exit_code}: {outcome.line}')  # the line docs/troubleshooting.md quotes
    assert '\n' not in outcome.line
    assert re.search(row.message, outcome.line), (outcome.line, outcome.output[-3000:])
    if row.exit_code is not None:
        assert outcome.exit_code == row.exit_code, outcome.output[-3000:]
    after = _file_states(synthetic_dataroot, tmp_path)
    changed = [str(path) for path, state in before.items() if after.get(path) != state]
    assert changed == [], f'files changed or removed by a failed command: {changed[:5]}'
