"""
Classifier guidance as a user runs it: classifier_util.classifier_cond_fn's
gradient, and end to end on the bundled digits, a tiny unconditional
diffusion model (image_train.py) guided by a tiny noisy classifier
(classifier_train.py) through classifier_sample.py, scored by
datasets/check_digits.py; then every usage error of classifier_sample.py.
"""

import importlib.util
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
import torch
from _train_helpers import run_script

from improved_diffusion import dist_util, logger
from improved_diffusion.classifier_util import classifier_cond_fn

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets import check_digits, digits  # noqa: E402

NOISE = {"diffusion_steps": 100, "noise_schedule": "cosine"}
IMAGES = {"image_size": 8, "image_channels": 1}  # grayscale, as the demo
MODEL = {**IMAGES, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "", **NOISE}
CLASSIFIER = {**IMAGES, "classifier_width": 32, "classifier_depth": 1, "classifier_attention_resolutions": "",
              "num_classes": 10, **NOISE}
SAMPLING = {"num_samples": 100, "batch_size": 100, "use_ddim": True, "timestep_respacing": "ddim10", "seed": 0}
GUIDED_SCALES = (2, 8)  # the 2, and a scale where this tiny model's share rises far


class LinearClassifier(torch.nn.Module):
    """logits = W x + t * b, in float64: smooth enough for finite differences."""

    def __init__(self, classes=4, features=2 * 3 * 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(classes, features, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(classes, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T + t[:, None] * self.bias


def test_cond_fn_is_the_scaled_gradient_of_the_log_probability_of_y():
    classifier = LinearClassifier()
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, y = torch.tensor([0.0, 5.0, 9.0], dtype=torch.float64), torch.tensor([0, 3, 1])

    def log_p(x):
        return torch.log_softmax(classifier(x, t), dim=-1)[torch.arange(3), y]

    with torch.no_grad():  # as the samplers call it
        grad = classifier_cond_fn(classifier, 2.5)(x, t, y=y, low_res=None)
    assert not x.requires_grad and grad.shape == x.shape
    eps, numeric = 1e-6, torch.zeros_like(x)
    for i in range(x[0].numel()):
        step = torch.zeros_like(x).view(3, -1)
        step[:, i] = eps
        numeric.view(3, -1)[:, i] = (log_p(x + step.view_as(x)) - log_p(x - step.view_as(x))) / (2 * eps)
    torch.testing.assert_close(grad, 2.5 * numeric, rtol=1e-6, atol=1e-8)


def test_cond_fn_without_labels_says_what_to_pass():
    with pytest.raises(ValueError, match=r"pass model_kwargs=\{'y': labels\}"):
        classifier_cond_fn(LinearClassifier(), 1.0)(torch.zeros(1, 2, 3, 3), torch.zeros(1))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diffusion model (30 steps) and a noised classifier (100 steps) trained on the 8x8 digits."""
    root = tmp_path_factory.mktemp("classifier_guidance")
    digits.write_digits(str(root / "digits"), image_size=8, log=lambda *_: None)
    diffusion_flags = {"data_dir": root / "digits", **MODEL, "lr": 2e-3, "batch_size": 32, "ema_rate": 0.99,
                       "max_steps": 30, "save_interval": 1000, "num_workers": 0}
    classifier_flags = {"data_dir": root / "digits", **CLASSIFIER, "lr": 3e-3, "batch_size": 64,
                        "iterations": 100, "log_interval": 50}
    for script, flags, log_dir in [("image_train.py", diffusion_flags, root / "model"),
                                   ("classifier_train.py", classifier_flags, root / "classifier")]:
        code, out, err = run_script(script, flags, log_dir)
        assert code == 0, f"{script} failed:\n{out}\n{err}"
    return {"model": root / "model" / "ema_0.99_000030.pt", "classifier": root / "classifier" / "model000100.pt",
            "root": root}


def sample(runs, scale):
    log_dir = runs["root"] / f"samples_{scale}"
    flags = {"model_path": runs["model"], "classifier_path": runs["classifier"], "classifier_scale": scale,
             **SAMPLING}
    code, out, err = run_script("classifier_sample.py", flags, log_dir)
    assert code == 0, f"classifier_sample.py failed:\n{out}\n{err}"
    with np.load(log_dir / "samples_100x8x8x1.npz") as data:
        return data["arr_0"], data["arr_1"], (log_dir / "log.txt").read_text()


def test_guidance_raises_the_share_of_requested_digits(runs):
    """Seen: 0.12 at scale 0, 0.29 at scale 2, 0.59 at scale 8."""
    images, labels, log = sample(runs, 0)
    assert images.shape == (100, 8, 8, 1) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) >= 8
    assert "not evaluated" in log
    shares = [check_digits.check_samples(images, labels)["share"]]
    for scale in GUIDED_SCALES:
        guided_images, guided_labels, guided_log = sample(runs, scale)
        np.testing.assert_array_equal(labels, guided_labels)  # one label per sample, drawn from the seed
        assert f"classifier guidance at scale {float(scale)}" in guided_log
        shares.append(check_digits.check_samples(guided_images, guided_labels)["share"])
    print("share of requested digits at scales 0, 2, 8:", shares)
    assert shares[0] < 0.25, "an unconditional model makes the requested digit by chance only"
    assert shares[1] >= shares[0] + 0.1 and shares[2] >= shares[1] + 0.15


# ---------------------------------------------------------------- usage errors


def load_script():
    spec = importlib.util.spec_from_file_location("classifier_sample", ROOT / "scripts" / "classifier_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script()


def copy_run(source, folder, with_flags=True, **changes):
    """A copy of checkpoint `source` in `folder`, beside its run's flags.json with `changes` (or without flags.json)."""
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    if with_flags:
        flags = json.loads((source.parent / "flags.json").read_text())
        (folder / "flags.json").write_text(json.dumps({**flags, **changes}))
    return folder / source.name


def sample_error(capsys, monkeypatch, tmp_path, argv, status=1):
    """Run classifier_sample.py in this process with `argv`; its one-line error (exit `status`)."""
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "log"))
    with pytest.raises(SystemExit) as info:
        SCRIPT.main([str(a) for a in argv])
    logger.reset()
    assert info.value.code == status and not dist_util.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "log").exists(), "nothing is written before the flags are checked"
    return err


