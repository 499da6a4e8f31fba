"""
Unit tests of the machinery behind image_sample.py, super_res_sample.py and
image_nll.py: sample_util, sample_seeds, sharding, image_output and
model_loading (their end-to-end runs are in test_e2e.py).
"""

import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion import dist_util, image_output, io_util, logger, model_loading, sample_seeds, sample_util, sharding
from improved_diffusion.errors import UsageError
from improved_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def test_parse_flags_tells_explicit_flags_from_defaults():
    defaults = {"image_size": 64, "use_ddim": False, "timestep_respacing": "", "eta": 0.0}
    args, explicit = sample_util.parse_flags(defaults, ["--image_size", "64", "--use_ddim", "True"])
    assert (args.image_size, args.use_ddim, args.timestep_respacing, args.eta) == (64, True, "", 0.0)
    assert explicit == {"image_size", "use_ddim"}


def _write_run(tmp_path, **flags):
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    return str(tmp_path / "model000010.pt")


def test_run_flags_become_defaults_but_sampling_flags_stay_the_users(tmp_path):
    model_path = _write_run(
        tmp_path, image_size=8, num_channels=32, timestep_respacing="50", dropout=0.1, lr=0.5, batch_size=3
    )
    defaults = dict(model_path="", batch_size=16, **model_and_diffusion_defaults())
    args, explicit = sample_util.parse_flags(defaults, ["--model_path", model_path, "--timestep_respacing", "ddim5"])
    saved = sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults()))
    assert saved["lr"] == 0.5
    assert (args.image_size, args.num_channels) == (8, 32)
    assert args.timestep_respacing == "ddim5"
    assert args.dropout == 0.0, "dropout is a training choice, not the sampler's"
    assert args.batch_size == 16, "a training-only flag must not leak into the sampler"
    assert args.num_res_blocks == model_and_diffusion_defaults()["num_res_blocks"], "absent keys keep defaults"


def test_a_run_trained_with_fp16_or_min_snr_samples_without_them(tmp_path):
    """--use_fp16 (autocast arithmetic) and --snr_gamma (a loss weight) change neither weights nor meaning."""
    model_path = _write_run(tmp_path, image_size=8, use_fp16=True, snr_gamma=5.0)
    defaults = dict(model_path="", **model_and_diffusion_defaults())
    args, explicit = sample_util.parse_flags(defaults, ["--model_path", model_path])
    sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults()))
    assert (args.use_fp16, args.snr_gamma) == (False, 0.0)


def test_explicit_flags_that_agree_with_the_run_are_fine(tmp_path):
    model_path = _write_run(tmp_path, image_size=8, learn_sigma=True, attention_resolutions="4")
    defaults = dict(model_path="", **model_and_diffusion_defaults())
    args, explicit = sample_util.parse_flags(defaults, ["--model_path", model_path, "--image_size", "8", "--learn_sigma", "yes"])
    sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults()))
    assert (args.image_size, args.learn_sigma, args.attention_resolutions) == (8, True, "4")


def test_contradicting_flags_name_every_flag_and_the_saved_value(tmp_path):
    model_path = _write_run(tmp_path, image_size=8, num_channels=32, class_cond=False)
    defaults = dict(model_path="", **model_and_diffusion_defaults())
    argv = ["--model_path", model_path, "--image_size", "16", "--num_channels", "32", "--class_cond", "True"]
    args, explicit = sample_util.parse_flags(defaults, argv)
    with pytest.raises(UsageError) as info:
        sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults()))
    message = str(info.value)
    assert "--image_size 16 (trained with 8)" in message
    assert "--class_cond True (trained with False)" in message
    assert "num_channels" not in message
    assert "flags.json" in message


def test_flags_of_another_kind_of_run_are_named(tmp_path):
    model_path = _write_run(tmp_path, large_size=16, small_size=8, num_channels=32)
    defaults = dict(model_path="", **model_and_diffusion_defaults())
    args, explicit = sample_util.parse_flags(defaults, ["--model_path", model_path])
    with pytest.raises(UsageError, match="has no --image_size.*super_res_train.py with super_res_sample.py"):
        sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults()))


