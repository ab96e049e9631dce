"""Self-check of a GPU / NPU machine (or the CPU subset without one): parity with CPU, training, throughput.

    PYTHONPATH=. python scripts/check_accelerator.py [--out check_accelerator.json] [--sample-root DIR]

Needs only PyTorch, torchvision, Lightning, NumPy and OpenCV (no nuScenes devkit, no pyquaternion, no network).
With a CUDA GPU or an Ascend NPU it runs every item (about 3-5 minutes on one device); without one it says so
in one line and runs the CPU subset: the forced device-branch parity checks and 3 training steps of the tiny
config. Prints one PASS / FAIL / SKIP line per item, writes all figures to the JSON file, and exits 1 on any
FAIL. docs/npu.md explains each line.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')  # torch_npu without CANN would break `import torch`
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Parity tolerance: max |device - cpu| / max |cpu| per output (TF32 is switched off for the comparison).
REL_TOL = 2e-3
TRAIN_STEPS = 30
FULL_EXP = 'exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py'
TINY_EXP = 'exps/nuscenes/tiny/matrixvt_tiny_synthetic.py'


def load_exp(relative_path, class_name):
    spec = importlib.util.spec_from_file_location(os.path.basename(relative_path)[:-3],
                                                  os.path.join(REPO_ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


# ------------------------------------------------------------------------------------------------- device
def pick_device(requested):
    """(torch.device, one-line description). 'auto': NPU, else CUDA, else CPU."""
    from bevdepth.engine import devices
    if requested in ('auto', 'npu') and devices.is_npu_available():
        return torch.device('npu', 0), 'npu'
    if requested == 'npu':
        raise SystemExit(f'error: --device npu but no NPU is usable: {devices.npu_unavailable_reason()}')
    if requested in ('auto', 'cuda') and torch.cuda.is_available():
        return torch.device('cuda', 0), 'cuda'
    if requested == 'cuda':
        raise SystemExit('error: --device cuda but torch.cuda.is_available() is False')
    return torch.device('cpu'), 'cpu'


def device_count(kind):
    if kind == 'cuda':
        return torch.cuda.device_count()
    if kind == 'npu':
        return int(torch.npu.device_count())
    return 0


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == 'npu':
        torch.npu.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    if device.type == 'npu':
        return torch.npu.max_memory_allocated(device) / 2 ** 30
    return None


def environment(device, kind):
    import pytorch_lightning as pl
    info = dict(python=platform.python_version(), torch=torch.__version__, lightning=pl.__version__,
                numpy=np.__version__, device=kind, host=platform.node())
    try:
        import torchvision
        info['torchvision'] = torchvision.__version__
    except ImportError as error:
        info['torchvision'] = f'missing ({error})'
    if kind == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), device_count=device_count(kind))
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True, timeout=20).stdout.split('\n')[0]
        except (OSError, subprocess.SubprocessError) as error:
            info['driver'] = f'unknown ({type(error).__name__})'
    elif kind == 'npu':
        import torch_npu
        info.update(device_name=torch.npu.get_device_name(0), torch_npu=torch_npu.__version__,
                    device_count=device_count(kind), cann=os.environ.get('ASCEND_TOOLKIT_HOME', 'unknown'))
    return info


# ------------------------------------------------------------------------------------------------- inputs
def camera_rig(final_dim, num_cams=6):
    """Six nuScenes-like cameras (yaws near 55, 0, -55, 110, 180, -110 deg: off the axes, so no frustum point
    lies exactly on a cell border) on 1600x900 images resized to final_dim:
    sensor2ego, intrin, ida (N, 4, 4) float32."""
    height, width = final_dim
    resize = max(height / 900.0, width / 1600.0)
    crop_top = int(900 * resize) - height
    sensor2ego, intrin, ida = [], [], []
    for yaw_deg in (55.3, 0.7, -54.6, 110.2, 179.4, -109.8)[:num_cams]:
        yaw = math.radians(yaw_deg)
        forward, right = np.array([math.cos(yaw), math.sin(yaw), 0.0]), np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        mat = np.eye(4)
        mat[:3, :3] = np.stack([right, np.array([0.0, 0.0, -1.0]), forward], 1)
        mat[:3, 3] = [1.03 + 0.6 * math.cos(yaw), 0.51 * math.sin(yaw), 1.55]
        sensor2ego.append(mat)
        k = np.eye(4)
        k[0, 0] = k[1, 1] = 1266.0
        k[0, 2], k[1, 2] = 816.0, 491.0
        intrin.append(k)
        a = np.eye(4)
        a[0, 0] = a[1, 1] = resize
        a[1, 3] = -crop_top
        ida.append(a)
    return [torch.tensor(np.stack(m), dtype=torch.float32) for m in (sensor2ego, intrin, ida)]


def synthetic_batch(exp, batch_size, seed=0):
    """A training batch in the collate format: random images, the camera rig, a few GT boxes per sample and
    depth labels from a ground plane (so the depth loss has valid pixels)."""
    gen = torch.Generator().manual_seed(seed)
    conf = exp.backbone_conf
    height, width = conf['final_dim']
    num_cams = 6
    sensor2ego, intrin, ida = camera_rig((height, width), num_cams)
    mats = dict(sensor2ego_mats=sensor2ego.expand(batch_size, 1, num_cams, 4, 4).clone(),
                intrin_mats=intrin.expand(batch_size, 1, num_cams, 4, 4).clone(),
                ida_mats=ida.expand(batch_size, 1, num_cams, 4, 4).clone(),
                sensor2sensor_mats=torch.eye(4).expand(batch_size, 1, num_cams, 4, 4).clone(),
                bda_mat=torch.eye(4).expand(batch_size, 4, 4).clone())
    imgs = torch.randn(batch_size, 1, num_cams, 3, height, width, generator=gen)
    timestamps = torch.zeros(batch_size, 1, num_cams)
    num_classes = len(exp.class_names)
    gt_boxes, gt_labels = [], []
    for _ in range(batch_size):
        count = 4
        centre = torch.rand(count, 2, generator=gen) * 60 - 30
        boxes = torch.cat([centre, torch.full((count, 1), -1.0), torch.tensor([[4.5, 1.9, 1.6]]).repeat(count, 1),
                           torch.rand(count, 1, generator=gen) * 6 - 3, torch.zeros(count, 2)], 1)
        gt_boxes.append(boxes)
        gt_labels.append(torch.randint(0, num_classes, (count,), generator=gen))
    # Depth of a ground plane 1.55 m below the cameras, rows below the horizon only (zeros = no label).
    rows = torch.arange(height, dtype=torch.float32).view(height, 1).expand(height, width)
    focal = 1266.0 * ida[0, 0, 0]
    horizon = 491.0 * ida[0, 1, 1] + ida[0, 1, 3]
    below = (rows - horizon).clamp(min=1e-3)
    depth = torch.where(rows > horizon + 2, (1.55 * focal / below).clamp(max=conf['d_bound'][1] - 1), 0.0)
    depth_labels = depth.expand(batch_size, 1, num_cams, height, width).clone()
    img_metas = [dict(token=f'synthetic_{i}') for i in range(batch_size)]
    return [imgs, mats, timestamps, img_metas, gt_boxes, gt_labels, depth_labels]


def real_batch(exp, batch_size):
    """One real training sample from ``exp.data_root`` (its nuscenes_infos_train.pkl), repeated."""
    from bevdepth.datasets.nusc_det_dataset import collate_fn
    dataset = exp.build_dataset(exp.train_info_paths, is_train=False)
    return collate_fn([dataset[0]] * batch_size, is_return_depth=False), dataset


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [to_device(value, device) for value in batch]
    return batch


def flat_tensors(value):
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in flat_tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flat_tensors(item)]
    return []


def rel_error(actual, expected):
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------- checks
def check_forced_branches(tiny_cls):
    """The GPU / NPU branches forced on CPU tensors (bevdepth.ops.device_branch) equal the CPU path."""
    from bevdepth.ops import deform_conv
    from bevdepth.ops.device_branch import force_device_branch
    from bevdepth.ops.ring_ray_projection import build_sparse_projection
    torch.manual_seed(0)
    exp = tiny_cls(batch_size_per_device=2, num_workers=0)
    exp.eval()
    backbone = exp.model.backbone
    batch = synthetic_batch(exp, 2)
    imgs, mats = batch[0], batch[1]
    details, failures = {}, []
    cells = backbone.get_geom_cells(mats, dtype=torch.int32)
    expected = build_sparse_projection(cells, backbone.bev_size)
    for branch in ('cuda', 'npu'):
        with force_device_branch(branch):
            forced = build_sparse_projection(cells, backbone.bev_size)
        same = all(torch.equal(getattr(forced, f), getattr(expected, f))
                   for f in ('pair_row', 'pair_cell', 'triple_pair', 'triple_depth', 'cell_crow'))
        details[f'sparse_build_{branch}_branch_identical'] = same
        if not same:
            failures.append(f'sparse build through the {branch} branch differs')
    with torch.no_grad():
        with force_device_branch('npu'):
            backbone._proj_cache = None
            slow_cells = backbone.get_geom_cells(mats)
            npu_bev, npu_depth = backbone(imgs, mats, is_return_depth=True)
            mode = backbone._proj_cache[1]
        # The CPU path (sparse projection) on the same cells: the float32 reference cells may differ from the
        # float64 fast ones for a point within rounding of a cell border, so the cells are compared separately.
        backbone.static_mat = build_sparse_projection(slow_cells, backbone.bev_size)
        ref_bev, ref_depth = backbone(imgs, mats, is_return_depth=True)
        backbone.static_mat = backbone._proj_cache = None
    flipped = float((slow_cells != backbone.get_geom_cells(mats)).any(-1).float().mean())
    details.update(npu_branch_projection=mode, npu_branch_bev_rel_error=rel_error(npu_bev, ref_bev),
                   npu_branch_depth_rel_error=rel_error(npu_depth, ref_depth), npu_branch_cells_differing=flipped)
    if mode != 'dense':
        failures.append(f'npu branch chose the {mode} projection, expected dense')
    if details['npu_branch_bev_rel_error'] > 1e-4 or details['npu_branch_depth_rel_error'] > 1e-5:
        failures.append('npu branch (dense projection) differs from the CPU path on the same cells')
    if flipped > 1e-4:
        failures.append(f'reference cells differ from the fast cells for {flipped:.2%} of the points')
    dcn = deform_conv.DeformConv2dPack(16, 16, 3, padding=1)
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.1)
    x = torch.randn(2, 16, 12, 20)
    with torch.no_grad():
        with force_device_branch('cuda'):
            tv_out = dcn(x)
        details['dcn_torchvision_vs_grid_sample_rel_error'] = rel_error(tv_out, dcn(x))
    if details['dcn_torchvision_vs_grid_sample_rel_error'] > 1e-4:
        failures.append('DCN torchvision branch differs from grid_sample')
    # fp32 islands under a forced 'cuda' branch switch CUDA autocast off (its state exists without a GPU).
    seen = []
    hook = backbone.horiconv.merger.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled('cuda')))
    try:
        torch.set_autocast_enabled('cuda', True)
        with torch.no_grad(), force_device_branch('cuda'):
            backbone.horiconv(torch.randn(2, backbone.output_channels, 4, 8))
    finally:
        torch.set_autocast_enabled('cuda', False)
        hook.remove()
    details['cuda_branch_islands_autocast_off'] = seen == [False]
    if seen != [False]:
        failures.append('fp32 island left CUDA autocast on under the cuda branch')
    return failures, details


class LossRecorder:
    """Lightning callback: the training loss of every step, and the wall time of the steps after ``warmup``."""

    def __new__(cls, device, warmup=0):
        import pytorch_lightning as pl

        class _Recorder(pl.Callback):
            def __init__(self):
                self.losses, self.times, self._start = [], [], None

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx >= warmup:
                    from bevdepth.engine.devices import synchronize
                    synchronize(device)
                    self._start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                loss = outputs['loss'] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss.detach()))
                if self._start is not None:
                    from bevdepth.engine.devices import synchronize
                    synchronize(device)
                    self.times.append(time.perf_counter() - self._start)
                    self._start = None
        return _Recorder()


def _identity(item):
    return item


def fit(exp, batches, kind, precision, device_index=0, warmup=0, num_workers=0, devices=1):
    """Run ``len(batches)`` real training steps of ``exp`` through pl.Trainer.fit; returns the recorder."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    from bevdepth.datasets.nusc_det_dataset import collate_fn
    from bevdepth.engine.devices import trainer_device_kwargs
    accelerator = {'cuda': 'cuda', 'npu': 'npu', 'cpu': 'cpu'}[kind]
    kwargs = trainer_device_kwargs(accelerator=accelerator, devices=[device_index] if kind != 'cpu' else 1,
                                   precision=precision)
    recorder = LossRecorder(torch.device(kind, device_index) if kind != 'cpu' else torch.device('cpu'), warmup)
    trainer = pl.Trainer(**kwargs, max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[recorder], default_root_dir=tempfile.mkdtemp())
    if isinstance(batches, torch.utils.data.Dataset):
        loader = DataLoader(batches, batch_size=exp.batch_size_per_device, num_workers=num_workers,
                            collate_fn=lambda items: collate_fn(items, is_return_depth=True),
                            pin_memory=kind == 'cuda', persistent_workers=num_workers > 0)
    else:  # ready batches, one per step (batch_size=None: no re-batching)
        loader = DataLoader(batches, batch_size=None, collate_fn=_identity)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trainer.fit(exp, train_dataloaders=loader)
    return recorder


