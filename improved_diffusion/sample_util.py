"""
Machinery shared by the sampling scripts (image_sample.py, super_res_sample.py,
image_nll.py): flag parsing against a checkpoint's saved training flags, model
loading, per-sample seeding, sharding samples over ranks and gathering them,
and writing npz and PNG outputs.

Seeding: sample `i` of a run with seed `s` draws its starting noise x_T and
every step's noise from its own generator seeded with (s, i) (the diffusion
loops accept a list of generators, one per sample), and its random
class label from a second generator seeded with (s, i, 1). So the output
depends on the seed and the sample's index only, never on the batch size or
on how many ranks share the work.
"""

import argparse
import contextlib
import io
import math
import os
import secrets
import sys
import tempfile

import blobfile as bf
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from . import dist_util, logger, samplers
from .io_util import CheckpointError, atomic_folder, atomic_open, atomic_write_bytes, is_local
from .precision import warn_if_emulated_bf16
from .run_flags import FLAGS_FILENAME, read_run_flags
from .script_util import add_dict_to_argparser, args_to_dict, load_model_state_dict

# Flags every sampling script adds to its own.
COMMON_FLAGS = {"seed": -1, "use_bf16": False, "use_fp16": False, "compile": False}

# Flags of the scripts that draw samples with a sampler (image_sample.py, super_res_sample.py):
# --sampler "" picks ddim with --use_ddim True, else ddpm; --sample_name names the outputs;
# --guidance_scale (1: none) and --guidance_interval "lo,hi" apply classifier-free guidance.
SAMPLER_FLAGS = {"sampler": "", "sample_name": "", "guidance_scale": 1.0, "guidance_interval": ""}

# The flags of image_sample.py beyond the model's (classifier_sample.py adds its own to these).
IMAGE_SAMPLING_FLAGS = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    eta=0.0,
    class_label=-1,
    save_pngs=False,
    **SAMPLER_FLAGS,
    **COMMON_FLAGS,
)

# Model and diffusion flags a sampling run may choose freely, whatever the
# training run used: they change neither the weights nor their meaning.
SAMPLING_ONLY_FLAGS = frozenset({"timestep_respacing", "use_checkpoint", "dropout", "snr_gamma", "use_fp16"})

# The size flags that tell an image model's run from a super-resolution model's.
SIZE_FLAGS = ("image_size", "large_size", "small_size")

NOISE_STREAM = 0
LABEL_STREAM = 1
GRID_MAX_IMAGES = 64
GRID_MIN_SIDE = 32  # smaller samples are shown enlarged in the grid (the npz keeps them as they are)


class UsageError(ValueError):
    """Flags that contradict each other, the checkpoint, or the input files."""


