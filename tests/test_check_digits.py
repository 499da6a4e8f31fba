"""Tests for datasets/check_digits.py, the recognizability check for digit samples."""

import pathlib
import sys

import numpy as np
import pytest
from _in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets import check_digits, digits, prep_util  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def real_samples():
    """Every real digit rendered as datasets/digits.py writes it: perfect samples."""
    levels, labels = digits.load_digit_arrays()
    images = np.stack([np.asarray(digits.render_digit(x, SIZE)) for x in levels])
    return images, labels


def run_check(*args):
    """datasets/check_digits.py as a user runs it from the repository root (in this process)."""
    return run_in_process("datasets/check_digits.py", args, cwd=ROOT)


def test_real_digits_score_high(real_samples):
    images, labels = real_samples
    result = check_digits.check_samples(images, labels)
    assert result["classifier_accuracy"] > 0.9
    assert result["share"] > 0.9
    assert result["mean_confidence"] > 0.7
    assert result["in_distribution"] > 0.9
    assert result["num_samples"] == len(labels) and result["image_size"] == SIZE
    assert [row["requested"] for row in result["per_class"]] == np.bincount(labels, minlength=10).tolist()
    assert sum(row["predicted"] for row in result["per_class"]) == len(labels)
    assert all(row["share"] > 0.8 for row in result["per_class"])


def test_shuffled_labels_score_low(real_samples):
    images, labels = real_samples
    shuffled = np.random.default_rng(0).permutation(labels)
    result = check_digits.check_samples(images, shuffled)
    assert result["share"] < 0.3 and result["mean_confidence"] < 0.3


def test_noise_scores_low(real_samples):
    _, labels = real_samples
    noise = np.random.default_rng(1).integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    result = check_digits.check_samples(noise, labels)
    assert result["share"] < 0.3 and result["mean_confidence"] < 0.3
    assert result["in_distribution"] < 0.1


def test_features_recover_the_source_digit():
    levels, _ = digits.load_digit_arrays()
    rendered = np.asarray(digits.render_digit(levels[7], 32))[None]
    features = check_digits.to_features(rendered)[0].reshape(8, 8)
    assert np.abs(features - levels[7]).mean() < 1.5


def test_rejects_malformed_inputs(real_samples):
    images, labels = real_samples
    with pytest.raises(prep_util.PrepError, match="0..9"):
        check_digits.check_samples(images[:3], np.array([0, 1, 10]))
    with pytest.raises(prep_util.PrepError, match="integer labels"):
        check_digits.check_samples(images[:3], labels[:2])
    with pytest.raises(prep_util.PrepError, match="square"):
        check_digits.check_samples(images[:3, :, :12], labels[:3])


def run_main(monkeypatch, *args):
    """Run check_digits' command line in this process (reusing the trained checker)."""
    monkeypatch.setattr(sys, "argv", ["check_digits.py", *map(str, args)])
    check_digits.main()


def test_cli_min_share(tmp_path, monkeypatch, capsys, real_samples):
    images, labels = real_samples
    good = tmp_path / "good.npz"
    np.savez(good, images[:300], labels[:300])
    run_main(monkeypatch, good, "--min_share", 0.8)
    out = capsys.readouterr().out
    assert "classified as the requested digit" in out and "digit  requested" in out
    bad = tmp_path / "bad.npz"
    np.savez(bad, images[:300], np.random.default_rng(2).permutation(labels[:300]))
    with pytest.raises(SystemExit, match="below --min_share"):
        run_main(monkeypatch, bad, "--min_share", 0.8)


def test_cli_needs_labels(tmp_path, real_samples):
    images, _ = real_samples
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, images[:10])
    result = run_check(unlabeled)
    assert result.returncode == 1 and "arr_1" in result.stderr and "unlabeled.npz" in result.stderr
    result = run_check(tmp_path / "missing.npz")
    assert result.returncode == 1 and "missing.npz" in result.stderr
