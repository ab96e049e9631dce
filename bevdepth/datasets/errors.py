"""The error type of the data pipeline.

Every bad-input case of the dataset (missing data_root, info file, image, LiDAR file or depth cache, a
truncated JPEG, an info file of another dataroot, an empty split) raises ``DataError`` with one line that
says what is wrong and how to fix it. It subclasses ``ValueError`` so callers that catch ValueError keep
working.
"""


class DataError(ValueError):
    """Bad or missing input data; the message is one line naming the file and the fix."""