def run_script(main, argv=None):
    """
    Call main(argv) and tear the process group down. A UsageError or
    CheckpointError prints one "error: ..." line on stderr (from every rank)
    and exits with status 1, as the training scripts do.
    """
    try:
        main(argv)
    except (UsageError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        dist_util.cleanup_dist()
        sys.exit(1)
    dist_util.cleanup_dist()


# ---------------------------------------------------------------- flags


class _Unset:
    """Marks a flag that the command line did not give."""


def parse_flags(defaults, argv=None, description=None):
    """
    Parse command-line flags typed by `defaults`.

    :return: (args, explicit) where `explicit` is the set of flag names given
        on the command line (as opposed to taken from `defaults`).
    """
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(argv)
    parser.set_defaults(**{key: _Unset for key in defaults})
    given = parser.parse_args(argv)
    explicit = {key for key in defaults if getattr(given, key) is not _Unset}
    return args, explicit


def apply_run_flags(args, explicit, model_keys):
    """
    Take the model flags of the run that trained `args.model_path` from its
    flags.json (when it saved one) as the defaults, in place.

    Flags in SAMPLING_ONLY_FLAGS stay the user's. An explicit flag that
    contradicts a saved one raises UsageError naming every such flag.

    :return: the saved flags, or None when the run saved none.
    """
    saved = read_run_flags(args.model_path)
    if saved is None:
        return None
    flags_path = bf.join(bf.dirname(args.model_path), FLAGS_FILENAME)
    missing_sizes = [f"--{key}" for key in SIZE_FLAGS if key in model_keys and key not in saved]
    if missing_sizes:
        raise UsageError(
            f"{flags_path} has no {' or '.join(missing_sizes)}: {args.model_path} comes from another kind "
            f"of training run (image_train.py pairs with image_sample.py and image_nll.py, "
            f"super_res_train.py with super_res_sample.py)"
        )
    conflicts = []
    for key in model_keys:
        if key not in saved or key in SAMPLING_ONLY_FLAGS:
            continue
        if key not in explicit:
            setattr(args, key, saved[key])
        elif getattr(args, key) != saved[key]:
            conflicts.append(f"--{key} {getattr(args, key)} (trained with {saved[key]!r})")
    if conflicts:
        raise UsageError(
            f"flags contradict the training run of {args.model_path} (saved in {flags_path}): "
            + ", ".join(conflicts)
            + ". Drop or fix them: --model_path alone rebuilds the model from its saved flags."
        )
    return saved


def parse_sampling_flags(defaults, model_keys, argv=None, description=None):
    """
    Parse flags, fill model flags from the checkpoint's flags.json, and check
    the flags every sampling script shares (before any work is done).

    :return: argparse.Namespace with a `saved_flags` attribute (dict or None).
    """
    args, explicit = parse_flags(defaults, argv, description)
    if not args.model_path:
        raise UsageError("--model_path is required: a model*.pt or ema_*.pt checkpoint of a training run")
    args.saved_flags = apply_run_flags(args, explicit, model_keys)
    if args.use_fp16 and args.use_bf16:
        raise UsageError("--use_fp16 and --use_bf16 exclude each other; give one")
    if args.use_fp16 and not torch.cuda.is_available():
        raise UsageError("--use_fp16 needs a CUDA device; on CPU use --use_bf16 True")
    check_sampler_flags(args, explicit)
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("--num_samples and --batch_size must be at least 1")
    return args


def check_guidance_flags(args):
    """--guidance_scale and --guidance_interval need a model trained with a null label; parse the interval."""
    scale, interval = getattr(args, "guidance_scale", 1.0), getattr(args, "guidance_interval", "")
    if scale == 1.0 and not interval:
        return
    if not getattr(args, "class_cond", False):
        raise UsageError("--guidance_scale and --guidance_interval need a class-conditional model (--class_cond True)")
    if getattr(args, "class_dropout_prob", 0.0) <= 0:
        raise UsageError(
            "--guidance_scale needs a model with a null label, and this one was trained without "
            "--class_dropout_prob: train with --class_dropout_prob 0.1 (or sample with --guidance_scale 1)"
        )
    if interval:
        try:
            lo, hi = (int(v) for v in interval.split(","))
        except ValueError:
            lo, hi = 1, 0
        if not 0 <= lo <= hi:
            raise UsageError(f"--guidance_interval {interval!r} must be two base timesteps 'lo,hi' with 0 <= lo <= hi")
        args.guidance_interval = (lo, hi)


def sampler_name(args):
    """--sampler, or what --use_ddim picks when it is empty: "ddim" or "ddpm"."""
    return getattr(args, "sampler", "") or ("ddim" if getattr(args, "use_ddim", False) else "ddpm")


def check_sampler_flags(args, explicit):
    """
    Fail on a sampler that does not exist and on flags the chosen sampler would
    ignore; an --eta not given becomes the sampler's own default (None).
    """
    name = sampler_name(args)
    if name not in samplers.SAMPLERS:
        raise UsageError(f"unknown --sampler {name!r}; known samplers: {', '.join(samplers.SAMPLERS)}")
    if getattr(args, "use_ddim", False) and name != "ddim":
        raise UsageError(f"--use_ddim True picks the ddim sampler, which contradicts --sampler {name}: drop one")
    if getattr(args, "eta", 0.0) != 0.0 and name not in samplers.ETA_DEFAULTS:
        hint = "add --use_ddim True or drop --eta" if name == "ddpm" else f"{name} ignores it: drop --eta"
        raise UsageError(
            f"--eta applies only to the samplers {', '.join(samplers.ETA_DEFAULTS)} (DDIM sampling with "
            f"--use_ddim True): {hint}"
        )
    if "eta" in vars(args) and "eta" not in explicit:
        args.eta = None
    check_guidance_flags(args)
    name_flag = getattr(args, "sample_name", "")
    if name_flag and (not all(c.isalnum() or c in "._-" for c in name_flag) or name_flag.startswith(".")):
        raise UsageError(
            f"--sample_name {name_flag!r} must be a plain file name stem (letters, digits, '.', '_', '-'; "
            "not starting with '.'): the outputs are written in $OPENAI_LOGDIR"
        )


# ---------------------------------------------------------------- setup and model


def prepare(args, create_fn, model_keys):
    """
    Set up the process group, load the model (so a bad checkpoint fails before
    the log directory is touched), configure the logger and resolve `args.seed`
    (random when < 0, the same on every rank).

    :return: (model, diffusion) as load_model returns them.
    """
    dist_util.setup_dist()
    model, diffusion = load_model(args, create_fn, model_keys)
    logger.configure()
    args.seed = shared_seed(args.seed)
    if args.saved_flags is not None:
        logger.log(f"model flags from the training run's {FLAGS_FILENAME} beside {args.model_path}")
    logger.log(f"seed {args.seed}, {dist.get_world_size()} rank(s), device {dist_util.dev()}")
    if "sample_name" in vars(args):  # a script with SAMPLER_FLAGS
        logger.log(describe_sampler(sampler_name(args), diffusion))
        if args.guidance_scale != 1.0 or args.guidance_interval:
            interval = f" at base timesteps {args.guidance_interval}" if args.guidance_interval else ""
            logger.log(f"classifier-free guidance at scale {args.guidance_scale}{interval}")
    return model, diffusion


def describe_sampler(name, diffusion):
    """One log line: the sampler, the base timesteps it walks (noisiest first) and its evaluations per sample."""
    steps = samplers.walk_timesteps(diffusion)
    shown = ", ".join(map(str, steps)) if len(steps) <= 20 else f"{', '.join(map(str, steps[:10]))}, ..., {steps[-1]}"
    evaluations = samplers.model_evaluations(name, len(steps))
    return f"sampler {name} over {len(steps)} timesteps ({shown}): {evaluations} model evaluations per sample"


def shared_seed(seed):
    """`seed` if it is >= 0, else a random seed drawn on rank 0 and broadcast."""
    if seed >= 0:
        return seed
    return dist_util.broadcast_object(secrets.randbits(62))


def load_model(args, create_fn, model_keys):
    """
    Build the model and diffusion from the flags and load `args.model_path`.
    The model is built on the meta device, without the random initialization
    of weights that the checkpoint replaces (seconds for a large model).

    :param create_fn: create_model_and_diffusion or sr_create_model_and_diffusion.
    :return: (model, diffusion); the model in eval mode on dist_util.dev(),
        converted to float16 with --use_fp16, wrapped in bfloat16 autocast
        with --use_bf16, and torch.compile'd with --compile (then wrapped in
        CompiledBatches, so a run compiles once).
    """
    flags = args_to_dict(args, model_keys)
    try:
        with torch.device("meta"):
            model, diffusion = create_fn(**flags)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state_dict = dist_util.load_state_dict(args.model_path, map_location="cpu")
    model.to_empty(device=dist_util.dev())
    try:
        load_model_state_dict(model, state_dict, flags, args.model_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()
    if args.use_bf16:
        warn_if_emulated_bf16(dist_util.dev())
        model = AutocastModel(model)
    if args.compile:
        model = CompiledBatches(torch.compile(model))
    return model, diffusion


class CompiledBatches(torch.nn.Module):
    """
    Runs each batch at the smallest batch size the model has already run that
    holds it, padding with copies of the last row and returning only the real
    rows; a batch larger than any before runs as it is. A torch.compile'd
    model is then not compiled again for a run's shorter last batch (nor for
    its doubled classifier-free guidance batch). The rows of a UNet do not
    depend on each other, so the padding changes no sample.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.sizes = set()

    def forward(self, x, timesteps, **kwargs):
        """x: [N x C x ...], timesteps: [N], kwargs of [N x ...] tensors -> the model's [N x ...] output."""
        n = x.shape[0]
        size = min((s for s in self.sizes if s >= n), default=n)
        self.sizes.add(size)
        if size == n:
            return self.model(x, timesteps, **kwargs)

        def pad(value):
            if not (torch.is_tensor(value) and value.shape[:1] == (n,)):
                return value
            return torch.cat([value, value[-1:].expand(size - n, *value.shape[1:])])

        return self.model(pad(x), pad(timesteps), **{k: pad(v) for k, v in kwargs.items()})[:n]


class AutocastModel(torch.nn.Module):
    """
    Runs a model under bfloat16 autocast and returns float32, so the diffusion
    arithmetic around it stays in float32.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timesteps, **kwargs):
        """x: [N x C x ...], timesteps: [N] -> float32 output of the wrapped model."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.model(x, timesteps, **kwargs)
        return out.float()


# ---------------------------------------------------------------- seeding


def sample_seed(seed, index, stream=NOISE_STREAM):
    """A 63-bit seed for sample `index` of a run seeded with `seed`, one per stream."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_generators(seed, indices, device, stream=NOISE_STREAM):
    """One torch.Generator on `device` per sample index, seeded by sample_seed."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i, stream)) for i in indices]


def draw_labels(seed, indices, num_classes):
    """Random class labels, int64 [len(indices)], each from its sample's own label stream."""
    generators = sample_generators(seed, indices, "cpu", stream=LABEL_STREAM)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])


