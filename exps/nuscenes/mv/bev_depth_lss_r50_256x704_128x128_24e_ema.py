"""BEVDepth LSS R50 256x704, 128x128 BEV, key frame only, 24 epochs, EMA (upstream mv exp of the same name).

As upstream, this experiment trains with a constant lr (its configure_optimizers returned AdamW without a
scheduler); ``--lr_schedule multistep`` restores the base experiment's MultiStepLR([19, 23]).

    python exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_ema.py -b 8 --gpus 8 --precision 16
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
from exps.base_exp import BEVDepthLightningModel as BaseBEVDepthLightningModel  # noqa: E402

EXP_NAME = 'bev_depth_lss_r50_256x704_128x128_24e_ema'


class BEVDepthLightningModel(BaseBEVDepthLightningModel):
    """BaseBEVDepth (LSS view transform) with the reference base configs; constant lr."""

    setting_defaults = dict(
        lr_schedule='constant',  # upstream's configure_optimizers returns AdamW without a scheduler
    )


if __name__ == '__main__':
    run_cli(BEVDepthLightningModel, EXP_NAME, use_ema=True)
