"""Tiny MatrixVT on the synthetic nuScenes dataroot: the CPU-friendly demo and the engine's test subject.

Same code path as the full experiment (MatrixVT_Det, depth supervision, EMA, devkit evaluation) with the
scaled-down architecture of bevdepth.configs.tiny. Its body is the settings that differ from the reference
(bevdepth/configs/settings.py holds every setting with its help; any of them can be given as a flag).

    python scripts/make_synthetic_nuscenes.py ...   # writes data/synthetic_nuscenes (docs/data.md)
    python exps/nuscenes/tiny/matrixvt_tiny_synthetic.py --accelerator cpu    # train
    python exps/nuscenes/tiny/matrixvt_tiny_synthetic.py --accelerator cpu -e \
        --ckpt_path outputs/matrixvt_tiny_synthetic/lightning_logs/version_0/<last epoch>.pth
"""
import os
import sys

try:  # installed with pip install -e .
    from bevdepth.utils.threads import prepare_process_environment
except ImportError:  # run from a source checkout: make the repository root importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..')))
    from bevdepth.utils.threads import prepare_process_environment
prepare_process_environment()  # before torch is imported (bevdepth/utils/threads.py)

from bevdepth.engine.cli import run_cli  # noqa: E402
from exps.nuscenes.MatrixVT.matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema import MatrixVT_Exp  # noqa: E402

EXP_NAME = 'matrixvt_tiny_synthetic'


class MatrixVTTinyExp(MatrixVT_Exp):
    """MatrixVT_Det with the tiny backbone / head / image size of bevdepth.configs.tiny."""

    setting_defaults = dict(
        base_config='tiny',  # ResNet-18, 128x352 input, 64x64 BEV grid of 1.6 m cells
        img_base_channels=32,  # half-width ResNet-18: ~2x cheaper steps, better mAP / NDS in the same time
        downsample_factor=8,  # 6 x 44 rays instead of 6 x 22 on the small input: car AP 0.28 -> 0.39, ~1.3x time
        head_channels=32,  # the 36 head convs on the 64x64 grid cost more than the image backbone at 64
        heatmap_prior_bias=-2.19,  # ~1000 steps are too few to spend the first hundred pushing 0.5 heatmaps down
        pretrained='none',  # no ImageNet file exists for a half-width ResNet-18
        channels_last=True,  # oneDNN convolutions on CPU: ~14 % faster training steps, same values
        cbgs=False,  # the synthetic scenes are balanced already
        data_root='data/synthetic_nuscenes',
        version='v1.0-mini',
        batch_size_per_device=2,
        learning_rate=1e-3,  # per image: lr = 1e-3 x 2 = 2e-3 on one device
        lr_milestones='final_sixth',  # x0.1 for the last sixth of the epochs: ends on settled weights
        max_epochs=12,  # 12 x 80 steps on the demo's 160 training samples
        num_workers=0,  # the CPU cores are busy with the model; workers only add copies
        log_every_n_steps=5,
    )


if __name__ == '__main__':
    run_cli(MatrixVTTinyExp, EXP_NAME)