def batch_labels(args, indices):
    """
    The requested classes of these sample indices, int64 [len(indices)]: all
    --class_label when it is >= 0, else each drawn from its sample's own label
    stream among --num_classes.
    """
    if args.class_label >= 0:
        return torch.full((len(indices),), args.class_label, dtype=torch.int64)
    return draw_labels(args.seed, indices, args.num_classes)


def run_sampler(diffusion, model, args, indices, shape, model_kwargs, cond_fn=None):
    """
    Sample one batch with --sampler (see sampler_name), --eta (None: the
    sampler's default) and classifier-free guidance (--guidance_scale,
    --guidance_interval as check_guidance_flags parsed it).

    :param indices: the global sample indices of the batch (they seed it).
    :param shape: the shape of one sample, (C, H, W).
    :param cond_fn: classifier guidance (diffusion.sample_loop's); it takes
        gradients, so the batch then runs under torch.no_grad, not inference_mode.
    :return: float32 [len(indices) x C x H x W], roughly in [-1, 1].
    """
    device = dist_util.dev()
    batch_shape = (len(indices), *shape)
    common = {
        "clip_denoised": args.clip_denoised,
        "model_kwargs": model_kwargs,
        "device": device,
        "generator": sample_generators(args.seed, indices, device),
        "guidance_scale": getattr(args, "guidance_scale", 1.0),
        "guidance_interval": getattr(args, "guidance_interval", "") or None,
    }
    with torch.inference_mode() if cond_fn is None else torch.no_grad():
        return diffusion.sample_loop(model, batch_shape, sampler=sampler_name(args), eta=args.eta, cond_fn=cond_fn,
                                     **common)


