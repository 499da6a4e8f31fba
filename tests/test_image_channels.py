"""
--image_channels: grayscale data as one channel (1) beside the reference's RGB (3),
from the data loader through the model factories, the weight checks, evaluation
and the scripts (train -> flags.json -> sample -> npz [N x H x W x 1]).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion import checkpoint_layout as layout
from improved_diffusion import script_util as su
from improved_diffusion.eval_images import NpzImages
from improved_diffusion.image_datasets import load_data
from improved_diffusion.inception import FIDInceptionV3, extract_features
from test_e2e import TINY_MODEL, TINY_SR_MODEL, load_only, run_script
from _train_helpers import tiny_flags


def write_mixed_folder(folder):
    """Four 8x8 images: two RGB, one grayscale, one RGBA, of classes a and b."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "RGB"]
    for k, mode in enumerate(modes):
        pixels = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        image.save(folder / f"{'ab'[k % 2]}_{k}.png")
    return folder


def test_grayscale_batches_are_one_channel_with_pil_luminance(tmp_path):
    folder = write_mixed_folder(tmp_path / "data")
    data = load_data(data_dir=str(folder), batch_size=4, image_size=8, deterministic=True, num_workers=0,
                     image_channels=1)
    images, _ = next(data)
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.float32
    for k, path in enumerate(sorted(folder.iterdir())):
        with Image.open(path) as image:
            expected = np.asarray(image.convert("L"), dtype=np.float32) / 127.5 - 1
        np.testing.assert_array_equal(images[k, 0].numpy(), expected)


def test_rgb_keeps_refusing_mixed_modes_and_bad_channel_counts_are_named(tmp_path):
    folder = write_mixed_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="different numbers of channels"):
        load_data(data_dir=str(folder), batch_size=4, image_size=8, num_workers=0)
    with pytest.raises(ValueError, match=r"--image_channels 2 must be 3 \(RGB\) or 1 \(grayscale\)"):
        load_data(data_dir=str(folder), batch_size=4, image_size=8, num_workers=0, image_channels=2)
    with pytest.raises(ValueError, match="--image_channels 4"):
        su.create_model_and_diffusion(**tiny_flags(image_channels=4))


def test_one_channel_models_take_and_give_one_channel_per_output():
    model, _ = su.create_model_and_diffusion(**tiny_flags(image_channels=1, learn_sigma=True))
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([0, 1])).shape == (2, 2, 8, 8)
    sr_flags = dict(su.sr_model_and_diffusion_defaults(), large_size=16, small_size=8, num_channels=32,
                    num_res_blocks=1, attention_resolutions="", image_channels=1)
    sr_model, _ = su.sr_create_model_and_diffusion(**sr_flags)
    low_res = torch.randn(2, 1, 8, 8)
    assert sr_model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]), low_res=low_res).shape == (2, 1, 16, 16)


def test_channels_are_read_off_the_weights_and_a_mismatch_names_the_flag():
    gray = su.create_model_and_diffusion(**tiny_flags(image_channels=1, learn_sigma=True))[0].state_dict()
    inferred = layout.infer_model_flags(gray)
    assert (inferred["image_channels"], inferred["learn_sigma"]) == (1, True)
    assert layout.infer_model_flags(su.create_model_and_diffusion(**tiny_flags())[0].state_dict())["image_channels"] == 3
    rgb_flags = tiny_flags(learn_sigma=True)
    rgb_model = su.create_model_and_diffusion(**rgb_flags)[0]
    with pytest.raises(ValueError, match=r"--image_channels 3 \(the weights say 1\)"):
        layout.load_model_state_dict(rgb_model, gray, rgb_flags, source="gray.pt")


def test_grayscale_features_are_those_of_the_same_gray_in_rgb():
    torch.manual_seed(0)
    network = FIDInceptionV3().eval()
    gray = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
    one = extract_features(network, gray)
    three = extract_features(network, np.repeat(gray, 3, axis=3))
    for key in one:
        np.testing.assert_array_equal(one[key], three[key])


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    """image_train.py with --image_channels 1 on mixed-mode images for 2 steps, then image_sample.py from flags.json."""
    workspace = tmp_path_factory.mktemp("gray")
    data = write_mixed_folder(workspace / "data")
    train_args = ["--data_dir", data, "--batch_size", 4, "--max_steps", 2, "--seed", 0, *TINY_MODEL,
                  "--image_channels", 1]
    run_script("image_train.py", train_args, workspace / "train")
    model = sorted((workspace / "train").glob("model*.pt"))[-1]
    sample_args = ["--model_path", model, "--use_ddim", "True", "--timestep_respacing", "ddim3",
                   "--num_samples", 3, "--batch_size", 3, "--seed", 0]
    run_script("image_sample.py", sample_args, workspace / "samples")
    return workspace, model


def test_grayscale_training_records_the_flag_and_samples_are_one_channel(gray_run):
    workspace, model = gray_run
    assert json.loads((model.parent / "flags.json").read_text())["image_channels"] == 1
    assert model.parent.joinpath("log.txt").exists()
    samples = load_only(workspace / "samples", "samples_3x8x8x1.npz")["arr_0"]
    assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8
    assert (workspace / "samples" / "samples_3x8x8x1_grid.png").exists()
    npz = next((workspace / "samples").glob("samples_*.npz"))
    assert NpzImages(str(npz)).image_shape == (8, 8, 1)


def test_sampling_gray_weights_as_rgb_names_the_flag(gray_run):
    workspace, model = gray_run
    args = ["--model_path", model, "--image_channels", 3, "--num_samples", 1]
    result = run_script("image_sample.py", args, workspace / "as_rgb", expect_ok=False)
    assert result.returncode == 1
    assert "--image_channels 3 (trained with 1)" in result.stderr


def test_super_res_trains_and_upsamples_grayscale(gray_run):
    workspace, _ = gray_run
    data = workspace / "data"
    run_script("super_res_train.py", ["--data_dir", data, "--batch_size", 4, "--max_steps", 1, "--seed", 0,
                                      *TINY_SR_MODEL, "--image_channels", 1], workspace / "sr")
    base = workspace / "base.npz"
    np.savez(base, np.zeros((2, 8, 8, 1), np.uint8))
    model = sorted((workspace / "sr").glob("model*.pt"))[-1]
    args = ["--model_path", model, "--base_samples", base, "--use_ddim", "True", "--timestep_respacing", "ddim2",
            "--num_samples", 2, "--batch_size", 2]
    run_script("super_res_sample.py", args, workspace / "sr_samples")
    assert load_only(workspace / "sr_samples", "samples_*.npz")["arr_0"].shape == (2, 16, 16, 1)
    rgb_base = workspace / "rgb_base.npz"
    np.savez(rgb_base, np.zeros((2, 8, 8, 3), np.uint8))
    bad = run_script("super_res_sample.py", [*args[:2], "--base_samples", rgb_base], workspace / "sr_bad",
                     expect_ok=False)
    assert bad.returncode == 1 and "--image_channels" in bad.stderr
