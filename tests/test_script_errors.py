"""
Every script, called in this process as main(argv): a bad flag value exits
with status 2 and one `error: ...` line naming the flag; a missing or
malformed input file (checkpoint, flags.json, data folder, npz) exits with
status 1 and one `error: ...` line naming the file; never a traceback, and
nothing written before the check.
"""

import numpy as np
import pytest
from _train_helpers import write_images
from test_flags import assert_error_line, run_main, saved_run  # noqa: F401 (saved_run is a fixture)


def check(name, argv, tmp_path, monkeypatch, capsys, status, *needles):
    log_dir = tmp_path / f"log_{len(list(tmp_path.iterdir()))}"
    code, _, err = run_main(name, argv, log_dir, monkeypatch, capsys)
    assert_error_line(code, err, status, *needles)
    return log_dir


@pytest.fixture
def files(tmp_path, saved_run):  # noqa: F811
    """A good checkpoint, a garbage one, one beside a malformed flags.json, images, and a bad npz."""
    garbage = tmp_path / "garbage" / "model000001.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    bad_flags = tmp_path / "bad_flags" / "model000001.pt"
    bad_flags.parent.mkdir()
    bad_flags.write_bytes((saved_run / "model000001.pt").read_bytes())
    (bad_flags.parent / "flags.json").write_text('{"image_size": 8,')
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"PK not really")
    return {"model": saved_run / "model000001.pt", "garbage": garbage, "bad_flags": bad_flags,
            "images": write_images(tmp_path / "images", 4), "missing": tmp_path / "missing", "bad_npz": bad_npz}


def test_image_train(files, tmp_path, monkeypatch, capsys):
    check("image_train", ["--data_dir", files["images"], "--lr", "fast"], tmp_path, monkeypatch, capsys, 2,
          "--lr", "'fast'")
    check("image_train", ["--data_dir", files["missing"]], tmp_path, monkeypatch, capsys, 1, files["missing"])
    argv = ["--data_dir", files["images"], "--resume_checkpoint", files["garbage"], "--image_size", 8,
            "--num_channels", 32, "--num_res_blocks", 1, "--attention_resolutions", "", "--batch_size", 2,
            "--allow_partial_resume", True]
    check("image_train", argv, tmp_path, monkeypatch, capsys, 1, files["garbage"])


def test_super_res_train(files, tmp_path, monkeypatch, capsys):
    check("super_res_train", ["--data_dir", files["images"], "--small_size", "half"], tmp_path, monkeypatch,
          capsys, 2, "--small_size")
    argv = ["--data_dir", files["missing"], "--large_size", 8, "--small_size", 4]
    check("super_res_train", argv, tmp_path, monkeypatch, capsys, 1, files["missing"])


def test_classifier_train(files, tmp_path, monkeypatch, capsys):
    check("classifier_train", ["--data_dir", files["images"], "--noised", "maybe"], tmp_path, monkeypatch, capsys,
          2, "--noised", "maybe")
    check("classifier_train", ["--data_dir", files["missing"], "--image_size", 8], tmp_path, monkeypatch, capsys,
          1, files["missing"])


def test_image_sample(files, tmp_path, monkeypatch, capsys):
    check("image_sample", ["--model_path", files["model"], "--num_samples", "many"], tmp_path, monkeypatch, capsys,
          2, "--num_samples", "'many'")
    for key in ("missing", "garbage"):
        log_dir = check("image_sample", ["--model_path", files[key]], tmp_path, monkeypatch, capsys, 1, files[key])
        assert not log_dir.exists()
    check("image_sample", ["--model_path", files["bad_flags"]], tmp_path, monkeypatch, capsys, 1,
          files["bad_flags"].parent / "flags.json", "not valid JSON")