def test_no_saved_flags_leaves_the_flags_alone(tmp_path):
    defaults = dict(model_path="", **model_and_diffusion_defaults())
    args, explicit = sample_util.parse_flags(defaults, ["--model_path", str(tmp_path / "model.pt"), "--image_size", "16"])
    assert sample_util.apply_run_flags(args, explicit, list(model_and_diffusion_defaults())) is None
    assert args.image_size == 16


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "--model_path is required"),
        (["--model_path", "m.pt", "--eta", "0.5"], "--use_ddim True"),
        (["--model_path", "m.pt", "--use_fp16", "True", "--use_bf16", "True"], "exclude each other"),
        (["--model_path", "m.pt", "--num_samples", "0"], "at least 1"),
    ],
)
def test_sampling_flags_that_contradict_each_other_fail(monkeypatch, tmp_path, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        sample_util.parse_sampling_flags("image_sample", argv)


def test_sample_seeds_are_deterministic_and_distinct():
    seeds = {sample_seeds.sample_seed(7, i, stream) for i in range(100) for stream in (0, 1)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seeds.sample_seed(7, 3) == sample_seeds.sample_seed(7, 3)
    assert sample_seeds.sample_seed(7, 3) != sample_seeds.sample_seed(8, 3)


def test_draw_labels_depends_on_the_index_only():
    together = sample_seeds.draw_labels(5, range(10), 1000)
    apart = torch.cat([sample_seeds.draw_labels(5, range(3), 1000), sample_seeds.draw_labels(5, range(3, 10), 1000)])
    assert together.dtype == torch.int64 and torch.equal(together, apart)
    assert len(set(together.tolist())) > 1 and together.max() < 1000


@pytest.mark.parametrize("num_items", [1, 5, 10, 17])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_indices_partition_the_items_in_order(num_items, world_size):
    blocks = [sharding.rank_indices(num_items, r, world_size) for r in range(world_size)]
    assert [i for block in blocks for i in block] == list(range(num_items))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_chunks_cover_a_range_with_a_short_last_chunk():
    assert [list(c) for c in sharding.chunks(range(3, 10), 3)] == [[3, 4, 5], [6, 7, 8], [9]]
    assert sharding.chunks(range(0), 4) == []


class _ToyModel(torch.nn.Module):
    """An elementwise stand-in for a UNet: [N x C x H x W] -> [N x C x H x W]."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timesteps, y=None):
        out = self.scale * x + timesteps.float().view(-1, 1, 1, 1) / 1000
        return out if y is None else out + y.float().view(-1, 1, 1, 1) / 10


@pytest.mark.parametrize("use_ddim, eta", [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_samples_do_not_depend_on_how_indices_are_batched(use_ddim, eta):
    diffusion = create_gaussian_diffusion(
        steps=20, noise_schedule="cosine", timestep_respacing="5" if use_ddim else ""
    )
    sampler = "ddim" if use_ddim else "ddpm"
    device = dist_util.dev()
    model = _ToyModel().to(device)

    def sample(indices, seed=3):
        y = torch.tensor(list(indices), device=device) % 2
        return sample_util.draw_samples(diffusion, model, (3, 4, 4), indices, seed=seed, sampler=sampler, eta=eta,
                                        model_kwargs={"y": y})

    whole = sample(range(5))
    pieces = torch.cat([sample(range(2)), sample(range(2, 3)), sample(range(3, 5))])
    assert whole.shape == (5, 3, 4, 4)
    torch.testing.assert_close(whole, pieces, rtol=0, atol=1e-6)
    other_seed = sample(range(5), seed=4)
    assert not torch.allclose(whole, other_seed)


def test_autocast_model_runs_in_bfloat16_and_returns_float32():
    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, timesteps):
            out = self.conv(x)
            seen["dtype"] = out.dtype
            return out

    out = model_loading.AutocastModel(Probe())(torch.randn(2, 3, 4, 4), torch.zeros(2))
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32


def test_uint8_conversion_round_trips_and_rounds():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 3), dtype=np.uint8)
    x = image_output.from_uint8_images(images, "cpu")
    assert x.shape == (3, 3, 5, 4) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(image_output.to_uint8_images(x), images)
    edge = image_output.to_uint8_images(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5))
    assert edge.ravel().tolist() == [0, 0, 128, 255, 255]


def test_image_grid_places_each_image():
    images = np.stack([np.full((2, 3, 3), 10 * (k + 1), dtype=np.uint8) for k in range(5)])
    grid = image_output.image_grid(images, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 40 and grid[4, 5, 0] == 50
    assert grid[4, 9, 0] == 0, "the empty sixth cell stays black"


def test_enlarge_repeats_pixels_up_to_the_minimum_side():
    images = np.arange(2 * 3 * 5 * 1, dtype=np.uint8).reshape(2, 3, 5, 1)
    big = image_output.enlarge(images, 32)
    assert big.shape == (2, 33, 55, 1)
    np.testing.assert_array_equal(big[:, ::11, ::11], images)
    assert image_output.enlarge(images, 3).shape == images.shape, "large enough already"


def test_save_samples_writes_npz_grid_and_pngs(tmp_path, capsys):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(5)
    npz_path, grid_path = image_output.save_samples(images, labels, save_pngs=True, log_dir=str(tmp_path))
    assert npz_path == str(tmp_path / "samples_5x8x8x3.npz")
    with np.load(npz_path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert Image.open(grid_path).size == (3 * 34 + 2, 2 * 34 + 2), "8 px samples are shown 4x enlarged"
    pngs = sorted(os.listdir(tmp_path / "samples_5x8x8x3_pngs"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "samples_5x8x8x3_pngs" / pngs[3])), images[3])
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    out = capsys.readouterr().out
    assert npz_path in out and grid_path in out


def test_save_samples_without_labels_has_no_arr_1(tmp_path):
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    npz_path, _ = image_output.save_samples(images, log_dir=str(tmp_path))
    with np.load(npz_path) as data:
        assert data.files == ["arr_0"]


def _index_batch(indices):
    """A draw_batch stand-in: images whose pixels hold their sample index, and labels index % 3."""
    images = np.stack([np.full((2, 2, 3), i, dtype=np.uint8) for i in indices])
    return {"images": images, "labels": np.array([i % 3 for i in indices])}


def test_samples_are_collected_on_disk_in_index_order(tmp_path):
    seen = []

    def draw(indices):
        seen.append(list(indices))
        return _index_batch(indices)

    result = sharding.sample_in_shards(7, 3, draw, str(tmp_path))
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    assert isinstance(result["images"], np.memmap), "samples are spooled to disk, not held in memory"
    assert pathlib.Path(result["images"].filename).parent == tmp_path
    np.testing.assert_array_equal(result["images"][:, 0, 0, 0], np.arange(7))
    np.testing.assert_array_equal(result["labels"], np.arange(7) % 3)


def test_sample_and_save_streams_the_spool_into_the_npz_and_removes_it(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=[])
    sample_util.sample_and_save(5, 2, _index_batch)
    with np.load(tmp_path / "samples_5x2x2x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], np.stack([_index_batch([i])["images"][0] for i in range(5)]))
        np.testing.assert_array_equal(data["arr_1"], np.arange(5) % 3)
    assert sorted(os.listdir(tmp_path)) == ["samples_5x2x2x3.npz", "samples_5x2x2x3_grid.png"]


def test_png_folder_replaces_an_earlier_one_whole(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    earlier = tmp_path / "samples_3x4x4x3_pngs"
    earlier.mkdir()
    (earlier / "000007.png").write_bytes(b"from an earlier run")
    image_output.save_samples(images, save_pngs=True, log_dir=str(tmp_path))
    assert sorted(os.listdir(earlier)) == ["000000.png", "000001.png", "000002.png"]
    np.testing.assert_array_equal(np.array(Image.open(earlier / "000002.png")), images[2])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")], "no temporary folder is left"


def test_png_folder_is_not_left_half_written(tmp_path, monkeypatch):
    images = np.zeros((4, 4, 4, 3), dtype=np.uint8)
    calls = []

    def failing_png(image):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return b"png"

    monkeypatch.setattr(image_output, "png_bytes", failing_png)
    with pytest.raises(OSError, match="disk full"):
        image_output.save_samples(images, save_pngs=True, log_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["samples_4x4x4x3.npz", "samples_4x4x4x3_grid.png"]


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path):
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    npz_path, grid_path = image_output.save_samples(images, save_pngs=True, log_dir=str(tmp_path))
    io_util.atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "model000001.pt")
    umask = io_util._UMASK  # this process's, as open() and mkdir() apply it
    for path in (npz_path, grid_path, tmp_path / "model000001.pt", tmp_path / "samples_2x4x4x3_pngs" / "000000.png"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
    assert os.stat(tmp_path / "samples_2x4x4x3_pngs").st_mode & 0o777 == 0o777 & ~umask


class RecordingModel(torch.nn.Module):
    """out = x * t + y, as [N x 1 x 1 x 1] rows, recording the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, timesteps, y=None, scale=1.0):
        self.calls.append(x.shape[0])
        return (x * timesteps[:, None, None, None] + y[:, None, None, None]) * scale


def test_compiled_batches_run_short_batches_at_a_size_already_run():
    inner = RecordingModel()
    model = model_loading.CompiledBatches(inner)

    def call(n):
        x, t, y = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) + 1.0, torch.arange(n) * 10.0
        out = model(x, t, y=y, scale=2.0)
        torch.testing.assert_close(out, inner(x, t, y=y, scale=2.0), rtol=0, atol=0)
        inner.calls.pop()  # the direct call above

    for n in (4, 8, 4, 3, 6, 1, 9, 9, 5):
        call(n)
    # 3 runs at 4 and 6 at 8 (the smallest size already run that holds them); 9 is new.
    assert inner.calls == [4, 8, 4, 4, 8, 4, 9, 9, 8]


def test_load_model_takes_every_weight_from_the_checkpoint_and_draws_no_random_numbers(tmp_path):
    flags = {**model_and_diffusion_defaults(), "image_size": 8, "num_channels": 32, "num_res_blocks": 1,
             "attention_resolutions": "4", "class_cond": True, "num_classes": 3}
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    for p in model.parameters():  # the zero-initialized layers too
        p.data.normal_()
    torch.save(model.state_dict(), tmp_path / "model000001.pt")
    rng = torch.random.get_rng_state()
    loaded, diffusion = model_loading.load_model(str(tmp_path / "model000001.pt"), flags)
    assert torch.equal(torch.random.get_rng_state(), rng), "the weights were randomly initialized before loading"
    assert not loaded.training and diffusion.num_timesteps == flags["diffusion_steps"]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.device.type == "cpu" and torch.equal(a, b), name
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y=y), model.eval()(x, t, y=y), rtol=0, atol=0)
