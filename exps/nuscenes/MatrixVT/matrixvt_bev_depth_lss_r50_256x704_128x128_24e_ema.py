"""MatrixVT R50 256x704, 128x128 BEV, 24 epochs, EMA, CBGS (upstream ``MatrixVT_Exp`` of the same file name).

Train (8 devices, global batch 64, lr 2e-4):
    python exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py \\
        -b 8 --gpus 8 --amp_backend native --precision 16 --learning_rate 0.000003125 --max_epoch 24 --seed 0
Evaluate the EMA weights of the last epoch:
    python exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py -e -b 8 --gpus 8 \\
        --ckpt_path outputs/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema_cbgs/lightning_logs/version_0/23.pth

Learning-rate schedule: MultiStepLR([19, 23]) per epoch as in the Ascend seed (the run its README numbers
come from); upstream MatrixVT trained with a constant lr: pass ``--lr_schedule constant`` for that.
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
from exps.base_exp import BEVDepthLightningModel  # noqa: E402

EXP_NAME = 'matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema_cbgs'


class MatrixVT_Exp(BEVDepthLightningModel):
    """The reference MatrixVT_Exp: the base configs with MatrixVT_Det and CBGS."""

    setting_defaults = dict(
        cbgs=True,  # the reference MatrixVT_Exp sets data_use_cbgs = True
    )

    def build_model(self):
        # The reference first built a BaseBEVDepth and then replaced its backbone; building MatrixVT_Det
        # directly gives the same modules and state dict (only the RNG draws of the discarded LSS differ).
        from bevdepth.models.matrixvt_det import MatrixVT_Det
        return MatrixVT_Det(self.backbone_conf, self.head_conf, is_train_depth=True)


if __name__ == '__main__':
    run_cli(MatrixVT_Exp, EXP_NAME, use_ema=True)
