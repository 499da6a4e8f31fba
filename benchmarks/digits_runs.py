"""
What the digits benchmarks share: the bundled digits written as an image
folder, and the real scripts run as a user runs them (their main(argv), in
this process: a benchmark's subject is the scripts' results, not their
start-up).
"""

import contextlib
import importlib.util
import io
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "datasets"))

import digits  # noqa: E402  (datasets/ is not a package on sys.path otherwise)

from improved_diffusion import logger  # noqa: E402


def write_digits(data_dir):
    """The 1,797 digits as 8x8 PNGs in `data_dir` (nothing to do when they are there)."""
    digits.write_digits(str(data_dir), image_size=8, log=lambda *_: None)


def run(script, args, log_dir):
    """
    scripts/`script` (a path relative to the checkout) with `args`, writing to
    `log_dir`, as `OPENAI_LOGDIR=log_dir python script args` would; its output
    is dropped. Raises RuntimeError with the script's error when it fails.
    """
    spec = importlib.util.spec_from_file_location(pathlib.Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = os.environ.get("OPENAI_LOGDIR")
    os.environ["OPENAI_LOGDIR"] = str(log_dir)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            module.main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"{script} exited with status {exc.code}: {errors.getvalue().strip()}") from None
    finally:
        logger.reset()
        if previous is None:
            del os.environ["OPENAI_LOGDIR"]
        else:
            os.environ["OPENAI_LOGDIR"] = previous
