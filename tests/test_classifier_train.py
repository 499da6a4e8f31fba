"""
The noisy classifier's training (classifier_util.ClassifierTrainLoop and
scripts/classifier_train.py): metrics, microbatches, the learning-rate
schedule, checkpoint sets, exact resume, stop signals and flag / data errors.
The script runs in this process (its main(argv)), on tiny classifiers.
"""

import contextlib
import importlib.util
import os
import pathlib
import signal

import pytest
import torch
from _train_helpers import assert_same_files, single_thread, write_images

from improved_diffusion import logger
from improved_diffusion.classifier_util import ClassifierTrainLoop, top_k_accuracy
from improved_diffusion.io_util import load_checkpoint
from improved_diffusion.script_util import classifier_and_diffusion_defaults, create_classifier_and_diffusion

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_CLASSIFIER = {
    "image_size": 8,
    "classifier_width": 32,
    "classifier_depth": 1,
    "classifier_attention_resolutions": "",
    "diffusion_steps": 8,
    "noise_schedule": "cosine",
    "num_classes": 2,
}
RUN_FLAGS = {**TINY_CLASSIFIER, "batch_size": 4, "microbatch": 3, "log_interval": 2, "eval_interval": 2,
             "save_interval": 3, "lr": 1e-3, "seed": 0}


