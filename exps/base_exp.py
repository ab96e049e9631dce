"""The BEVDepth / MatrixVT LightningModule: configs, model, losses, optimisation, data and evaluation.

Mirrors the reference ``bevdepth/exps/nuscenes/base_exp.py`` and ``bevdepth/exps/base_cli.py``: the same configs,
AdamW(lr = per-image lr x batch per device x devices x nodes, weight_decay 1e-7), MultiStepLR([19, 23]) per
epoch (the Ascend seed; ``lr_schedule='constant'`` gives upstream's constant lr), detection loss + 3.0 x depth
BCE logged as ``detection_loss`` / ``depth_loss``, evaluation gathered from all ranks in sampler order with
the padding removed, then the official nuScenes devkit on rank 0.

Experiments subclass it and override ``build_model`` (MatrixVT) or the config arguments (tiny config).
Changes from the reference (behaviour, not results): no ``.cuda()`` (Lightning moves the batch), a
non-finite-loss guard, resumable sampling (bevdepth.engine.samplers), RNG states in the checkpoint,
evaluation errors raised on every rank instead of hanging the others.
"""
from functools import partial
import os
import random

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from bevdepth.callbacks.nonfinite_guard import NonFiniteLossGuard, SkipOptimizerStepMixin
from bevdepth.configs import derive, settings
from bevdepth.configs import nuscenes as nuscenes_configs
from bevdepth.engine.cli import effective_learning_rate
from bevdepth.engine.errors import CheckpointMismatchError
from bevdepth.engine.samplers import ResumableDistributedSampler, SeededSampleDataset
from bevdepth.evaluators.det_evaluators import DetNuscEvaluator
from bevdepth.layers.heads.bev_depth_head import init_heatmap_bias

WEIGHT_DECAY = 1e-7