def check_training(exp_factory, batch, kind, precision, steps):
    exp = exp_factory()
    recorder = fit(exp, [batch] * steps, kind, precision)
    losses = recorder.losses
    details = dict(precision=precision, steps=len(losses), losses=[round(v, 5) for v in losses])
    failures = []
    if len(losses) != steps or not all(math.isfinite(v) for v in losses):
        failures.append(f'{len(losses)} of {steps} steps ran, non-finite loss: {losses}')
    elif steps >= 20:
        first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
        details.update(mean_first10=first, mean_last10=last)
        if not last < first:
            failures.append(f'loss did not fall: mean of the last 10 {last:.4f} >= first 10 {first:.4f}')
    return failures, details


def check_forward_parity(full_cls, batch, device):
    """Full R50 MatrixVT, seeded weights, eval: device vs CPU (BEV, depth, head maps), sparse vs dense on the
    device, DCN on the device vs CPU."""
    from bevdepth.ops.deform_conv import DeformConv2dPack
    torch.manual_seed(0)
    exp = full_cls(batch_size_per_device=1, num_workers=0)
    model = exp.model.eval()
    imgs, mats = batch[0][:1], {k: v[:1] for k, v in batch[1].items()}
    captured = {}
    model.backbone.register_forward_hook(lambda _m, _i, out: captured.__setitem__('bev', out))

    def run(dev):
        model.to(dev)
        with torch.no_grad():
            model.backbone.is_return_depth = True
            preds = model(imgs.to(dev), to_device(mats, dev))
            _, depth = model.backbone(imgs.to(dev), to_device(mats, dev), is_return_depth=True)
        return flat_tensors(captured['bev'])[0].cpu(), depth.cpu(), [t.cpu() for t in flat_tensors(preds)]

    failures, details = [], {}
    with no_tf32():
        cpu_bev, cpu_depth, cpu_heads = run(torch.device('cpu'))
        dev_bev, dev_depth, dev_heads = run(device)
        details.update(bev_rel_error=rel_error(dev_bev, cpu_bev), depth_rel_error=rel_error(dev_depth, cpu_depth),
                       head_rel_error=max(rel_error(a, b) for a, b in zip(dev_heads, cpu_heads)))
        model.backbone.projection = 'dense' if model.backbone.projection != 'dense' else 'sparse'
        model.backbone._proj_cache = None
        other_bev, _, _ = run(device)
        details['device_sparse_vs_dense_bev_rel_error'] = rel_error(other_bev, dev_bev)
        model.backbone.projection = 'auto'
        torch.manual_seed(1)
        dcn = DeformConv2dPack(64, 64, 3, padding=1)
        torch.nn.init.normal_(dcn.conv_offset.weight, std=0.05)
        x = torch.randn(2, 64, 16, 44)
        with torch.no_grad():
            cpu_out = dcn(x)
            dev_out = dcn.to(device)(x.to(device))
        details['dcn_rel_error'] = rel_error(dev_out, cpu_out)
    model.cpu()
    for key, value in details.items():
        if value > REL_TOL:
            failures.append(f'{key} {value:.2e} > {REL_TOL:g}')
    return failures, details


