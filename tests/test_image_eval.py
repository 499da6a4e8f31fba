"""
scripts/image_eval.py end to end with a randomly initialised FID Inception-v3:
outputs, caching, inputs, ranks, errors.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from _in_process import run_in_process
from _launch import run_command
from _train_helpers import ROOT, launcher, script_env
from PIL import Image
from test_evaluation import random_inception

from improved_diffusion import dist_util, eval_features, eval_images, evaluation, inception

BATCH = 2
SCRIPT = ROOT / "scripts" / "image_eval.py"


def load_script():
    spec = importlib.util.spec_from_file_location("image_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_inception(seed=1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    """Reference and sample images [N x 32 x 32 x 3] from overlapping distributions."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    samples = np.concatenate([ref[:2] // 2 + 60, rng.integers(40, 220, size=(3, 32, 32, 3), dtype=np.uint8)])
    return ref, samples.astype(np.uint8)


def write_npz(path, images):
    np.savez(path, images)
    return path


def write_folder(path, images):
    path.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


def run_eval(ref, samples, weights, output, kind="python", ranks=1, extra=()):
    """image_eval.py in this process ("python") or on `ranks` real ranks; (the metrics it wrote, its stdout)."""
    args = [ref, samples, "--inception_weights", weights, "--batch_size", BATCH, "--output", output, *extra]
    if kind == "python":
        proc = run_in_process(SCRIPT, args, cwd=ROOT, env=script_env(output.parent))
    else:
        proc = run_command(launcher(kind, ranks) + [SCRIPT, *args], cwd=ROOT, env=script_env(output.parent),
                           timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(output.read_text()), proc.stdout


def expected_metrics(ref, samples, weights):
    """The metrics computed in this process, straight from the library's functions."""
    model = inception.load_inception(str(weights))

    def features(images):
        parts = [inception.extract_features(model, images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    return evaluation.score(evaluation.reference_statistics(features(ref)), features(samples))


@pytest.fixture(scope="module")
def first_run(images, weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("npz")
    ref, samples = write_npz(folder / "ref.npz", images[0]), write_npz(folder / "samples.npz", images[1])
    metrics, out = run_eval(ref, samples, weights, folder / "eval.json")
    return folder, metrics, out


def test_script_prints_and_writes_the_metrics_of_the_library_functions(first_run, images, weights):
    folder, metrics, out = first_run
    expected = expected_metrics(*images, weights)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert metrics["num_ref"] == 6 and metrics["num_samples"] == 5
    assert f"FID              {metrics['fid']:.4f}" in out
    assert f"Recall           {metrics['recall']:.4f}" in out
    assert "reference statistics cached in" in out


def test_reference_statistics_are_cached_with_the_pool_features_and_reused(first_run, images, weights):
    folder, metrics, _ = first_run
    cache = folder / "ref.npz.fid_stats.npz"
    with np.load(cache) as cached:
        assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)
        assert cached["mu_s"].shape == (2023,) and cached["sigma_s"].shape == (2023, 2023)
        assert cached["pool"].shape == (6, 2048)
    before = cache.stat().st_mtime_ns
    again, out = run_eval(folder / "ref.npz", folder / "samples.npz", weights, folder / "again.json")
    assert f"reference statistics from {folder / 'ref.npz.fid_stats.npz'}" in out
    assert cache.stat().st_mtime_ns == before
    assert {k: again[k] for k in metrics if k != "samples"} == {k: metrics[k] for k in metrics if k != "samples"}


def test_the_cache_is_keyed_by_the_reference_files_and_the_weights(images, weights, tmp_path):
    ref = write_npz(tmp_path / "ref.npz", images[0])
    fingerprint = eval_features.input_fingerprint(eval_images.open_images(str(ref)), weights)
    stats = {key: np.ones(2) for key in eval_features.STATS_KEYS}
    assert eval_features.save_statistics(tmp_path / "stats.npz", stats, fingerprint)
    assert eval_features.load_cached_statistics(tmp_path / "stats.npz", fingerprint)["mu"].tolist() == [1, 1]
    os.utime(ref, ns=(0, 0))
    touched = eval_features.input_fingerprint(eval_images.open_images(str(ref)), weights)
    other_weights = tmp_path / "w.pth"
    other_weights.write_bytes(weights.read_bytes() + b"\0")
    reweighted = eval_features.input_fingerprint(eval_images.open_images(str(ref)), other_weights)
    assert len({fingerprint, touched, reweighted}) == 3
    assert eval_features.load_cached_statistics(tmp_path / "stats.npz", touched) is None
    assert eval_features.load_cached_statistics(tmp_path / "missing.npz", fingerprint) is None


def test_two_ranks_on_image_folders_give_the_numbers_of_one_on_the_npz(first_run, images, weights, tmp_path):
    _, metrics, _ = first_run
    ref, samples = write_folder(tmp_path / "ref", images[0]), write_folder(tmp_path / "samples", images[1])
    two, out = run_eval(ref, samples, weights, tmp_path / "eval.json", "torchrun", 2)
    assert (tmp_path / "ref.fid_stats.npz").is_file() and out.count("wrote") == 1
    assert two["num_ref"] == 6 and two["num_samples"] == 5
    for key in ("inception_score", "inception_score_std", "fid", "sfid", "precision", "recall"):
        assert two[key] == metrics[key], key


@pytest.fixture
def script():
    yield load_script()
    dist_util.cleanup_dist()


def error_line(capsys, main, argv, status=1):
    """Run a script's main(argv) in this process; the one `error: ...` line it ends with (exit `status`)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == status and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_weights_error_names_the_file_and_where_to_put_it(script, first_run, monkeypatch, tmp_path, capsys):
    folder, _, _ = first_run
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    err = error_line(capsys, script.main,
                     [str(folder / "ref.npz"), str(folder / "samples.npz"), "--output", str(tmp_path / "x.json")])
    assert inception.WEIGHTS_FILENAME in err and str(tmp_path / "hub" / "checkpoints") in err


@pytest.mark.parametrize(
    "ref, samples, needle",
    [
        (np.zeros((3, 8, 8, 3), np.uint8), np.zeros((6, 8, 8, 3), np.uint8),
         "has 3 image(s); the metrics need at least 4"),
        (np.zeros((6, 8, 8, 3), np.uint8), np.zeros((6, 16, 8, 3), np.uint8), "differ in image size"),
        (np.zeros((6, 8, 8, 3), np.int64), np.zeros((6, 8, 8, 3), np.uint8), "must be uint8"),
    ],
    ids=["too-few", "sizes", "dtype"],
)
def test_bad_inputs_fail_before_any_work(script, weights, tmp_path, ref, samples, needle, capsys):
    argv = [str(write_npz(tmp_path / "r.npz", ref)), str(write_npz(tmp_path / "s.npz", samples)),
            "--inception_weights", str(weights), "--output", str(tmp_path / "x.json")]
    assert needle in error_line(capsys, script.main, argv)
    assert not os.path.exists(tmp_path / "x.json") and not os.path.exists(tmp_path / "r.npz.fid_stats.npz")


def test_errors_print_one_line_without_a_traceback(tmp_path):
    np.savez(tmp_path / "r.npz", images=np.zeros((6, 8, 8, 3), np.uint8))
    proc = run_in_process(SCRIPT, [tmp_path / "r.npz", tmp_path / "r.npz"], cwd=ROOT, env=script_env(tmp_path))
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "has no arr_0" in proc.stderr and "Traceback" not in proc.stderr