# ---------------------------------------------------------------- sharding and gathering


def rank_indices(num_items, rank, world_size):
    """The contiguous block of item indices that `rank` handles (a range; blocks differ by at most 1)."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def chunks(indices, size):
    """Consecutive slices of `indices` of at most `size` items."""
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def sample_in_shards(num_samples, batch_size, draw_batch, spool_dir, desc="sampling"):
    """
    Draw `num_samples` samples split over the ranks and collect them on rank 0
    as they come, one round of batches at a time, in arrays on disk: rank 0
    never holds more than one batch per rank in memory.

    :param draw_batch: function(indices) -> dict of NumPy arrays whose first
        axis has len(indices) rows, for those global sample indices.
    :param spool_dir: a local folder on rank 0 for the arrays (ignored elsewhere).
    :return: on rank 0, dict of memory-mapped arrays with num_samples rows in
        index order (valid while spool_dir exists); None on the other ranks.
    """
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    batches = [chunks(rank_indices(num_samples, r, world_size), batch_size) for r in range(world_size)]
    spool = SampleSpool(num_samples, spool_dir) if rank == 0 else None
    if world_size > 1:
        desc = f"{desc} (rank 0 of {world_size})"
    total = sum(map(len, batches[rank]))
    with tqdm(total=total, desc=desc, unit="sample", disable=rank != 0, file=sys.stderr) as bar:
        for round_index in range(max(map(len, batches))):
            mine = batches[rank][round_index] if round_index < len(batches[rank]) else None
            part = None if mine is None else (mine, draw_batch(mine))
            for indices, arrays in _gather_round(part):
                spool.put(indices, arrays)
            bar.update(0 if mine is None else len(mine))
    return None if spool is None else spool.arrays


def _gather_round(part):
    """Every rank's (indices, arrays) of this round (None: no batch), as a list on rank 0; [] elsewhere."""
    world_size = dist_util.get_world_size()
    if world_size == 1:
        return [part] if part is not None else []
    gathered = [None] * world_size if dist_util.get_rank() == 0 else None
    dist.gather_object(part, gathered, dst=0)
    return [p for p in gathered or [] if p is not None]