def check_throughput(make_exp, make_batch, kind, device, loader_dataset, steps=12, warmup=4):
    """Training (-b 8, fp16 AMP, 1 device) and evaluation samples/s, in-memory batches and through a
    DataLoader; peak device memory. ``make_exp(batch_size, num_workers)`` builds the experiment."""
    details = {}
    batch_size = 8
    batch = make_batch(batch_size)
    reset_peak_memory(device)
    torch.manual_seed(0)
    recorder = fit(make_exp(batch_size, 0), [batch] * steps, kind, 16, warmup=warmup)
    details['train_samples_per_s_in_memory'] = batch_size * len(recorder.times) / sum(recorder.times)
    details['train_peak_memory_gib'] = peak_memory_gib(device)
    workers = min(8, os.cpu_count() or 1)
    recorder = fit(make_exp(batch_size, workers), loader_dataset(batch_size * steps), kind, 16, warmup=warmup,
                   num_workers=workers)
    details['train_samples_per_s_loader'] = batch_size * len(recorder.times) / sum(recorder.times)
    details['loader_workers'] = workers
    from bevdepth.engine.devices import synchronize
    model = make_exp(batch_size, 0).model.to(device).eval()
    imgs, mats = batch[0].to(device), to_device(batch[1], device)
    reset_peak_memory(device)
    with torch.no_grad(), torch.autocast(device_type=kind, dtype=torch.float16):
        for index in range(warmup + steps):
            if index == warmup:
                synchronize(device)
                start = time.perf_counter()
            model(imgs, mats)
        synchronize(device)
    seconds = time.perf_counter() - start
    details['eval_samples_per_s_in_memory'] = batch_size * steps / seconds
    details['eval_images_per_s_in_memory'] = 6 * details['eval_samples_per_s_in_memory']
    from torch.utils.data import DataLoader
    from bevdepth.datasets.nusc_det_dataset import collate_fn
    loader = DataLoader(loader_dataset(batch_size * (warmup + steps)), batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda items: collate_fn(items, is_return_depth=True), pin_memory=kind == 'cuda')
    with torch.no_grad(), torch.autocast(device_type=kind, dtype=torch.float16):
        for index, item in enumerate(loader):
            if index == warmup:
                synchronize(device)
                start = time.perf_counter()
            model(item[0].to(device, non_blocking=True), to_device(item[1], device))
        synchronize(device)
    details['eval_samples_per_s_loader'] = batch_size * steps / (time.perf_counter() - start)
    details['eval_images_per_s_loader'] = 6 * details['eval_samples_per_s_loader']
    details['eval_peak_memory_gib'] = peak_memory_gib(device)
    model.cpu()
    return [], details