def test_super_res_sample(files, tmp_path, monkeypatch, capsys):
    check("super_res_sample", ["--model_path", files["model"], "--eta", "x"], tmp_path, monkeypatch, capsys, 2,
          "--eta")
    for key in ("missing", "bad_npz"):
        argv = ["--model_path", files["garbage"], "--base_samples", files[key], "--large_size", 8, "--small_size", 4]
        check("super_res_sample", argv, tmp_path, monkeypatch, capsys, 1, files[key])
    np.savez(tmp_path / "low.npz", np.zeros((2, 4, 4, 3), np.uint8))
    argv = ["--model_path", files["missing"], "--base_samples", tmp_path / "low.npz", "--large_size", 8,
            "--small_size", 4]
    check("super_res_sample", argv, tmp_path, monkeypatch, capsys, 1, files["missing"])


def test_image_nll(files, tmp_path, monkeypatch, capsys):
    check("image_nll", ["--model_path", files["model"], "--data_dir", files["images"], "--clip_denoised", "maybe"],
          tmp_path, monkeypatch, capsys, 2, "--clip_denoised")
    check("image_nll", ["--model_path", files["model"], "--data_dir", files["missing"]], tmp_path, monkeypatch,
          capsys, 1, files["missing"])
    check("image_nll", ["--model_path", files["garbage"], "--data_dir", files["images"]], tmp_path, monkeypatch,
          capsys, 1, files["garbage"])


def test_classifier_sample(files, tmp_path, monkeypatch, capsys):
    check("classifier_sample", ["--model_path", files["model"], "--classifier_scale", "strong"], tmp_path,
          monkeypatch, capsys, 2, "--classifier_scale")
    argv = ["--model_path", files["model"], "--classifier_path", files["missing"]]
    check("classifier_sample", argv, tmp_path, monkeypatch, capsys, 1, files["missing"])


def test_search_timesteps(files, tmp_path, monkeypatch, capsys):
    check("search_timesteps", ["--model_path", files["model"], "--steps", "ten"], tmp_path, monkeypatch, capsys, 2,
          "--steps")
    check("search_timesteps", ["--model_path", files["garbage"], "--output", tmp_path / "s.json"], tmp_path,
          monkeypatch, capsys, 1, files["garbage"])


def test_image_eval(files, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "ok.npz", np.zeros((4, 8, 8, 3), np.uint8))
    check("image_eval", [tmp_path / "ok.npz", tmp_path / "ok.npz", "--batch_size", "0"], tmp_path, monkeypatch,
          capsys, 2, "--batch_size")
    check("image_eval", [files["missing"], tmp_path / "ok.npz"], tmp_path, monkeypatch, capsys, 1, files["missing"])
    check("image_eval", [tmp_path / "ok.npz", files["bad_npz"]], tmp_path, monkeypatch, capsys, 1, files["bad_npz"])


def test_plot_progress(files, tmp_path, monkeypatch, capsys):
    check("plot_progress", [tmp_path, "--colour", "red"], tmp_path, monkeypatch, capsys, 2, "--colour")
    check("plot_progress", [files["missing"]], tmp_path, monkeypatch, capsys, 1, files["missing"])


def test_reconstruct_ema(files, tmp_path, monkeypatch, capsys):
    check("reconstruct_ema", ["--log_dir", tmp_path, "--ema_std", "0.5"], tmp_path, monkeypatch, capsys, 2,
          "--ema_std")
    (tmp_path / "phema_0.050_000010.pt").write_bytes(b"truncated")
    (tmp_path / "phema_0.100_000010.pt").write_bytes(b"truncated")
    check("reconstruct_ema", ["--log_dir", tmp_path, "--ema_std", "0.08"], tmp_path, monkeypatch, capsys, 1,
          tmp_path / "phema_0.050_000010.pt")


def test_convert_checkpoint(files, tmp_path, monkeypatch, capsys):
    check("convert_checkpoint", [files["model"], tmp_path / "copy.pt"], tmp_path, monkeypatch, capsys, 2,
          "exactly one of them must end in .safetensors")
    for key in ("missing", "garbage"):
        check("convert_checkpoint", [files[key], tmp_path / "out.safetensors"], tmp_path, monkeypatch, capsys, 1,
              files[key])
