"""The one error path of every command: an expected failure is one line on stderr and a documented exit status.

    status 0  done
    status 1  bad input: a file or data the command reads is missing, truncated, corrupt or of another kind
              (dataroot, info pickle, image, LiDAR file, depth cache, checkpoint, results JSON, ONNX graph), or an
              output path that cannot be written
    status 2  bad usage: flags that do not parse or cannot work together on this machine (argparse's own status)

A traceback is printed only for a bug, or for any failure when ``BEVDEPTH_DEBUG=1`` is set.
"""
import os
import re
import sys

from bevdepth.engine.errors import INPUT_ERRORS, USAGE_ERRORS

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
DEBUG_ENV = 'BEVDEPTH_DEBUG'


def one_line_message(error):
    """The message of ``error`` as one line.

    An exception raised in a DataLoader worker is re-raised in the main process with a multi-line message
    ('Caught DataError in DataLoader worker process 0.' + the worker's traceback); its last line holds the
    original ``module.ClassName: message``, of which the message is kept.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0]
    return re.sub(r'^[A-Za-z_][\w.]*: ', '', lines[-1])


def exit_status(error, extra_input_errors=()):
    """EXIT_USAGE / EXIT_BAD_INPUT for an expected failure, None for anything else (a bug)."""
    if isinstance(error, USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(error, INPUT_ERRORS + tuple(extra_input_errors)):
        return EXIT_BAD_INPUT
    return None


def run_entry_point(main, *args, extra_input_errors=()):
    """Call ``main(*args)``; an expected failure prints ``error: <one line>`` and exits with its status."""
    try:
        return main(*args)
    except Exception as error:
        status = exit_status(error, extra_input_errors)
        if status is None or os.environ.get(DEBUG_ENV, '') not in ('', '0'):
            raise
        print(f'error: {one_line_message(error)}', file=sys.stderr, flush=True)
        sys.exit(status)
