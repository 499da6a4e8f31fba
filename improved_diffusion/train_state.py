"""
Run state of a training loop beyond its weights: the random-number streams
(saved for exact resume), statistics kept on the device between log steps
(so a step needs no host synchronization), and stop requests from signals.
"""

import contextlib
import random
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist


def rank_seed(seed, rank, stream, step=0):
    """A 63-bit seed for random stream number `stream` of `rank` from `step` on, derived from the run's `seed`."""
    return int(np.random.SeedSequence([seed, rank, stream, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_streams(generator, seed, rank, step, dropout_stream=0, sampling_stream=1):
    """
    Seed a training loop's two streams for `step`: dropout (torch's global
    generator) and timestep/noise sampling (`generator`), each from (seed,
    rank, stream, step); with seed None, `generator` draws from torch's global one.
    """
    if seed is None:
        generator.manual_seed(int(torch.randint(2**62, ()).item()))
        return
    torch.manual_seed(rank_seed(seed, rank, dropout_stream, step))
    generator.manual_seed(rank_seed(seed, rank, sampling_stream, step))


def control_group(world_size):
    """A gloo group for host-side agreement (stop requests) that never waits on a GPU; None where not needed."""
    if world_size == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(generator):
    """
    This process's random-number state: Python, NumPy, torch CPU (dropout on
    CPU), torch CUDA of the current device, and `generator` (timesteps and
    noise). Plain tensors and Python data, loadable with weights_only=True.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
    }


def restore_rng(state, generator):
    """Undo capture_rng: put every stream back where it was."""
    random.setstate(_as_tuples(state["python"]))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    generator.set_state(state["generator"])


def _as_tuples(value):
    """random.setstate wants tuples where a round trip may have left lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class StepStats:
    """
    Per-interval statistics of the updates, accumulated on the device:
    grad-norm sums, good and skipped (non-finite) step counts, and the longest
    run of consecutive skipped steps. read() brings them to the host in one
    transfer. (The loss terms go to the logger as device tensors: train_core.log_loss_dict.)
    """

    def __init__(self, device):
        self.device = device
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.longest_bad_streak = torch.zeros((), dtype=torch.int64, device=device)

    def add_step(self, ok, grad_norm):
        """
        :param ok: a 0-d bool tensor, whether the step was applied.
        :param grad_norm: a 0-d tensor, the step's gradient norm.
        """
        self.grad_norm_sum += torch.where(ok, grad_norm.to(torch.float64), 0.0)
        self.good_steps += ok
        self.bad_steps += ~ok
        self.bad_streak.copy_(torch.where(ok, 0, self.bad_streak + 1))
        torch.maximum(self.longest_bad_streak, self.bad_streak, out=self.longest_bad_streak)

    def read(self):
        """
        The interval's statistics as Python numbers (one device-to-host copy),
        then start a new interval (the current bad streak carries over).

        :return: dict with "grad_norm" (mean over applied steps, or None),
            "bad_steps", "longest_bad_streak", "bad_streak".
        """
        scalars = [self.grad_norm_sum, self.good_steps, self.bad_steps, self.longest_bad_streak, self.bad_streak]
        grad_norm_sum, good, bad, longest, streak = torch.stack([s.double() for s in scalars]).tolist()
        self._start_interval()
        return {
            "grad_norm": grad_norm_sum / good if good else None,
            "bad_steps": int(bad),
            "longest_bad_streak": int(longest),
            "bad_streak": int(streak),
        }

    def _start_interval(self):
        self.grad_norm_sum.zero_()
        self.good_steps.zero_()
        self.bad_steps.zero_()
        self.longest_bad_streak.copy_(self.bad_streak)

    def state_dict(self):
        """The part that outlives an interval: the current streak of skipped steps."""
        return {"bad_streak": self.bad_streak.item()}

    def load_state_dict(self, state):
        self.bad_streak.fill_(state["bad_streak"])
        self.longest_bad_streak.fill_(state["bad_streak"])


class StopRequest:
    """
    Records SIGTERM / SIGINT while installed, so that the loop can stop at a
    step boundary; a second SIGINT interrupts at once (KeyboardInterrupt).
    Handlers are installed only from the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, world_size, group=None):
        """
        The signal any rank received (SIGTERM when only another rank did), or
        None: the same answer on every rank (call on all of them).
        """
        requested = self.signum is not None
        if world_size > 1:
            flag = torch.tensor([int(requested)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            requested = bool(flag.item())
        return (self.signum or signal.SIGTERM) if requested else None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
