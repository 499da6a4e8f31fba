"""Training progress between log intervals: a bar on a terminal, a line every 30 s in a log file."""

import io

import pytest
import torch
from _train_helpers import make_loop, train_env  # noqa: F401 (fixture)

from improved_diffusion import progress as progress_module
from improved_diffusion.progress import TrainingProgress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class CountingLoss:
    """A loss whose reads are counted (a device read each, on a GPU)."""

    def __init__(self, value):
        self.value, self.reads = value, 0

    def __float__(self):
        self.reads += 1
        return self.value


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(progress_module.logger, "log", lines.append)
    return lines


def test_without_a_terminal_a_line_every_interval_reading_the_loss_only_then(logged):
    clock = FakeClock()
    shown = TrainingProgress(stream=io.StringIO(), clock=clock)
    shown.begin(step=100, total=400)
    losses = []
    for step in range(101, 201):  # one step per second for 100 s
        clock.now += 1.0
        losses.append(CountingLoss(0.25))
        shown.update(step, losses[-1])
    assert logged == [
        "step 130/400 (32%), 1.00 steps/s, loss 0.2500, about 4 min 30 s left",
        "step 160/400 (40%), 1.00 steps/s, loss 0.2500, about 4 min 0 s left",
        "step 190/400 (47%), 1.00 steps/s, loss 0.2500, about 3 min 30 s left",
    ]
    assert sum(loss.reads for loss in losses) == 3


def test_a_run_without_an_end_shows_steps_and_rate_only(logged):
    clock = FakeClock()
    shown = TrainingProgress(stream=io.StringIO(), clock=clock, interval_s=10)
    shown.begin(step=0, total=None)
    clock.now = 10.0
    shown.update(40, torch.tensor(1.5))
    assert logged == ["step 40, 4.00 steps/s, loss 1.5000"]


def test_on_a_terminal_a_bar_with_steps_total_rate_and_loss(logged):
    clock, stream = FakeClock(), Terminal()
    shown = TrainingProgress(stream=stream, clock=clock)
    shown.begin(step=2, total=10)
    for step in range(3, 11):
        clock.now += 1.0
        shown.update(step, torch.tensor(0.125))
    shown.close()
    text = stream.getvalue()
    assert "training" in text and "10/10" in text and "loss=0.1250" in text and "step" in text
    assert logged == []


def test_other_ranks_show_nothing(logged):
    clock, stream = FakeClock(), Terminal()
    shown = TrainingProgress(enabled=False, stream=stream, clock=clock, interval_s=0)
    shown.begin(step=0, total=5)
    clock.now = 100.0
    shown.update(1, CountingLoss(1.0))
    assert stream.getvalue() == "" and logged == []


@pytest.mark.usefixtures("train_env")
def test_the_training_loop_reports_every_step_to_its_end(tmp_path, logged):
    clock = FakeClock()

    class Ticking(TrainingProgress):
        def update(self, step, loss):
            clock.now += 60.0
            super().update(step, loss)

    loop = make_loop(tmp_path, max_steps=3, progress=Ticking(stream=io.StringIO(), clock=clock))
    loop.run_loop()
    shown = [line for line in logged if line.startswith("step ")]
    assert [line.split(",")[0] for line in shown] == ["step 1/3 (33%)", "step 2/3 (66%)", "step 3/3 (100%)"]
    assert all(float(line.split("loss ")[1].split(",")[0]) > 0 for line in shown)
