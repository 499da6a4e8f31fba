import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _launch import MPIEXEC, ROOT, launch_env
from PIL import Image

from improved_diffusion.image_datasets import list_image_files, load_data, load_image


def random_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def make_folder(folder, names, size=(8, 8), seed=0):
    """Random RGB images (width, height = size) at the given relative paths."""
    rng = np.random.default_rng(seed)
    for name in names:
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, size[1], size[0]).save(path)
    return str(folder)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (images_a, cond_a), (images_b, cond_b) in zip(a, b):
        assert torch.equal(images_a, images_b)
        assert cond_a.keys() == cond_b.keys() and all(torch.equal(cond_a[k], cond_b[k]) for k in cond_a)


def test_batches_have_the_documented_shapes_values_and_labels(tmp_path):
    folder = tmp_path / "data"
    names = ["b_x.png", "sub/a_y.PNG", "sub/deeper/c_z.jpg", "b_w.jpeg", "notes.txt"]
    make_folder(folder, names[:4])
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8), (0, 255, 51)).save(folder / "b_x.png")
    data = load_data(data_dir=str(folder), batch_size=4, image_size=8, class_cond=True, deterministic=True,
                     num_workers=0)
    images, cond = next(data)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert data.class_names == ["a", "b", "c"]
    # depth-first sorted listing: b_w.jpeg, b_x.png, sub/a_y.PNG, sub/deeper/c_z.jpg
    assert cond["y"].tolist() == [1, 1, 0, 2] and cond["y"].dtype == torch.int64
    expected = torch.tensor([0.0, 255.0, 51.0]) / 127.5 - 1
    assert torch.equal(images[1], expected.view(3, 1, 1).expand(3, 8, 8))
    unconditional = load_data(data_dir=str(folder), batch_size=2, image_size=8, num_workers=0)
    assert next(unconditional)[1] == {}


def test_listing_is_recursive_and_case_insensitive(tmp_path):
    make_folder(tmp_path, ["z.GIF", "a/b.Jpeg", "a.png", "c/d.bmp"])
    found = [os.path.relpath(p, tmp_path) for p in list_image_files(str(tmp_path))]
    assert found == ["a/b.Jpeg", "a.png", "z.GIF"]


def test_shards_split_the_sorted_files_and_share_class_numbers(tmp_path):
    names = ["a_0.png", "a_1.png", "b_2.png", "b_3.png", "c_4.png", "c_5.png"]
    folder = make_folder(tmp_path, names)
    seen = {}
    for shard in range(2):
        data = load_data(data_dir=folder, batch_size=3, image_size=8, class_cond=True, deterministic=True,
                         shard=shard, num_shards=2, num_workers=0)
        assert data.files == [os.path.join(folder, n) for n in names[shard::2]]
        seen[shard] = next(data)[1]["y"].tolist()
    assert seen == {0: [0, 1, 2], 1: [0, 1, 2]}


