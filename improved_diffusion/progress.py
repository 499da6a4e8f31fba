"""
Training progress you can see between the log intervals: on a terminal a
progress bar (steps done and to do when known, steps/s, the latest loss);
otherwise, as in a batch job's log file, one line at least every
`interval_s` seconds. Only rank 0 shows anything, and the loss is read from
the device only when it is shown (at most a few times per second), so the
step loop does not wait on the device for it.
"""

import sys
import time

from tqdm.auto import tqdm

from . import logger

LOG_EVERY_S = 30.0
BAR_REFRESH_S = 0.5


class TrainingProgress:
    """
    :param enabled: False on every rank but 0.
    :param stream: where the bar goes (stderr); a line log replaces the bar
        when it is not a terminal.
    :param interval_s: seconds between log lines when there is no terminal.
    :param clock: time source in seconds (time.monotonic).
    """

    def __init__(self, enabled=True, stream=None, interval_s=LOG_EVERY_S, clock=time.monotonic):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        self.bar = None

    def begin(self, step, total):
        """Training starts (or resumes) at `step`; `total` is the last step, or None when there is no end."""
        self.first_step, self.total = step, total
        self.started = self.last_shown = self.clock()
        if self.enabled and _is_terminal(self.stream):
            self.bar = tqdm(initial=step, total=total, unit="step", desc="training", file=self.stream,
                            dynamic_ncols=True, mininterval=BAR_REFRESH_S)

    def update(self, step, loss):
        """After optimizer step `step`, whose loss is `loss` (a 0-d tensor, read only when shown)."""
        if not self.enabled:
            return
        now = self.clock()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if now - self.last_shown >= BAR_REFRESH_S:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                self.last_shown = now
        elif now - self.last_shown >= self.interval_s:
            logger.log(self.line(step, float(loss), now))
            self.last_shown = now

    def line(self, step, loss, now):
        """'step 120/1500 (8%), 4.12 steps/s, loss 0.0431, about 5 min 35 s left'."""
        rate = (step - self.first_step) / max(now - self.started, 1e-9)
        done = f"step {step}"
        left = ""
        if self.total:
            done += f"/{self.total} ({100 * step // self.total}%)"
            if rate > 0:
                left = f", about {_duration((self.total - step) / rate)} left"
        return f"{done}, {rate:.2f} steps/s, loss {loss:.4f}{left}"

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
