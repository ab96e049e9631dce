"""The settings table: defaults per experiment, checks, and the docs' flag table derived from it."""
import pathlib

import pytest

from bevdepth.configs import derive, settings
from bevdepth.configs.settings import SettingError
from exps.base_exp import BEVDepthLightningModel
from exps.nuscenes.MatrixVT.matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema import MatrixVT_Exp
from exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_ema import BEVDepthLightningModel as LSSExp
from exps.nuscenes.tiny.matrixvt_tiny_synthetic import MatrixVTTinyExp

DOCS = pathlib.Path(__file__).resolve().parents[2] / 'docs' / 'training.md'


def test_experiments_change_defaults_along_their_hierarchy():
    base = settings.experiment_defaults(BEVDepthLightningModel)
    assert base == {setting.name: setting.default for setting in settings.SETTINGS}
    matrixvt = settings.experiment_defaults(MatrixVT_Exp)
    assert matrixvt['cbgs'] is True and matrixvt['pretrained'] == 'torchvision'
    assert settings.experiment_defaults(LSSExp)['lr_schedule'] == 'constant'
    tiny = settings.experiment_defaults(MatrixVTTinyExp)
    assert tiny['cbgs'] is False and tiny['base_config'] == 'tiny' and tiny['lr_milestones'] == 'final_sixth'


def test_bad_values_and_names_are_one_line_errors():
    with pytest.raises(SettingError, match=r'--head_channels must be >= 1, got 0'):
        settings.resolve(MatrixVTTinyExp, {'head_channels': 0})
    with pytest.raises(SettingError, match=r"--image_backend must be one of \['opencv', 'pillow'\], got 'pil'"):
        settings.resolve(MatrixVTTinyExp, {'image_backend': 'pil'})
    with pytest.raises(SettingError, match=r"'head_chanels' is no setting of MatrixVTTinyExp \(did you mean "
                                           r"head_channels\?\)"):
        settings.resolve(MatrixVTTinyExp, {'head_chanels': 16})

    class Misspelt(MatrixVT_Exp):
        setting_defaults = dict(cbg=False)

    with pytest.raises(SettingError, match=r"Misspelt.setting_defaults: 'cbg' is no setting \(did you mean cbgs\?\)"):
        settings.experiment_defaults(Misspelt)


def test_configuration_is_plain_and_complete():
    config = settings.resolve(MatrixVTTinyExp, {'final_dim': (64, 192)})
    assert config['final_dim'] == [64, 192] and set(config) == set(settings.SETTINGS_BY_NAME)
    assert all(not isinstance(value, tuple) for value in config.values())


def test_lr_milestone_rules():
    assert derive.lr_milestones('reference', 24) == [19, 23]
    assert derive.lr_milestones('final_sixth', 12) == [10]
    assert derive.lr_milestones('final_sixth', 1) == [1]


def _shown(value):
    if value is None:
        return 'none'
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, list):
        return ' '.join(map(str, value))
    return str(value)


def test_the_docs_flag_table_is_the_settings_table():
    """docs/training.md lists every setting once, with the three experiments' defaults and the table's help."""
    text = DOCS.read_text()
    experiments = [settings.experiment_defaults(cls) for cls in (MatrixVT_Exp, LSSExp, MatrixVTTinyExp)]
    for setting in settings.SETTINGS:
        rows = [line for line in text.splitlines() if line.startswith(f'| `{setting.flag}`')]
        assert len(rows) == 1, setting.name
        cells = [cell.strip() for cell in rows[0].strip('|').split(' | ')]
        assert cells[1] == setting.group and cells[-1] == setting.help.replace('|', '\\|'), setting.name
        assert cells[2:5] == [_shown(defaults[setting.name]) for defaults in experiments], setting.name