class SampleDataset(torch.utils.data.Dataset):
    """``length`` items in the dataset's per-sample format: the real sample's (decoded each time, as in
    training) or, without ``--sample-root``, one synthetic sample (no decoding: the loader figure then
    measures collation and host-to-device copies only)."""

    def __init__(self, length, dataset=None, sample=None):
        self.length, self.dataset, self.sample = length, dataset, sample

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.dataset[0] if self.dataset is not None else self.sample


def single_sample(batch):
    """Per-sample tuple of the dataset from a collated batch of size 1 (the collate_fn's input format)."""
    imgs, mats, timestamps, img_metas, gt_boxes, gt_labels, depth_labels = batch
    return (imgs[0], mats['sensor2ego_mats'][0], mats['intrin_mats'][0], mats['ida_mats'][0],
            mats['sensor2sensor_mats'][0], mats['bda_mat'][0], timestamps[0], img_metas[0], gt_boxes[0],
            gt_labels[0], depth_labels[0])


def check_ddp(kind, out_dir):
    """2-device DDP: 5 steps of the tiny config through a child process (Lightning's DDP launcher re-runs it)."""
    out = os.path.join(out_dir, 'ddp.json')
    command = [sys.executable, os.path.abspath(__file__), '--ddp-child', kind, '--out', out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    if result.returncode != 0 or not os.path.exists(out):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']
        return [f'DDP child failed (rc {result.returncode}): {tail[0]}'], {}
    with open(out) as handle:
        details = json.load(handle)
    losses = details.get('losses', [])
    if not losses or not all(math.isfinite(v) for v in losses):
        return [f'non-finite DDP loss {losses}'], details
    return [], details


def ddp_child(kind, out):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    from bevdepth.engine.devices import trainer_device_kwargs
    tiny_cls = load_exp(TINY_EXP, 'MatrixVTTinyExp')
    torch.manual_seed(0)
    exp = tiny_cls(batch_size_per_device=2, num_workers=0)
    batch = synthetic_batch(exp, 2)
    recorder = LossRecorder(torch.device('cpu'))
    kwargs = trainer_device_kwargs(accelerator=kind, devices=2, precision=16 if kind != 'cpu' else 32)
    trainer = pl.Trainer(**kwargs, max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[recorder],
                         default_root_dir=tempfile.mkdtemp())
    trainer.fit(exp, train_dataloaders=DataLoader([batch] * 5, batch_size=None, collate_fn=_identity))
    if trainer.global_rank == 0:
        write_json(out, dict(world_size=trainer.world_size, losses=recorder.losses))


# ------------------------------------------------------------------------------------------------- runner
def write_json(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
    with os.fdopen(handle, 'w') as stream:
        json.dump(data, stream, indent=1, default=str)
    os.replace(tmp, path)


class Report:
    def __init__(self):
        self.items = []

    def run(self, name, function, *args):
        start = time.perf_counter()
        try:
            failures, details = function(*args)
            status = 'FAIL' if failures else 'PASS'
            message = '; '.join(failures)
        except Exception as error:  # one failed item must not hide the others
            status, details = 'FAIL', {'traceback': traceback.format_exc(limit=6)}
            message = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
        item = dict(name=name, status=status, seconds=round(time.perf_counter() - start, 1), message=message,
                    details=details)
        self.items.append(item)
        print(f'{status:4}  {name:<34} {item["seconds"]:6.1f} s  {summary_line(name, details, message)}', flush=True)
        return item

    def skip(self, name, reason):
        self.items.append(dict(name=name, status='SKIP', seconds=0.0, message=reason, details={}))
        print(f'SKIP  {name:<34} {0.0:6.1f} s  {reason}', flush=True)


def summary_line(name, details, message):
    if message:
        return message
    keys = [k for k, v in details.items() if isinstance(v, (int, float)) and not isinstance(v, bool)][:4]
    parts = [f'{k}={details[k]:.3g}' if isinstance(details[k], float) else f'{k}={details[k]}' for k in keys]
    return ', '.join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='check_accelerator.json', help='JSON report path')
    parser.add_argument('--sample-root', default=None,
                        help='nuScenes dataroot with nuscenes_infos_train.pkl: its first sample is the input '
                             '(default: a synthetic sample built in memory)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda', 'npu'))
    parser.add_argument('--steps', type=int, default=TRAIN_STEPS, help='training steps per precision on a device')
    parser.add_argument('--ddp-child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_child:
        ddp_child(args.ddp_child, args.out)
        return 0
    if args.sample_root is not None and not os.path.isfile(os.path.join(args.sample_root,
                                                                        'nuscenes_infos_train.pkl')):
        print(f'error: --sample-root {args.sample_root} has no nuscenes_infos_train.pkl '
              '(create it with python scripts/gen_info.py)', file=sys.stderr)
        return 1  # bad input (bevdepth/engine/entry_point.py's convention)
    start = time.perf_counter()
    device, kind = pick_device(args.device)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    full_cls = load_exp(FULL_EXP, 'MatrixVT_Exp')
    tiny_cls = load_exp(TINY_EXP, 'MatrixVTTinyExp')
    report = Report()
    info = environment(device, kind)
    print('environment: ' + ', '.join(f'{k} {v}' for k, v in info.items()), flush=True)
    report.run('forced device branches on CPU', check_forced_branches, tiny_cls)
    if kind == 'cpu':
        print('no GPU or NPU found: running the CPU subset (forced-branch parity, 3 training steps of the tiny '
              'config)', flush=True)
        tiny = lambda: tiny_cls(batch_size_per_device=2, num_workers=0)  # noqa: E731
        torch.manual_seed(0)
        report.run('train tiny, 3 steps, fp32, -b 2', check_training, tiny, synthetic_batch(tiny(), 2), 'cpu',
                   32, 3)
    else:
        data_root = args.sample_root or 'synthetic'

        def full(batch_size=2, num_workers=0):
            # lr 1e-4 per image x 2 = 2e-4, the reference's global lr: a visible fall within 30 steps
            return full_cls(batch_size_per_device=batch_size, num_workers=num_workers, data_root=data_root,
                            version='v1.0-mini', learning_rate=1e-4)

        if args.sample_root:
            probe = full()
            sample_batch, dataset = real_batch(probe, 1)
            sample_batch.append(torch.zeros(1, 1, 6, *probe.backbone_conf['final_dim']))  # no depth labels
            make_batch = lambda b: [torch.cat([sample_batch[0]] * b), {k: torch.cat([v] * b) for k, v in  # noqa
                                    sample_batch[1].items()}, torch.cat([sample_batch[2]] * b), sample_batch[3] * b,
                                    sample_batch[4] * b, sample_batch[5] * b, torch.cat([sample_batch[6]] * b)]
            one = make_batch(1)
        else:
            dataset = None
            make_batch = lambda b: synthetic_batch(full(), b)  # noqa: E731
            one = make_batch(1)
        report.run('full R50 forward, device vs CPU', check_forward_parity, full_cls, one, device)
        torch.manual_seed(0)
        report.run(f'train full, {args.steps} steps, fp16, -b 2', check_training, full, make_batch(2), kind, 16,
                   args.steps)
        bf16 = kind == 'npu' or (kind == 'cuda' and torch.cuda.is_bf16_supported())
        if bf16:
            torch.manual_seed(0)
            report.run(f'train full, {args.steps} steps, bf16, -b 2', check_training, full, make_batch(2), kind,
                       'bf16', args.steps)
        else:
            report.skip('train full, bf16', f'{kind} device without bf16 support')
        sample = single_sample(one) if dataset is None else None
        report.run('throughput -b 8, 1 device', check_throughput, full, make_batch, kind, device,
                   lambda length: SampleDataset(length, dataset, sample))
        if device_count(kind) >= 2:
            report.run('DDP, 2 devices', check_ddp, kind, os.path.dirname(os.path.abspath(args.out)))
        else:
            report.skip('DDP, 2 devices', '1 device: DDP skipped')
    failed = [item['name'] for item in report.items if item['status'] == 'FAIL']
    total = time.perf_counter() - start
    write_json(args.out, dict(environment=info, device=kind, seconds=round(total, 1), passed=not failed,
                              items=report.items))
    print(f'{"FAIL" if failed else "PASS"}: {len(report.items) - len(failed)} of {len(report.items)} items pass '
          f'or skip on {kind} in {total:.0f} s; report {args.out}', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