def load_script():
    spec = importlib.util.spec_from_file_location("classifier_train", ROOT / "scripts" / "classifier_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script()


@contextlib.contextmanager
def isolated(log_dir):
    """Log to `log_dir` with one thread, then put back torch's random state, the environment and the logger."""
    with pytest.MonkeyPatch.context() as patch, single_thread(), torch.random.fork_rng():
        patch.setenv("OPENAI_LOGDIR", str(log_dir))
        patch.setenv("OPENAI_LOG_FORMAT", "csv,log")
        yield
    logger.reset()


def train(log_dir, **flags):
    """Run classifier_train.py's main in this process; returns its exit status (0 when it returned)."""
    argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    with isolated(log_dir):
        try:
            SCRIPT.main(argv)
        except SystemExit as exc:
            return exc.code
    return 0


def labeled_images(folder, per_class=6, classes=("cat", "dog")):
    for name in classes:
        write_images(folder, per_class, prefix=name)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier_data")
    return {"data_dir": labeled_images(root / "train"), "val_data_dir": labeled_images(root / "val", per_class=3)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """6 uninterrupted steps (sets at 3 and 6), with validation data and uneven microbatches."""
    log_dir = tmp_path_factory.mktemp("full")
    assert train(log_dir, iterations=6, **data, **RUN_FLAGS) == 0
    return log_dir


def test_top_k_accuracy_counts_the_label_among_the_k_best():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([1, 0, 1])
    assert top_k_accuracy(logits, labels, 1).tolist() == [0.0, 0.0, 1.0]
    assert top_k_accuracy(logits, labels, 2).tolist() == [1.0, 0.0, 1.0]
    assert top_k_accuracy(logits, labels, 5).tolist() == [1.0, 1.0, 1.0], "top-5 of 3 classes is every class"


def test_the_run_logs_train_and_val_metrics_per_quartile(full_run):
    rows = (full_run / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("loss", "acc@1", "acc@5"):
        assert f"train_{key}" in header and f"val_{key}" in header
        assert {f"train_{key}_q{q}" for q in range(4)} <= set(header), f"train_{key} per quartile"
        # 12 validation images in all: a quartile of t may go undrawn.
        assert any(f"val_{key}_q{q}" in header for q in range(4)), f"val_{key} per quartile"
    steps = [dict(zip(header, row.split(",")))["step"] for row in rows[1:]]
    assert steps == ["2", "4", "6"]
    last = dict(zip(header, rows[-1].split(",")))
    assert last["samples"] == "24" and float(last["val_acc@5"]) == 1.0, "2 classes: always in the top 5"


def test_checkpoint_sets_are_complete_and_the_model_file_is_a_plain_state_dict(full_run):
    names = {p.name for p in full_run.iterdir()}
    for step in (3, 6):
        assert {f"model{step:06d}.pt", f"opt{step:06d}.pt", f"state{step:06d}.pt"} <= names
    assert "flags.json" in names and not [n for n in names if n.endswith(".tmp")]
    classifier, _ = create_classifier_and_diffusion(**{**classifier_and_diffusion_defaults(), **TINY_CLASSIFIER})
    classifier.load_state_dict(load_checkpoint(full_run / "model000006.pt"))
    state = load_checkpoint(full_run / "state000006.pt")
    assert state["step"] == 6 and state["flags"]["num_classes"] == 2
    assert state["ranks"][0]["data"] is not None and state["ranks"][0]["val_data"] is not None


def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_one_does(tmp_path, data, full_run):
    # (Without --anneal_lr: the decay is over --iterations, so a 3-step run would take other steps.)
    first = tmp_path / "first"
    assert train(first, iterations=3, **data, **RUN_FLAGS) == 0
    assert train(tmp_path / "second", iterations=6, resume_checkpoint=first / "model000003.pt",
                 **data, **RUN_FLAGS) == 0
    assert_same_files(full_run, tmp_path / "second", ["model000006.pt", "opt000006.pt"])
    # --resume_checkpoint auto continues the newest complete set in the log directory itself.
    assert train(first, iterations=6, resume_checkpoint="auto", **data, **RUN_FLAGS) == 0
    assert_same_files(full_run, first, ["model000006.pt", "opt000006.pt"])


class LabeledBatches:
    """Endless random batches of [n x 3 x 8 x 8] with labels 0..1; sends `signum` to this process at batch `at`."""

    def __init__(self, n=3, signum=None, at=None):
        self.n, self.signum, self.at, self.index = n, signum, at, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.index)
        if self.index == self.at:
            os.kill(os.getpid(), self.signum)
        self.index += 1
        return torch.rand(self.n, 3, 8, 8, generator=g) * 2 - 1, {"y": torch.randint(2, (self.n,), generator=g)}


def make_loop(log_dir, **overrides):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    torch.manual_seed(0)
    model, diffusion = create_classifier_and_diffusion(**{**classifier_and_diffusion_defaults(), **TINY_CLASSIFIER})
    args = dict(model=model, diffusion=diffusion, data=LabeledBatches(), batch_size=3, microbatch=-1, lr=1e-3,
                iterations=4, log_interval=100, save_interval=100, resume_checkpoint="", seed=0)
    return ClassifierTrainLoop(**{**args, **overrides})


def gradient(loop):
    batch, cond = next(loop.data)
    loop.forward_backward(batch, cond["y"])
    return [p.grad.clone() for p in loop.model.parameters()]


def test_microbatches_weighted_by_their_share_give_the_full_batch_gradient(tmp_path):
    with isolated(tmp_path):
        whole = gradient(make_loop(tmp_path))
        split = gradient(make_loop(tmp_path, microbatch=2))  # parts of 2 and 1 images
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_anneal_lr_decays_linearly_to_zero_over_the_iterations(tmp_path):
    with isolated(tmp_path):
        loop = make_loop(tmp_path, anneal_lr=True, lr=0.4)
        lrs = []
        for _ in range(4):
            loop.run_step(*next(loop.data))
            lrs.append(loop.opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_without_noise_every_example_is_clean_at_t_0(tmp_path):
    with isolated(tmp_path):
        loop = make_loop(tmp_path, noised=False)
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        keys = set(logger.getkvs())
        x_t, t, _ = loop._noised(batch, cond["y"])
    assert "train_loss_q0" in keys and not {"train_loss_q1", "train_loss_q2", "train_loss_q3"} & keys
    assert torch.equal(x_t, batch) and not t.any()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_saves_and_stops(tmp_path, signum):
    with isolated(tmp_path):
        loop = make_loop(tmp_path, data=LabeledBatches(signum=signum, at=1), iterations=10)
        loop.run_loop()
    assert (loop.step, loop.stop_signal) == (2, signum)
    assert {"model000002.pt", "opt000002.pt", "state000002.pt"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "change, needle, status",
    [
        ({"data_dir": ""}, "--data_dir is required", 2),
        ({"num_classes": 1}, "has 2 classes (cat, dog), more than --num_classes 1: pass --num_classes 2", 1),
        ({"val_data_dir": "OTHER"}, "labels are numbered by sorted class name, so both folders need the same", 1),
        ({"data_dir": "EMPTY"}, "EMPTY", 1),
        ({"classifier_use_fp16": True}, "--classifier_use_fp16 True: classifier_train.py trains in float32", 2),
        ({"eval_interval": 0}, "--eval_interval 0 must be at least 1", 2),
        ({"classifier_pool": "max"}, "unknown --classifier_pool 'max'", 2),
    ],
)
def test_bad_flags_and_data_fail_with_one_error_line(tmp_path, capsys, data, change, needle, status):
    other = labeled_images(tmp_path / "other", per_class=2, classes=("cat", "cow"))
    (tmp_path / "empty").mkdir()
    flags = {**data, **RUN_FLAGS, "iterations": 1, **change}
    for key, value in flags.items():
        flags[key] = {"OTHER": other, "EMPTY": tmp_path / "empty"}.get(value, value)
    needle = needle.replace("EMPTY", str(tmp_path / "empty"))
    assert train(tmp_path / "log", **flags) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_resuming_an_incomplete_set_names_the_missing_file(tmp_path, capsys, data, full_run):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for name in ("model000003.pt", "opt000003.pt"):
        (folder / name).write_bytes((full_run / name).read_bytes())
    assert train(tmp_path / "log", iterations=6, resume_checkpoint=folder / "model000003.pt", **data, **RUN_FLAGS) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'state000003.pt'} is missing" in err and "no set there is complete" in err, err


def test_load_classifier_takes_every_weight_from_the_checkpoint_and_draws_no_random_numbers(tmp_path):
    from improved_diffusion.classifier_util import load_classifier
    from improved_diffusion.script_util import classifier_defaults, create_classifier

    flags = {**classifier_defaults(), "image_size": 8, "image_channels": 1, "num_classes": 10,
             "classifier_width": 32, "classifier_depth": 1, "classifier_attention_resolutions": "4"}
    torch.manual_seed(0)
    classifier = create_classifier(**flags)
    for p in classifier.parameters():  # the zero-initialized layers too
        p.data.normal_()
    torch.save(classifier.state_dict(), tmp_path / "model000001.pt")
    rng = torch.random.get_rng_state()
    loaded = load_classifier(str(tmp_path / "model000001.pt"), flags)
    assert torch.equal(torch.random.get_rng_state(), rng), "the weights were randomly initialized before loading"
    assert not loaded.training
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), classifier.eval()(x, t), rtol=0, atol=0)