def gather_in_sampler_order(local_items, dataset_length):
    """Gather per-rank eval outputs into dataset order, dropping DistributedSampler padding.

    ``DistributedSampler(shuffle=False)`` gives rank r the indices r, r + W, r + 2W, ... of the dataset padded
    to a multiple of W, so interleaving the ranks' lists restores the order; the tail beyond
    ``dataset_length`` is the padding (upstream ``test_epoch_end`` truncates the same way).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local_items)[:dataset_length]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(local_items))
    lengths = {len(items) for items in gathered}
    if len(lengths) != 1:
        raise RuntimeError(f'ranks produced different numbers of eval samples {sorted(lengths)}; the eval '
                           f'sampler must be DistributedSampler(shuffle=False) with padding')
    interleaved = [item for group in zip(*gathered) for item in group]
    return interleaved[:dataset_length]


def run_on_rank_zero(fn):
    """Run ``fn`` on global rank 0; its exception is raised on every rank (no rank is left waiting)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    outcome = [None]
    if rank == 0:
        try:
            outcome[0] = (True, fn())
        except Exception as error:  # re-raised below, on all ranks
            outcome[0] = (False, error)
    if distributed:
        shipped = [(outcome[0][0], None if outcome[0][0] else outcome[0][1])] if rank == 0 else [None]
        dist.broadcast_object_list(shipped, src=0)
        if rank != 0:
            outcome = shipped
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def _rng_states(device):
    """Global RNG states, as tensors and python scalars only (loadable with torch.load(weights_only=True))."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {'torch': torch.get_rng_state(),
              'numpy': [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gaussian)],
              'python': random.getstate()}
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device)
    elif device.type == 'npu' and hasattr(torch, 'npu'):
        states['npu'] = torch.npu.get_rng_state(device)
    return states


def _set_rng_states(states, device):
    torch.set_rng_state(states['torch'])
    name, keys, position, has_gauss, cached_gaussian = states['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(tuple(states['python']))
    if device.type == 'cuda' and 'cuda' in states:
        torch.cuda.set_rng_state(states['cuda'], device)
    elif device.type == 'npu' and 'npu' in states:
        torch.npu.set_rng_state(states['npu'], device)


class BEVDepthLightningModel(SkipOptimizerStepMixin, pl.LightningModule):
    """BEVDepth (LSS, key frame only) experiment; base of the MatrixVT experiment.

    Args:
        config: a complete configuration (``bevdepth.configs.settings``; e.g. read back from a checkpoint).
        **overrides: settings by name (``batch_size_per_device=2``, ``head_channels=16``, ...) over ``config`` or,
            without it, over the experiment's defaults. Every setting, its default, check and help is in
            bevdepth/configs/settings.py; an experiment changes defaults in its ``setting_defaults``.

    ``self.config`` holds the resolved configuration (plain types); it is saved in every checkpoint.
    """

    setting_defaults = {}  # the settings table's defaults are the reference's

    def __init__(self, config=None, **overrides):
        super().__init__()
        self.config = settings.resolve(type(self), {**(config or {}), **overrides})
        self.save_hyperparameters(self.config)
        config = self.config
        self.batch_size_per_device = config['batch_size_per_device']
        self.eval_batch_size = config['eval_batch_size'] or self.batch_size_per_device
        self.basic_lr_per_img = float(config['learning_rate'])
        self.data_root = str(config['data_root'])
        self.version = config['version']
        self.num_workers = config['num_workers']
        self.default_root_dir = str(config['default_root_dir'] or './outputs/')
        self.seed = config['seed']
        self.lr_schedule = config['lr_schedule']
        self.image_backend = config['image_backend']

        self.class_names = list(nuscenes_configs.CLASSES)
        self.backbone_conf, self.head_conf, self.ida_aug_conf, self.bda_aug_conf = derive.module_configs(config)
        self.img_conf = dict(nuscenes_configs.IMG_CONF)

        # Data settings of upstream bevdepth/exps/nuscenes/base_exp.py.
        self.data_use_cbgs = config['cbgs']
        self.num_sweeps = 1
        self.sweep_idxes = []
        self.key_idxes = []
        self.data_return_depth = True
        self.depth_source = 'auto'
        self.train_info_paths = os.path.join(self.data_root, 'nuscenes_infos_train.pkl')
        self.val_info_paths = os.path.join(self.data_root, 'nuscenes_infos_val.pkl')
        # v1.0-mini has no test split: predict on its val infos (the reference always used _test.pkl).
        self.predict_info_paths = os.path.join(
            self.data_root, 'nuscenes_infos_val.pkl' if self.version.endswith('mini') else 'nuscenes_infos_test.pkl')
        self.predict_output_dir = self.default_root_dir

        self.model = self.build_model()
        if config['heatmap_prior_bias'] is not None:
            init_heatmap_bias(self.model.head, config['heatmap_prior_bias'])
        if config['channels_last']:  # a speed choice only: same values (up to float summation order)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.evaluator = DetNuscEvaluator(class_names=self.class_names, data_root=self.data_root,
                                          version=self.version, output_dir=self.default_root_dir)
        self.loss_guard = NonFiniteLossGuard(config['max_bad_steps'])
        self.skipped_optimizer_step = False
        self.metrics = None
        self._eval_outputs = []
        self._resume_sampler_state = None
        self._resume_rng_states = None
        self._train_sampler = None

    def load_pretrained_image_backbone(self, source):
        """Initialise the image ResNet from ``source`` ('torchvision' = ImageNet IMAGENET1K_V1, a path, or
        None / 'none' for no change); returns the number of tensors loaded. The command line calls it for a new
        training run only."""
        if source in (None, 'none'):
            return 0
        return self.model.backbone.img_backbone.load_imagenet(source)

    # ----------------------------------------------------------------------------------------------- model
    def build_model(self):
        from bevdepth.models.base_bev_depth import BaseBEVDepth
        return BaseBEVDepth(self.backbone_conf, self.head_conf, is_train_depth=True)

    def forward(self, sweep_imgs, mats_dict, timestamps=None):
        return self.model(sweep_imgs, mats_dict, timestamps)

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        """batch = [imgs (B, S, N, 3, H, W), mats_dict, timestamps (B, S, N), img_metas, gt_boxes list of (n, 9),
        gt_labels list of (n,), depth_labels (B, S, N, H, W)]."""
        sweep_imgs, mats_dict, timestamps, _, gt_boxes, gt_labels, depth_labels = batch
        preds, depth_preds = self.model(sweep_imgs, mats_dict, timestamps)
        targets = self.model.get_targets(gt_boxes, gt_labels)
        detection_loss = self.model.loss(targets, preds)
        if isinstance(detection_loss, (tuple, list)):  # (total, parts) form
            detection_loss = detection_loss[0]
        if depth_labels.dim() == 5:
            depth_labels = depth_labels[:, 0]  # only the key frame is depth-supervised
        depth_loss = self.model.get_depth_loss(depth_labels, depth_preds)
        # Shown in the progress bar and logged to TensorBoard (the reference's two scalars).
        self.log('detection_loss', detection_loss, prog_bar=True, batch_size=len(gt_boxes))
        self.log('depth_loss', depth_loss, prog_bar=True, batch_size=len(gt_boxes))
        loss = detection_loss + depth_loss
        self.mark_micro_batch(self.loss_guard.should_skip(
            loss, {'detection_loss': detection_loss, 'depth_loss': depth_loss}, self.global_step))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        # RNG states of a resumed checkpoint are applied here, after the data pipeline was set up, so dropout
        # draws continue exactly where the interrupted run stopped.
        if self._resume_rng_states is not None:
            _set_rng_states(self._resume_rng_states, self.device)
            self._resume_rng_states = None

    def configure_optimizers(self):
        world_size = self.trainer.world_size if self._trainer is not None else 1
        lr = effective_learning_rate(self.basic_lr_per_img, self.batch_size_per_device, world_size)
        optimizer = self.build_optimizer(lr)
        if self.lr_schedule == 'multistep':
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.lr_milestones())
            return [optimizer], [scheduler]
        return [optimizer]

    def lr_milestones(self):
        """Epochs at which 'multistep' multiplies the lr by 0.1 (setting lr_milestones; the seed's [19, 23])."""
        return derive.lr_milestones(self.config['lr_milestones'], self.config['max_epochs'])

    def build_optimizer(self, lr):
        """AdamW(all model parameters, lr, weight_decay 1e-7); torch_npu's fused AdamW on NPU when present."""
        params = list(self.model.parameters())
        if self.device.type == 'npu':
            from bevdepth.engine.devices import fused_adamw_or_none
            fused = fused_adamw_or_none(params, lr=lr, weight_decay=WEIGHT_DECAY)
            if fused is not None:
                return fused
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_step(self, batch):
        """Returns per sample [boxes (n, 9) np, scores (n,) np, labels (n,) np, img_meta]."""
        sweep_imgs, mats_dict, timestamps, img_metas = batch[:4]
        preds = self.model(sweep_imgs, mats_dict, timestamps)
        results = self.model.get_bboxes(preds, img_metas)
        outputs = []
        for result, img_meta in zip(results, img_metas):
            boxes, scores, labels = result[:3]
            outputs.append([boxes.detach().float().cpu().numpy(), scores.detach().float().cpu().numpy(),
                            labels.detach().cpu().numpy(), img_meta])
        return outputs

    def on_test_epoch_start(self):
        self._eval_outputs = []

    def test_step(self, batch, batch_idx):
        self._eval_outputs.extend(self.eval_step(batch))

    def on_test_epoch_end(self):
        dataset_length = len(self.trainer.test_dataloaders.dataset)
        outputs = gather_in_sampler_order(self._eval_outputs, dataset_length)
        self._eval_outputs = []
        results = [output[:3] for output in outputs]
        img_metas = [output[3] for output in outputs]
        self.metrics = run_on_rank_zero(lambda: self.evaluator.evaluate(results, img_metas))

    def on_predict_epoch_start(self):
        self._eval_outputs = []

    def predict_step(self, batch, batch_idx):
        self._eval_outputs.extend(self.eval_step(batch))

    def on_predict_epoch_end(self):
        dataset_length = len(self.trainer.predict_dataloaders.dataset)
        outputs = gather_in_sampler_order(self._eval_outputs, dataset_length)
        self._eval_outputs = []
        results = [output[:3] for output in outputs]
        img_metas = [output[3] for output in outputs]
        self.result_path = run_on_rank_zero(
            lambda: self.evaluator.format_results(results, img_metas, output_dir=self.predict_output_dir))

    # ------------------------------------------------------------------------------------------------ data
    def build_dataset(self, info_paths, is_train):
        from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
        return NuscDetDataset(ida_aug_conf=self.ida_aug_conf, bda_aug_conf=self.bda_aug_conf,
                              classes=self.class_names, data_root=self.data_root, info_paths=info_paths,
                              is_train=is_train, use_cbgs=self.data_use_cbgs and is_train,
                              num_sweeps=self.num_sweeps, img_conf=self.img_conf,
                              return_depth=self.data_return_depth and is_train, sweep_idxes=self.sweep_idxes,
                              key_idxes=self.key_idxes, depth_source=self.depth_source,
                              cbgs_seed=self.seed, image_backend=self.image_backend)

    def _world(self):
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self):
        from bevdepth.datasets.nusc_det_dataset import collate_fn
        dataset = self.build_dataset(self.train_info_paths, is_train=True)
        world_size, rank = self._world()
        # Our own shuffling DistributedSampler (also with one process) so the order is seeded and a
        # mid-epoch resume can skip the batches already trained; Lightning keeps it (use_distributed_sampler
        # is off in run_cli).
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=self.seed, with_epoch=True)
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        sampler.set_epoch(epoch)
        if self._resume_sampler_state is not None and self._resume_sampler_state['epoch'] == epoch:
            sampler.resume(epoch, self._resume_sampler_state['batches_done'], self.batch_size_per_device)
        self._resume_sampler_state = None
        self._train_sampler = sampler
        return DataLoader(
            SeededSampleDataset(dataset, self.seed), batch_size=self.batch_size_per_device, sampler=sampler,
            num_workers=self.num_workers, drop_last=True,
            collate_fn=partial(collate_fn, is_return_depth=self.data_return_depth),
            # Its own generator: creating the iterator then does not consume the global torch RNG.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False)

    def _eval_dataloader(self, info_paths):
        from bevdepth.datasets.nusc_det_dataset import collate_fn
        dataset = self.build_dataset(info_paths, is_train=False)
        world_size, rank = self._world()
        if world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        else:
            sampler = SequentialSampler(dataset)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=False, collate_fn=partial(collate_fn, is_return_depth=False))

    def test_dataloader(self):
        return self._eval_dataloader(self.val_info_paths)

    def predict_dataloader(self):
        return self._eval_dataloader(self.predict_info_paths)

    # ------------------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint):
        # Position inside the epoch: batches finished so far (on_train_batch_end saves count the current one).
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        checkpoint['train_sampler_state'] = {'epoch': trainer.current_epoch, 'batches_done': progress.processed,
                                             'world_size': trainer.world_size,
                                             'batch_size_per_device': self.batch_size_per_device}
        checkpoint['rng_states'] = _rng_states(self.device)
        checkpoint[settings.CHECKPOINT_KEY] = settings.plain(self.config)  # a copied checkpoint still knows its model

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get('train_sampler_state')
        if state is not None:
            world_size, _ = self._world()
            if (state['world_size'], state['batch_size_per_device']) != (world_size, self.batch_size_per_device):
                raise CheckpointMismatchError(
                    f"checkpoint was trained with {state['world_size']} processes x batch "
                    f"{state['batch_size_per_device']}, this run has {world_size} x {self.batch_size_per_device}: "
                    f'resume with the same --devices/--num_nodes and -b')
            self._resume_sampler_state = state
        self._resume_rng_states = checkpoint.get('rng_states')
