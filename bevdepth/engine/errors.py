"""Errors the command line reports as one line (``error: ...``, exit code 2) instead of a traceback.

They are bad input, not bugs: a missing or foreign checkpoint, a missing dataroot or info file, a submission
that does not match its split. Their messages name the file and the fix.
"""
from bevdepth.configs.settings import SettingError
from bevdepth.datasets.errors import DataError
from bevdepth.evaluators.det_evaluators import EmptySubmissionError, SubmissionMismatchError
from bevdepth.layers.backbones.imagenet_weights import PretrainedWeightsError
from bevdepth.models.checkpoints import CheckpointError
from bevdepth.utils.io import OutputPathError


# A checkpoint that is missing, unreadable, of another architecture, or a resume with another world size / batch.
CheckpointMismatchError = CheckpointError


class UsageError(ValueError):
    """Flags that cannot work together on this machine (e.g. fp16 on CPU, --gpus without a GPU)."""


# Expected failures and their exit status (bevdepth/engine/entry_point.py): usage (2) and bad input files (1).
USAGE_ERRORS = (UsageError, SettingError)
INPUT_ERRORS = (FileNotFoundError, DataError, CheckpointError, SubmissionMismatchError, EmptySubmissionError,
                PretrainedWeightsError, OutputPathError)
