"""
scripts/image_restore.py end to end, its main(argv) called in this process,
on tiny models trained for two steps by image_train.py: every task from an
npz, inpainting from a folder of PNGs with a mask PNG, SDEdit without a task,
the labels of a class-conditional model, and every error as one `error:`
line with its exit status, before any output is written.
"""

import os
import pathlib
import re

import numpy as np
import pytest
from _in_process import run_in_process
from _train_helpers import single_thread, write_images
from test_flags import run_main
from PIL import Image


ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--image_size", 8, "--num_channels", 32, "--num_res_blocks", 1, "--attention_resolutions", "",
        "--diffusion_steps", 20, "--noise_schedule", "cosine", "--learn_sigma", True]
FAST = ["--timestep_respacing", 5, "--seed", 3]
ERROR_LINE = re.compile(r"input (\d+) restoration (\d+): \|\|A\(x\) - y\|\| = (\S+)")


def train(workspace, name, data_dir, flags):
    log_dir = workspace / name
    args = ["--data_dir", data_dir, "--batch_size", 4, "--max_steps", 2, "--seed", 0, "--lr", 1e-3, *flags]
    env = dict(os.environ, OPENAI_LOGDIR=str(log_dir), OMP_NUM_THREADS="1")
    result = run_in_process(ROOT / "scripts" / "image_train.py", args, env=env)
    assert result.returncode == 0, result.stderr
    return sorted(log_dir.glob("model*.pt"))[-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("restore")


@pytest.fixture(scope="module")
def data_dir(workspace):
    folder = write_images(workspace / "data", 8, size=8)
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        path.rename(folder / f"{'ab'[i % 2]}_{i}.png")
    return folder


@pytest.fixture(scope="module")
def model(workspace, data_dir):
    return train(workspace, "uncond", data_dir, TINY)


@pytest.fixture(scope="module")
def cond_model(workspace, data_dir):
    return train(workspace, "cond", data_dir, [*TINY, "--class_cond", True, "--num_classes", 2])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def npz(workspace, images):
    path = workspace / "inputs.npz"
    np.savez(path, images, np.array([1, 0, 1]))
    return path


def restore_main(argv, log_dir, monkeypatch, capsys):
    """Run scripts/image_restore.py's main(argv) here on one thread; (exit status, stdout, stderr)."""
    with single_thread():
        return run_main("image_restore", argv, log_dir, monkeypatch, capsys)


def outputs(log_dir, count, channels=3):
    """(arr_0, arr_1 or None) of the npz, after checking it and the grid are there."""
    stem = log_dir / f"restored_{count}x8x8x{channels}"
    assert (log_dir / f"{stem.name}_grid.png").exists()
    with np.load(f"{stem}.npz") as data:
        return data["arr_0"], data["arr_1"] if "arr_1" in data.files else None


def printed_errors(out):
    return {(int(i), int(r)): float(e) for i, r, e in ERROR_LINE.findall(out)}


@pytest.mark.parametrize("task", ["inpaint", "super_res", "deblur", "colorize"])
def test_every_task_restores_an_npz_consistently_with_its_measurement(workspace, model, npz, images, task,
                                                                      monkeypatch, capsys):
    log_dir = workspace / f"out_{task}"
    extra = ["--mask", "half"] if task == "inpaint" else []
    argv = ["--model_path", model, "--input", npz, "--task", task, *extra, "--num_samples_per_input", 2,
            "--batch_size", 4, *FAST]
    status, out, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert status == 0, err
    restored, labels = outputs(log_dir, 6)
    assert restored.dtype == np.uint8 and restored.shape == (6, 8, 8, 3) and labels is None
    errors = printed_errors(out)
    assert sorted(errors) == [(i, r) for i in range(3) for r in range(2)]
    limit = 1e-2 if task == "deblur" else 1e-5  # deblurring is exact only on the frequencies it keeps
    assert max(errors.values()) < limit, out
    if task == "inpaint":
        assert np.array_equal(restored[::2, :, :4], images[:, :, :4]), "the known left half is the input's"
    assert not np.array_equal(restored[0::2], restored[1::2]), "two restorations of an input differ"
    with Image.open(next(log_dir.glob("*_grid.png"))) as grid:
        # 3 rows of (input, measurement, 2 restorations), each shown at 32 px with 2 px between.
        assert grid.size == (4 * 34 + 2, 3 * 34 + 2)


def test_a_folder_of_pngs_with_a_mask_png(workspace, model, images, monkeypatch, capsys):
    folder = workspace / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"photo_{i}.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6] = 255  # the middle rows known
    Image.fromarray(mask).save(workspace / "mask.png")
    log_dir = workspace / "out_folder"
    argv = ["--model_path", model, "--input", folder, "--task", "inpaint", "--mask", workspace / "mask.png",
            "--method", "repaint", "--jump_length", 2, "--jump_n_sample", 2, "--sampler", "ddpm", *FAST]
    status, out, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert status == 0, err
    restored, _ = outputs(log_dir, 3)
    assert np.array_equal(restored[:, 2:6], images[:, 2:6])
    assert not np.array_equal(restored[:, :2], images[:, :2])


def test_an_npz_of_one_mask_per_input_image(workspace, model, npz, images, monkeypatch, capsys):
    masks = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    for i in range(3):
        masks[i, :, : 2 * (i + 1)] = 255  # input i: its 2 (i + 1) left columns known
    np.savez(workspace / "masks.npz", masks)
    log_dir = workspace / "out_masks"
    argv = ["--model_path", model, "--input", npz, "--task", "inpaint", "--mask", workspace / "masks.npz",
            "--method", "replace", "--batch_size", 2, *FAST]
    status, out, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert status == 0, err
    restored, _ = outputs(log_dir, 3)
    for i in range(3):
        known = 2 * (i + 1)
        assert np.array_equal(restored[i, :, :known], images[i, :, :known]), i
        assert not np.array_equal(restored[i, :, known:], images[i, :, known:]), i


def test_sdedit_without_a_task_edits_the_input(workspace, model, npz, monkeypatch, capsys):
    log_dir = workspace / "out_sdedit"
    argv = ["--model_path", model, "--input", npz, "--method", "sdedit", "--t_start", 0.4, *FAST]
    status, out, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert status == 0, err
    restored, _ = outputs(log_dir, 3)
    assert len(printed_errors(out)) == 3


def test_a_class_conditional_model_restores_with_the_npz_labels(workspace, cond_model, npz, monkeypatch, capsys):
    log_dir = workspace / "out_cond"
    argv = ["--model_path", cond_model, "--input", npz, "--task", "super_res", "--method", "dps",
            "--num_samples_per_input", 2, *FAST]
    status, out, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert status == 0, err
    _, labels = outputs(log_dir, 6)
    assert labels.tolist() == [1, 1, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def bad_inputs(workspace):
    folder = workspace / "bad"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.savez(folder / "big.npz", rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    np.savez(folder / "gray.npz", rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    np.savez(folder / "two_channel_mask.npz", np.ones((8, 8, 2), dtype=np.uint8))
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(folder / "big_mask.png")
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no images here")
    return folder


@pytest.mark.parametrize(
    "extra, status, needles",
    [
        (["--task", "inpaint", "--mask", "{bad}/big_mask.png"], 1, ["big_mask.png", "16x16", "8x8", "1 or 3 channels"]),
        (["--task", "inpaint", "--mask", "{bad}/two_channel_mask.npz"], 1,
         ["two_channel_mask.npz", "2 channels", "1 or 3 channels"]),
        (["--task", "super_res", "--input", "{bad}/big.npz"], 1, ["big.npz", "16x16 with 3 channels", "8x8 with 3"]),
        (["--task", "super_res", "--input", "{bad}/gray.npz"], 1, ["gray.npz", "8x8 with 1 channel", "8x8 with 3"]),
        (["--task", "super_res", "--input", "{bad}/empty"], 1, ["empty", "no image files"]),
        (["--task", "deblur", "--method", "replace"], 2, ["replace", "Deblur", "use ddnm or dps"]),
        (["--task", "deblur", "--method", "repaint", "--sampler", "ddpm"], 2, ["repaint", "use ddnm or dps"]),
        (["--method", "sdedit", "--t_start", 0], 2, ["--t_start 0.0", "(0, 1]"]),
        (["--method", "sdedit", "--t_start", 1.5], 2, ["--t_start 1.5", "(0, 1]"]),
        (["--task", "super_res", "--method", "dps", "--dps_scale", 0], 2, ["--dps_scale 0.0", "> 0"]),
        (["--task", "super_res", "--method", "dps", "--sampler", "unipc"], 2, ["unipc", "ddpm, ddim, euler, heun"]),
        ([], 2, ["--task ''", "inpaint, super_res, deblur, colorize"]),
        (["--task", "inpaint"], 2, ["--task inpaint needs --mask"]),
        (["--task", "colorize", "--mask", "half"], 2, ["--mask applies to --task inpaint"]),
        (["--task", "super_res", "--super_res_factor", 3], 2, ["8x8", "3x3 blocks"]),
    ],
)
def test_errors_are_one_line_naming_the_fix_before_any_output(workspace, model, npz, bad_inputs, extra, status,
                                                             needles, monkeypatch, capsys):
    log_dir = workspace / "out_error"
    argv = ["--model_path", model, "--input", npz, *[str(a).format(bad=bad_inputs) for a in extra], *FAST]
    got, _, err = restore_main(argv, log_dir, monkeypatch, capsys)
    assert got == status, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not log_dir.exists()
