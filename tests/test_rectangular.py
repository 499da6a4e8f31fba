"""
Rectangular images (--image_size H,W) and random crops (--random_crop),
through the real scripts in this process: train an 8x16 model on 12x20
images (random crops), sample it from --model_path alone ([N x 8 x 16 x C]
npz and grid), score the samples with image_eval.py; and the sizes a model
cannot take, refused naming the nearest valid ones.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation import random_inception
from test_flags import assert_error_line, run_main

from improved_diffusion import script_util

TINY = ["--num_channels", 32, "--num_res_blocks", 1, "--attention_resolutions", "", "--diffusion_steps", 20,
        "--noise_schedule", "cosine"]


@pytest.fixture(scope="module")
def rectangular_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rect")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(images / f"img_{i}.png")
    return root, images


def test_an_8x16_model_trains_on_random_crops_samples_and_is_scored(rectangular_run, monkeypatch, capsys):
    root, images = rectangular_run
    argv = ["--data_dir", images, "--image_size", "8,16", *TINY, "--batch_size", 3, "--max_steps", 2,
            "--random_crop", True, "--ema_rate", 0.9, "--num_workers", 0]
    with torch.random.fork_rng():
        status, _, err = run_main("image_train", argv, root / "train", monkeypatch, capsys)
    assert status == 0, err
    recorded = json.loads((root / "train" / "flags.json").read_text())
    assert (recorded["image_size"], recorded["random_crop"]) == ("8,16", True)
    model = root / "train" / "ema_0.9_000002.pt"
    argv = ["--model_path", model, "--num_samples", 5, "--batch_size", 5, "--use_ddim", True,
            "--timestep_respacing", "ddim4", "--seed", 0]
    status, out, err = run_main("image_sample", argv, root / "samples", monkeypatch, capsys)
    assert status == 0, err
    with np.load(root / "samples" / "samples_5x8x16x3.npz") as data:
        samples = data["arr_0"]
    assert samples.shape == (5, 8, 16, 3) and samples.dtype == np.uint8
    with Image.open(root / "samples" / "samples_5x8x16x3_grid.png") as grid:
        assert grid.width > grid.height
    weights = root / "inception.pth"
    torch.save(random_inception(seed=1).state_dict(), weights)
    reference = root / "ref.npz"
    np.savez(reference, np.random.default_rng(1).integers(0, 256, (5, 8, 16, 3), dtype=np.uint8))
    argv = [reference, root / "samples" / "samples_5x8x16x3.npz", "--inception_weights", weights,
            "--output", root / "eval.json"]
    status, out, err = run_main("image_eval", argv, root / "eval", monkeypatch, capsys)
    assert status == 0, err
    assert json.loads((root / "eval.json").read_text())["fid"] > 0


def test_random_crops_differ_from_center_crops(rectangular_run):
    from improved_diffusion.image_datasets import load_data

    _, images = rectangular_run
    batches = {}
    for random_crop in (False, True):
        data = load_data(data_dir=str(images), batch_size=6, image_size=(8, 16), deterministic=True,
                         random_crop=random_crop, num_workers=0)
        batches[random_crop] = next(data)[0]
    assert batches[True].shape == batches[False].shape == (6, 3, 8, 16)
    assert not torch.equal(batches[True], batches[False])


@pytest.mark.parametrize("argv, needles", [
    (["--image_size", "10,16"], ["--image_size 10,16", "power of two", "8 or 16"]),
    (["--image_size", "8,18", "--channel_mult", "1,2,2"], ["--image_size 8,18 cannot be halved 2 times",
                                                            "8,16 or 8,20"]),
    (["--image_size", "8,x"], ["--image_size", "H,W"]),
])
def test_sizes_a_model_cannot_take_name_the_nearest_valid_ones(rectangular_run, tmp_path, monkeypatch, capsys,
                                                               argv, needles):
    _, images = rectangular_run
    argv = ["--data_dir", images, *TINY, "--max_steps", 1, *argv]
    status, _, err = run_main("image_train", argv, tmp_path / "log", monkeypatch, capsys)
    assert_error_line(status, err, 2, *needles)
    assert not (tmp_path / "log").exists()


def test_a_square_size_keeps_its_meaning():
    model, _ = script_util.create_model_and_diffusion(
        **dict(script_util.model_and_diffusion_defaults(), image_size=16, num_channels=32, attention_resolutions="8"))
    rect, _ = script_util.create_model_and_diffusion(
        **dict(script_util.model_and_diffusion_defaults(), image_size="16,32", num_channels=32,
               attention_resolutions="8"))
    assert model.channel_mult == rect.channel_mult == (1, 2, 2)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in rect.named_parameters()]
    assert rect(torch.zeros(1, 3, 16, 32), torch.zeros(1)).shape == (1, 3, 16, 32)
