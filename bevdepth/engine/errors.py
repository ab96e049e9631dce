"""Errors the command line reports as one line (``error: ...``, exit code 2) instead of a traceback.

They are bad input, not bugs: a missing or foreign checkpoint, a missing dataroot or info file, a submission
that does not match its split. Their messages name the file and the fix.
"""
from bevdepth.datasets.errors import DataError
from bevdepth.evaluators.det_evaluators import EmptySubmissionError, SubmissionMismatchError
from bevdepth.layers.backbones.imagenet_weights import PretrainedWeightsError


class CheckpointMismatchError(ValueError):
    """A checkpoint of another architecture / config, or a resume with another world size or batch size."""


class UsageError(ValueError):
    """Flags that cannot work together on this machine (e.g. fp16 on CPU, --gpus without a GPU)."""


USER_ERRORS = (UsageError, FileNotFoundError, DataError, CheckpointMismatchError, SubmissionMismatchError,
               EmptySubmissionError, PretrainedWeightsError)
