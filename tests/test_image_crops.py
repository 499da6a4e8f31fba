"""load_data with rectangular sizes (H, W) and random crops: shapes, pixels by hand, reproducibility, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.eval_images import TrainingImages
from improved_diffusion.image_datasets import image_hw, load_data, load_image


def save_random(path, width, height, seed=0, mode="RGB"):
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return str(path)


def as_batch(pixels):
    """uint8 [N x H x W x C] -> float32 [N x C x H x W] in [-1, 1], as load_data's images."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / np.float32(127.5) - 1


@pytest.mark.parametrize("width, height, mode", [(300, 200, "RGB"), (101, 64, "L"), (20, 30, "RGB"), (64, 64, "RGB")])
def test_an_integer_size_and_the_square_pair_give_the_same_pixels(tmp_path, width, height, mode):
    path = save_random(tmp_path / "image.png", width, height, mode=mode)
    for size in (16, 31, 64):
        np.testing.assert_array_equal(load_image(path, (size, size)), load_image(path, size))


def test_a_tall_image_covers_a_tall_target_and_is_center_cropped_by_hand(tmp_path):
    path = save_random(tmp_path / "tall.png", 37, 90)
    # Target 20 x 12: halve while the image still covers it twice (37 x 90 -> 18 x 45, then 18 < 24 stops),
    # scale by max(20 / 45, 12 / 18) = 2/3 to 12 x 30 (width x height), crop rows 5..24.
    image = Image.open(path).resize((18, 45), Image.BOX).resize((12, 30), Image.BICUBIC)
    expected = np.asarray(image.convert("RGB"))[5:25, 0:12]
    np.testing.assert_array_equal(load_image(path, (20, 12)), expected)


def test_a_wide_image_covers_a_wide_target_and_is_center_cropped_by_hand(tmp_path):
    path = save_random(tmp_path / "wide.png", 50, 40)
    # Target 8 x 16: 50 x 40 -> 25 x 20 (box), then 25 < 32 stops; scale by max(8 / 20, 16 / 25) = 0.64 to
    # 16 x 13 (12.8 rounded); crop rows 2..9.
    image = Image.open(path).resize((25, 20), Image.BOX).resize((16, 13), Image.BICUBIC)
    expected = np.asarray(image.convert("RGB"))[2:10, 0:16]
    np.testing.assert_array_equal(load_image(path, (8, 16)), expected)
    data = load_data(data_dir=str(tmp_path), batch_size=1, image_size=(8, 16), num_workers=0)
    images, _ = next(data)
    assert images.shape == (1, 3, 8, 16)
    assert torch.equal(images, as_batch([expected]))


def crop_folder(folder, count=6):
    """`count` random 16 x 40 (width x height) images."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        save_random(Path(folder) / f"{i}.png", 16, 40, seed=i)
    return str(folder)


def test_random_crops_are_taken_where_the_plan_says(tmp_path):
    folder = crop_folder(tmp_path)
    data = load_data(data_dir=folder, batch_size=6, image_size=(4, 6), deterministic=True, random_crop=True,
                     num_workers=0)
    images, _ = next(data)
    assert images.shape == (6, 3, 4, 6)
    # Each image: 16 x 40 -> 8 x 20 (box) -> 6 x 15 (bicubic, by 6 / 8), so the top row is one of 0..11.
    positions = data.crop_plan(0)
    expected = []
    for k, file in enumerate(data.files):
        resized = np.asarray(Image.open(file).resize((8, 20), Image.BOX).resize((6, 15), Image.BICUBIC))
        top = int(positions[k, 0] * 12)
        expected.append(resized[top : top + 4, 0:6])
    assert torch.equal(images, as_batch(expected))
    assert len({int(u * 12) for u in positions[:, 0]}) > 1


def test_a_square_size_is_random_cropped_along_the_long_side(tmp_path):
    folder = crop_folder(tmp_path, count=2)
    data = load_data(data_dir=folder, batch_size=2, image_size=8, deterministic=True, random_crop=True, num_workers=0)
    images, _ = next(data)
    # 16 x 40 -> 8 x 20 (box, then bicubic to the same size): the top row is one of 0..12.
    expected = []
    for k, file in enumerate(data.files):
        resized = np.asarray(Image.open(file).resize((8, 20), Image.BOX))
        top = int(data.crop_plan(0)[k, 0] * 13)
        expected.append(resized[top : top + 8])
    assert torch.equal(images, as_batch(expected))


def test_random_crops_change_with_the_epoch_and_repeat_with_the_seed(tmp_path):
    folder = crop_folder(tmp_path)
    options = dict(data_dir=folder, batch_size=3, image_size=(4, 6), random_crop=True, random_flip=True, num_workers=0)
    runs = [load_data(**options, seed=seed) for seed in (5, 5, 6)]
    batches = [[next(run)[0] for _ in range(4)] for run in runs]  # two epochs of two batches
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1]))
    assert not all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert not np.array_equal(runs[0].crop_plan(0), runs[0].crop_plan(1))
    # The crops are drawn after the order and the flips: turning them on changes neither.
    without = load_data(**dict(options, random_crop=False), seed=5)
    for epoch in range(2):
        for a, b in zip(runs[0].epoch_plan(epoch), without.epoch_plan(epoch)):
            np.testing.assert_array_equal(a, b)
    assert without.crop_plan(0) is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_random_crops_gives_the_batches_that_would_have_come_next(tmp_path, num_workers):
    folder = crop_folder(tmp_path, count=5)
    options = dict(data_dir=folder, batch_size=2, image_size=(4, 6), random_crop=True, random_flip=True, seed=3,
                   num_workers=num_workers)
    whole = load_data(**options)
    first = [next(whole) for _ in range(3)]
    state = whole.state_dict()
    rest = [next(whole) for _ in range(4)]
    resumed = load_data(**options)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(4)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, again))
    assert not torch.equal(first[0][0], rest[0][0])
    whole.close()
    resumed.close()


@pytest.mark.parametrize("bad", [0, (8,), (0, 4), (4, 2.5), "8", True, (8, 8, 8)])
def test_bad_image_sizes_are_named(tmp_path, bad):
    folder = crop_folder(tmp_path, count=1)
    with pytest.raises(ValueError, match=r"image_size must be an integer >= 1 or a pair \(H, W\)"):
        load_data(data_dir=folder, batch_size=1, image_size=bad)
    with pytest.raises(ValueError, match="image_size must be"):
        image_hw(bad)


def test_training_images_for_evaluation_are_rectangular_too(tmp_path):
    folder = crop_folder(tmp_path, count=3)
    reader = TrainingImages(folder, (4, 6))
    assert reader.image_shape == (4, 6, 3)
    (_, batch), = reader.batches(8)
    np.testing.assert_array_equal(batch, np.stack([load_image(f, (4, 6)) for f in reader.files]))
