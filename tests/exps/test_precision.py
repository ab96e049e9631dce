"""Mixed precision of the tiny experiment on CPU: bf16 trains like fp32, evaluates like fp32, and the fp32 islands
stay fp32 under autocast."""
import pytest
import pytorch_lightning as pl
import torch

from exps.nuscenes.tiny.matrixvt_tiny_synthetic import MatrixVTTinyExp

STEPS = 20


class _Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs['loss']))


def _train(dataroot, precision):
    torch.manual_seed(0)
    module = MatrixVTTinyExp(data_root=str(dataroot), final_dim=[64, 192], num_workers=0, batch_size_per_device=2,
                             seed=0)
    losses = _Losses()
    trainer = pl.Trainer(accelerator='cpu', devices=1, precision=precision, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=5.0, callbacks=[losses], max_epochs=-1, use_distributed_sampler=False)
    trainer.fit(module)
    return losses.values, module


@pytest.mark.slow
def test_first_steps_in_bf16_follow_fp32(synthetic_dataroot):
    fp32, _ = _train(synthetic_dataroot, '32-true')
    bf16, module = _train(synthetic_dataroot, 'bf16-mixed')
    assert len(fp32) == len(bf16) == STEPS
    assert all(torch.isfinite(torch.tensor(fp32 + bf16)))
    relative = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    # Measured: 0.03 % on the first step, at most 3.3 % over the 20 steps as the trajectories part (bf16 rounding).
    assert relative[0] < 0.005 and max(relative) < 0.1, relative
    assert next(module.model.parameters()).dtype == torch.float32  # autocast, not a bf16 copy of the model


def test_eval_heads_in_bf16_match_fp32_and_islands_stay_fp32(synthetic_dataroot):
    torch.manual_seed(0)
    module = MatrixVTTinyExp(data_root=str(synthetic_dataroot), final_dim=[64, 192], num_workers=0,
                             eval_batch_size=2)
    module.eval()
    batch = next(iter(module.test_dataloader()))
    imgs, mats, timestamps = batch[:3]
    seen = {}
    hooks = [module.model.head.register_forward_hook(lambda m, i, o: seen.__setitem__('head_in', i[0].dtype)),
             module.model.backbone.horiconv.register_forward_hook(
                 lambda m, i, o: seen.__setitem__('horiconv_out', o.dtype)),
             module.model.backbone.img_backbone.register_forward_hook(
                 lambda m, i, o: seen.__setitem__('backbone_out', o[-1].dtype))]
    with torch.no_grad():
        reference = module.model(imgs, mats, timestamps)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = module.model(imgs, mats, timestamps)
    for hook in hooks:
        hook.remove()
    assert seen['backbone_out'] == torch.bfloat16  # the backbone runs in bf16 ...
    assert seen['horiconv_out'] == torch.float32 and seen['head_in'] == torch.float32  # ... the islands in fp32
    for task_ref, task_mixed in zip(reference, mixed):
        for name, value in task_ref[0].items():
            other = task_mixed[0][name]
            assert other.dtype == torch.float32, name
            scale = value.abs().max().clamp_min(1e-3)
            # Measured: every map within 1e-4 of its largest value (random init); allowed 1e-2.
            assert float((other - value).abs().max() / scale) < 0.01, name
