"""
How every script ends: `@script` wraps a script's `main(argv=None)` so that
a usage error exits with status 2 and an input or training error with status
1, each as one line `error: ...` on stderr (from every rank; no traceback),
and the process group is torn down however main ends.
"""

import functools
import sys

from . import dist_util
from .errors import TrainingError, UsageError


def script(main):
    """
    Wrap `main(argv=None)`: its return value, an int, is the exit status
    (None: 0); UsageError (and its InputError), TrainingError and the ValueErrors
    of bad input that the library raises end it with one error line.
    """

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            status = main(argv)
        except UsageError as exc:
            _fail(exc, exc.exit_status)
        except (ValueError, TrainingError) as exc:
            _fail(exc, 1)
        dist_util.cleanup_dist()
        if status:
            sys.exit(status)

    return wrapped


def _fail(exc, status):
    sys.stderr.write(f"error: {exc}\n")  # one write: ranks' lines stay whole when a launcher merges them
    sys.stderr.flush()
    dist_util.cleanup_dist()
    sys.exit(status)