def reference_preprocessing(image, size):
    """The documented rule, written out step by step for one known case each."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(side * ratio) for side in image.size), Image.BICUBIC)
    array = np.array(image.convert("RGB"))
    y0, x0 = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[y0:y0 + size, x0:x0 + size]


@pytest.mark.parametrize("mode, width, height, size", [
    ("RGB", 300, 200, 64),  # one halving to 150 x 100, then bicubic to 96 x 64
    ("L", 101, 64, 32),  # one halving to 50 x 32, crop offset 9
    ("RGBA", 37, 90, 16),  # one halving to 18 x 45, then bicubic to 16 x 40
    ("RGB", 20, 30, 64),  # upscaled
])
def test_resize_rule_matches_pil_steps(tmp_path, mode, width, height, size):
    image = random_image(np.random.default_rng(1), height, width, mode)
    path = str(tmp_path / "image.png")
    image.save(path)
    expected = reference_preprocessing(Image.open(path), size)
    assert expected.shape == (size, size, 3)
    np.testing.assert_array_equal(load_image(path, size), expected)


def test_known_halving_sizes(tmp_path):
    path = str(tmp_path / "wide.png")
    Image.new("RGB", (1000, 260), (10, 20, 30)).save(path)
    # 260 -> 130 -> 65 (box), 65 < 64 * 2 stops; then 1000 // 4 = 250 wide, scaled by 64 / 65.
    pixels = load_image(path, 64)
    assert pixels.shape == (64, 64, 3) and (pixels == [10, 20, 30]).all()


def test_palette_images_are_resized_in_their_own_mode(tmp_path):
    image = random_image(np.random.default_rng(2), 40, 40).convert("P")
    path = str(tmp_path / "palette.gif")
    image.save(path)
    np.testing.assert_array_equal(load_image(path, 16), reference_preprocessing(Image.open(path), 16))


def test_epochs_drop_the_last_partial_batch_and_reshuffle(tmp_path):
    folder = make_folder(tmp_path, [f"{i:02d}.png" for i in range(10)], size=(2, 2))
    data = load_data(data_dir=folder, batch_size=4, image_size=2, num_workers=0)
    orders = [data.epoch_plan(e)[0] for e in range(2)]
    batches = take(data, 4)
    assert data.state_dict()["epoch"] == 1 and data.state_dict()["index"] == 8
    for epoch in range(2):
        expected = [load_image(data.files[i], 2) for i in orders[epoch][:8]]
        got = torch.cat([b[0] for b in batches[2 * epoch: 2 * epoch + 2]])
        assert torch.equal(got, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2) / 127.5 - 1)
    assert not np.array_equal(orders[0], orders[1])
    deterministic = load_data(data_dir=folder, batch_size=4, image_size=2, deterministic=True, num_workers=0)
    assert deterministic.epoch_plan(3)[0].tolist() == list(range(10))


def test_seed_changes_the_order(tmp_path):
    folder = make_folder(tmp_path, [f"{i:02d}.png" for i in range(20)], size=(2, 2))
    plans = [load_data(data_dir=folder, batch_size=4, image_size=2, seed=s, num_workers=0).epoch_plan(0)[0]
             for s in (0, 0, 1)]
    assert np.array_equal(plans[0], plans[1]) and not np.array_equal(plans[0], plans[2])


def test_random_flip_mirrors_about_half_the_images(tmp_path):
    folder = make_folder(tmp_path, [f"{i:02d}.png" for i in range(16)], size=(4, 4))
    plain = load_data(data_dir=folder, batch_size=16, image_size=4, deterministic=True, num_workers=0)
    flipped = load_data(data_dir=folder, batch_size=16, image_size=4, deterministic=True, random_flip=True,
                        num_workers=0)
    a, b = next(plain)[0], next(flipped)[0]
    mirrored = [torch.equal(x.flip(-1), y) for x, y in zip(a, b)]
    assert all(m or torch.equal(x, y) for m, x, y in zip(mirrored, a, b))
    assert mirrored == flipped.epoch_plan(0)[1].tolist()
    assert 0 < sum(mirrored) < 16


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_that_would_have_come_next(tmp_path, num_workers):
    folder = make_folder(tmp_path, [f"c{i % 3}_{i:02d}.png" for i in range(11)], size=(4, 4))
    options = dict(data_dir=folder, batch_size=3, image_size=4, class_cond=True, random_flip=True, seed=7,
                   num_workers=num_workers)
    original = load_data(**options)
    take(original, 5)  # into the second epoch (3 batches per epoch)
    state = original.state_dict()
    assert json.loads(json.dumps(state)) == state
    continued = take(original, 4)
    resumed = load_data(**{**options, "seed": 0})
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), continued)


def test_load_state_dict_restarts_a_running_iterator(tmp_path):
    folder = make_folder(tmp_path, [f"{i}.png" for i in range(6)], size=(2, 2))
    data = load_data(data_dir=folder, batch_size=2, image_size=2, num_workers=1)
    start = data.state_dict()
    first = take(data, 2)
    data.load_state_dict(start)
    assert_same_batches(take(data, 2), first)


def test_restoring_into_a_different_dataset_warns(tmp_path):
    small = make_folder(tmp_path / "small", ["0.png", "1.png"], size=(2, 2))
    large = make_folder(tmp_path / "large", ["0.png", "1.png", "2.png"], size=(2, 2))
    state = load_data(data_dir=small, batch_size=1, image_size=2, num_workers=0).state_dict()
    with pytest.warns(UserWarning, match="will not match"):
        load_data(data_dir=large, batch_size=1, image_size=2, num_workers=0).load_state_dict(state)


def test_missing_or_non_folder_data_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(data_dir=str(tmp_path / "nowhere"), batch_size=1, image_size=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="file.png is not a folder"):
        load_data(data_dir=str(tmp_path / "file.png"), batch_size=1, image_size=8)
    with pytest.raises(ValueError, match="data_dir is empty"):
        load_data(data_dir="", batch_size=1, image_size=8)


def test_folder_without_images_names_the_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"no image files in {tmp_path}.*\.jpg, \.jpeg, \.png, \.gif"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)


def test_shard_smaller_than_a_batch_says_the_numbers(tmp_path):
    folder = make_folder(tmp_path, [f"{i}.png" for i in range(5)])
    with pytest.raises(ValueError, match="has 5 images; shard 1 of 2 gets 2, fewer than one batch of 3"):
        load_data(data_dir=folder, batch_size=3, image_size=8, shard=1, num_shards=2)


def test_unreadable_file_is_named_before_training(tmp_path):
    folder = make_folder(tmp_path, ["a.png", "b.png"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_data(data_dir=folder, batch_size=1, image_size=8)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_file_failing_full_decode_is_named_when_read(tmp_path, num_workers):
    folder = make_folder(tmp_path, ["a.png"])
    buffer = tmp_path / "whole.jpg"
    random_image(np.random.default_rng(0), 64, 64).save(buffer)
    (tmp_path / "cut.jpg").write_bytes(buffer.read_bytes()[:-300])
    buffer.unlink()
    data = load_data(data_dir=folder, batch_size=2, image_size=8, num_workers=num_workers)
    with pytest.raises(ValueError, match="cannot decode image .*cut.jpg"):
        next(data)


def test_mixed_channel_counts_name_one_file_of_each(tmp_path):
    folder = make_folder(tmp_path, ["color.png"])
    random_image(np.random.default_rng(0), 8, 8, "L").save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray.png has 1; .*color.png has 3.*--allow_mixed_channels"):
        load_data(data_dir=folder, batch_size=1, image_size=8)
    images, _ = next(load_data(data_dir=folder, batch_size=2, image_size=8, allow_mixed_channels=True))
    assert images.shape == (2, 3, 8, 8)


def test_class_cond_needs_an_underscore_prefix(tmp_path):
    folder = make_folder(tmp_path, ["cat_1.png", "sub/dog.png"])
    with pytest.raises(ValueError, match="dog.png has no '_'"):
        load_data(data_dir=folder, batch_size=1, image_size=8, class_cond=True)


def test_bad_arguments_are_rejected(tmp_path):
    folder = make_folder(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="both shard and num_shards"):
        load_data(data_dir=folder, batch_size=1, image_size=8, shard=0)
    with pytest.raises(ValueError, match="shard must be in"):
        load_data(data_dir=folder, batch_size=1, image_size=8, shard=2, num_shards=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        load_data(data_dir=folder, batch_size=0, image_size=8)


@pytest.mark.skipif(not MPIEXEC, reason="mpiexec not found (pip install mpich mpi4py)")
def test_ranks_of_a_process_group_shard_and_agree_on_errors(tmp_path):
    good = make_folder(tmp_path / "good", [f"{i}.png" for i in range(4)])
    bad = make_folder(tmp_path / "bad", [f"{i}.png" for i in range(4)])
    (tmp_path / "bad" / "3.png").write_bytes(b"garbage")  # in rank 1's shard only
    out = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable,
         str(ROOT / "tests" / "_data_worker.py"), good, bad, str(tmp_path)],
        env=launch_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["files"] == [os.path.join(good, f"{i}.png") for i in range(rank, 4, 2)]
        assert result["error"] == results[0]["error"]
    assert "cannot read image" in results[0]["error"] and "3.png" in results[0]["error"]


@pytest.mark.parametrize("keep_traceback, drop_iterator", [(False, False), (True, False), (True, True)],
                         ids=["open", "open-after-a-decode-error", "dropped-after-a-decode-error"])
def test_a_process_exits_with_an_iterator_still_open(tmp_path, keep_traceback, drop_iterator):
    """
    The workers ignore SIGTERM (for schedulers), so the exit must stop them
    another way than multiprocessing's; also when a kept traceback still
    holds the loader's iterator (as pytest keeps a failed test's).
    """
    folder = make_folder(tmp_path, [f"{i}.png" for i in range(4)])
    if keep_traceback:
        whole = tmp_path / "whole.jpg"
        random_image(np.random.default_rng(0), 64, 64).save(whole)
        (Path(folder) / "cut.jpg").write_bytes(whole.read_bytes()[:-300])  # passes the check, fails in a worker
    script = (
        "import sys\n"
        "from improved_diffusion.image_datasets import load_data\n"
        "data = load_data(data_dir=sys.argv[1], batch_size=4, image_size=8, num_workers=2)\n"
        "try:\n"
        "    next(data)\n"
        "except ValueError as exc:\n"
        "    kept = exc\n"
    )
    if drop_iterator:
        # As pytest does with a failed test's traceback: frames cleared, the iterator
        # itself collected, while the exception may still reach the loader's iterator.
        script += "import gc, traceback\ntraceback.clear_frames(kept.__traceback__)\ndel data\ngc.collect()\n"
    result = subprocess.run([sys.executable, "-c", script, str(folder)], env=launch_env(), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