def test_a_classifier_scale_needs_a_classifier(capsys, monkeypatch, tmp_path, runs):
    err = sample_error(capsys, monkeypatch, tmp_path, ["--model_path", runs["model"], "--classifier_scale", 2], 2)
    assert "--classifier_scale needs --classifier_path" in err


def test_a_classifier_of_another_image_size_is_refused(capsys, monkeypatch, tmp_path, runs):
    path = copy_run(runs["classifier"], tmp_path / "c", image_size=16)
    err = sample_error(capsys, monkeypatch, tmp_path, ["--model_path", runs["model"], "--classifier_path", path])
    assert "was trained on 16x16 images" in err and "makes 8x8: use a classifier trained with" in err


def test_a_classifier_of_other_channels_is_refused(capsys, monkeypatch, tmp_path, runs):
    path = copy_run(runs["classifier"], tmp_path / "c", image_channels=3)
    err = sample_error(capsys, monkeypatch, tmp_path, ["--model_path", runs["model"], "--classifier_path", path])
    assert "reads 3-channel images" in err and "makes 1-channel ones" in err and "--image_channels 1" in err


def test_a_classifier_of_another_noise_process_is_refused(capsys, monkeypatch, tmp_path, runs):
    path = copy_run(runs["classifier"], tmp_path / "c", diffusion_steps=50)
    err = sample_error(capsys, monkeypatch, tmp_path, ["--model_path", runs["model"], "--classifier_path", path])
    assert "another noise process" in err and "--diffusion_steps 50 (the model's: 100)" in err


def test_class_counts_must_agree_with_num_classes(capsys, monkeypatch, tmp_path, runs):
    argv = ["--model_path", runs["model"], "--classifier_path", runs["classifier"], "--num_classes", 5]
    err = sample_error(capsys, monkeypatch, tmp_path, argv)
    assert "has 10 classes but --num_classes is 5: drop --num_classes" in err


def test_class_counts_must_agree_with_a_class_conditional_model(capsys, monkeypatch, tmp_path, runs):
    model = copy_run(runs["model"], tmp_path / "m", class_cond=True, num_classes=5)
    err = sample_error(capsys, monkeypatch, tmp_path, ["--model_path", model, "--classifier_path", runs["classifier"]])
    assert "has 10 classes, the class-conditional model" in err and "has 5" in err
    assert "classifier_train.py --num_classes 5" in err


def test_a_checkpoint_that_does_not_fit_its_flags_is_named(capsys, monkeypatch, tmp_path, runs):
    path = copy_run(runs["classifier"], tmp_path / "c", with_flags=False)  # classifier_defaults(): width 128
    argv = ["--model_path", runs["model"], "--classifier_path", path]
    err = sample_error(capsys, monkeypatch, tmp_path, argv)
    assert f"the classifier checkpoint {path} does not fit the classifier flags (--classifier_width 128" in err
    assert "of another shape" in err and "keep the flags.json of its classifier_train.py run beside it" in err


def test_flags_that_contradict_the_classifier_run_or_another_run_are_named(capsys, monkeypatch, tmp_path, runs):
    argv = ["--model_path", runs["model"], "--classifier_path", runs["classifier"], "--classifier_width", 64]
    assert "--classifier_width 64 (trained with 32)" in sample_error(capsys, monkeypatch, tmp_path, argv)
    argv = ["--model_path", runs["model"], "--classifier_path", runs["model"]]
    assert "is not a classifier trained by classifier_train.py" in sample_error(capsys, monkeypatch, tmp_path, argv)