class SampleSpool:
    """Arrays of `num_samples` rows in .npy files under `folder`, filled batch by batch in any order."""

    def __init__(self, num_samples, folder):
        self.num_samples = num_samples
        self.folder = folder
        self.arrays = {}

    def put(self, indices, arrays):
        """Store the rows of a contiguous range of sample indices, one array per key."""
        for key, values in arrays.items():
            if key not in self.arrays:
                path = os.path.join(self.folder, f"{key}.npy")
                shape = (self.num_samples, *values.shape[1:])
                self.arrays[key] = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype, shape=shape)
            self.arrays[key][indices.start : indices.stop] = values


@contextlib.contextmanager
def spool_folder():
    """On rank 0, a temporary folder beside the outputs (the system's, for remote outputs); None elsewhere."""
    if dist_util.get_rank() != 0:
        yield None
        return
    log_dir = logger.get_dir()
    parent = log_dir if log_dir and is_local(log_dir) else None
    with tempfile.TemporaryDirectory(dir=parent, prefix=".samples_spool_") as folder:
        yield folder


def sample_and_save(args, draw_batch, desc="sampling"):
    """
    sample_in_shards over --num_samples in batches of --batch_size, then
    save_samples on rank 0 (draw_batch returns "images" and, optionally,
    "labels"); every rank waits for the files.
    """
    with spool_folder() as folder:
        result = sample_in_shards(args.num_samples, args.batch_size, draw_batch, folder, desc)
        if result is not None:
            save_samples(result["images"], result.get("labels"), args.save_pngs,
                         name=getattr(args, "sample_name", "") or "samples")
    dist_util.barrier()


def gather_parts(parts):
    """
    Concatenate every rank's list of array dicts, in rank order, on rank 0.

    :param parts: list of dicts of NumPy arrays (the same keys in all).
    :return: dict of concatenated arrays on rank 0, None on other ranks.
    """
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        parts = [part for rank_parts in gathered for part in rank_parts]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def to_uint8_images(x):
    """float [N x C x H x W] in [-1, 1] -> uint8 NumPy [N x H x W x C], rounded to the nearest level."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_images(images, device):
    """uint8 NumPy [N x H x W x C] -> float32 tensor [N x C x H x W] in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- output


def write_npz(path, **arrays):
    """Save NumPy arrays (memory-mapped ones are streamed) as an npz at `path`, atomically."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def write_png(path, image):
    """Save a uint8 [H x W x C] image (C = 1 or 3) as a PNG, atomically."""
    atomic_write_bytes(path, png_bytes(image))


def png_bytes(image):
    """A uint8 [H x W x C] image (C = 1 or 3) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def enlarge(images, min_side):
    """
    Repeat each pixel k times along each axis, with the least k that makes
    both sides at least min_side: uint8 [N x H x W x C] -> [N x kH x kW x C].
    """
    factor = max(1, math.ceil(min_side / min(images.shape[1:3])))
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def image_grid(images, pad=2):
    """
    Tile images in a near-square grid separated by `pad` black pixels.

    :param images: uint8 [N x H x W x C], N >= 1.
    :return: uint8 [rows*(H+pad)+pad x cols*(W+pad)+pad x C].
    """
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_samples(images, labels=None, save_pngs=False, log_dir=None, name="samples"):
    """
    Write {name}_{N}x{H}x{W}x{C}.npz (arr_0 images, arr_1 labels when given),
    a PNG grid of the first GRID_MAX_IMAGES beside it (enlarged to GRID_MIN_SIDE
    pixels when smaller) and, with `save_pngs`, a
    folder with one PNG per sample; print the paths.

    :param images: uint8 [N x H x W x C].
    :param labels: int [N] or None.
    :return: (npz_path, grid_path).
    """
    log_dir = log_dir or logger.get_dir()
    stem = bf.join(log_dir, f"{name}_" + "x".join(str(d) for d in images.shape))
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    write_npz(stem + ".npz", **arrays)
    write_png(stem + "_grid.png", image_grid(enlarge(images[:GRID_MAX_IMAGES], GRID_MIN_SIDE)))
    print(f"samples: {stem}.npz\ngrid: {stem}_grid.png", flush=True)
    if save_pngs:
        with atomic_folder(stem + "_pngs") as folder:
            for index, image in enumerate(images):
                with bf.BlobFile(bf.join(folder, f"{index:06d}.png"), "wb") as f:
                    f.write(png_bytes(image))
        print(f"pngs: {stem}_pngs/", flush=True)
    return stem + ".npz", stem + "_grid.png"
