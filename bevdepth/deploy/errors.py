"""The error type of the deployment tools (ONNX export and onnxruntime inference).

Bad input -- an experiment file without one experiment class, a checkpoint of another architecture, a sample
index out of range, a graph whose baked calibration does not fit a sample -- raises ``DeployError`` with one
line saying what is wrong and how to fix it; scripts print it as ``error: ...`` and exit non-zero. It
subclasses ``ValueError`` so callers that catch ValueError keep working.
"""


class DeployError(ValueError):
    """Bad input to export / inference; the message is one line naming the problem and the fix."""
