"""
The sampling scripts' flags turned into calls (image_sample.py,
super_res_sample.py, image_nll.py, classifier_sample.py,
search_timesteps.py): parsing, the model flags taken from the training run's
flags.json, the checks of sampler and guidance flags, the run's setup, and
one batch drawn with the chosen sampler. The work itself is in the library:
model_loading.py (the model), sample_seeds.py (per-sample noise),
sharding.py (ranks), image_output.py (npz and PNGs).
"""

import blobfile as bf
import torch

from . import dist_util, logger, samplers
from . import flags as flag_table
from .errors import InputError, UsageError
from .image_output import save_samples
from .model_loading import load_model
from .run_flags import FLAGS_FILENAME, read_run_flags
from .sample_seeds import draw_labels, sample_generators, shared_seed
from .sharding import sample_in_shards, spool_folder

# The size flags that tell an image model's run from a super-resolution model's.
SIZE_FLAGS = ("image_size", "large_size", "small_size")
# What a process's nodes (and so a --guidance_interval) are in, by --objective.
LEVELS = {"ddpm": "base timesteps", "edm": "sigma", "flow": "t"}


# ---------------------------------------------------------------- flags


def parse_flags(defaults, argv=None, description=None):
    """
    Parse command-line flags of the flag table with these defaults.

    :param defaults: {name: default} of flags of improved_diffusion.flags.FLAGS.
    :return: (args, explicit) where `explicit` is the set of flag names given
        on the command line (as opposed to taken from `defaults`).
    """
    records = [flag_table.FLAGS[name].with_default(value) for name, value in defaults.items()]
    return flag_table.parse_with(records, argv, description=description)


def apply_run_flags(args, explicit, model_keys):
    """
    Take the flags of a checkpoint kind (architecture and process: see
    improved_diffusion/flags.py) among `model_keys` from the flags.json of the
    run that trained `args.model_path`, when it saved one, in place. The other
    flags (dropout, timestep_respacing, use_fp16, ...) stay the user's.

    :return: the saved flags, or None when the run saved none.
    :raises InputError: naming every explicit flag that contradicts a saved one,
        or when the run was of another kind (super-resolution against image).
    """
    saved = read_run_flags(args.model_path)
    if saved is None:
        return None
    flags_path = bf.join(bf.dirname(args.model_path), FLAGS_FILENAME)
    missing_sizes = [f"--{key}" for key in SIZE_FLAGS if key in model_keys and key not in saved]
    if missing_sizes:
        raise InputError(
            f"{flags_path} has no {' or '.join(missing_sizes)}: {args.model_path} comes from another kind "
            f"of training run (image_train.py pairs with image_sample.py and image_nll.py, "
            f"super_res_train.py with super_res_sample.py)"
        )
    # A flag of another objective is check_objective_flags' error, not a contradiction.
    objective = args.objective if "objective" in explicit else saved.get("objective", flag_table.DDPM)
    relevant = [name for name in model_keys if flag_table.applies(name, objective)]
    conflicts = flag_table.contradictions(vars(args), saved, relevant, explicit)
    if conflicts:
        raise InputError(
            f"flags contradict the training run of {args.model_path} (saved in {flags_path}): "
            + ", ".join(conflicts)
            + ". Drop or fix them: --model_path alone rebuilds the model from its saved flags."
        )
    for key in flag_table.names_of_kind(model_keys, *flag_table.CHECKPOINT_KINDS):
        if key in saved and key not in explicit:
            setattr(args, key, saved[key])
    return saved


def parse_sampling_flags(script, argv=None, description=None, run_flags_except=()):
    """
    Parse a sampling script's flags (improved_diffusion.flags.SCRIPTS), fill
    the model flags from the checkpoint's flags.json, and check the flags
    every sampling script shares, before any work is done.

    :param run_flags_except: flags never taken from the flags.json (the script resolves them itself).
    :return: (args, explicit): the argparse.Namespace, with a `saved_flags`
        attribute (dict or None), and the names of the flags given on the command line.
    """
    args, explicit = flag_table.parse(script, argv, description)
    names = [flag.name for flag in flag_table.script_flags(script)]
    if not args.model_path:
        raise UsageError("--model_path is required: a model*.pt or ema_*.pt checkpoint of a training run")
    args.saved_flags = apply_run_flags(args, explicit, [n for n in names if n not in run_flags_except])
    if "objective" in names:
        check_objective_flags(args, explicit)
    if args.use_fp16 and args.use_bf16:
        raise UsageError("--use_fp16 and --use_bf16 exclude each other; give one")
    if args.use_fp16 and not torch.cuda.is_available():
        raise UsageError("--use_fp16 needs a CUDA device; on CPU use --use_bf16 True")
    if "sampler" in names:
        args.sampler = check_sampler(args.sampler, use_ddim=args.use_ddim if "use_ddim" in names else False,
                                     eta=args.eta if "eta" in names else 0.0)
        if "eta" in names and "eta" not in explicit:
            args.eta = None
    if "guidance_scale" in names:
        args.guidance_interval = check_guidance(args.guidance_scale, args.guidance_interval, args.class_cond,
                                                args.null_label, objective=args.objective)
    if "sample_name" in names:
        check_sample_name(args.sample_name)
    counts = [name for name in ("num_samples", "batch_size", "num_samples_per_input") if name in names]
    if any(getattr(args, name) < 1 for name in counts):
        raise UsageError(f"{' and '.join('--' + name for name in counts)} must be at least 1")
    return args, explicit


def check_objective_flags(args, explicit):
    """
    UsageError naming each given flag that does not apply to the model's
    --objective (from its flags.json, or given); then the flags not given take
    their defaults under that objective (its sampler; with --use_ddim the
    sampler stays ddim).
    """
    from_run = args.saved_flags is not None and "objective" not in explicit
    source = f"this model's --objective {args.objective} (its {FLAGS_FILENAME})" if from_run else None
    flag_table.check_objective(args.objective, explicit, source)
    if args.continuous_timesteps and not args.timestep_respacing:
        raise UsageError(
            "--continuous_timesteps True places the nodes of a --timestep_respacing spelling (logsnrN, karrasN, "
            "quadN, trailingN, uniformN or a .json list) exactly; without one every integer timestep is kept: "
            "give --timestep_respacing or drop --continuous_timesteps"
        )
    keep = set(explicit) | ({"sampler"} if getattr(args, "use_ddim", False) else set())
    flag_table.apply_objective_defaults(vars(args), keep, args.objective)


def require_ddpm(args, what):
    """InputError unless the model's --objective is ddpm: `what` (a script's job) needs the DDPM family."""
    if args.objective != flag_table.DDPM:
        raise InputError(
            f"{args.model_path} was trained with --objective {args.objective}, and {what} needs a DDPM-family "
            "model (--objective ddpm): sample it with image_sample.py"
        )


def check_guidance(scale, interval, class_cond, null_label, objective="ddpm"):
    """
    Classifier-free guidance needs a class-conditional model with a null label
    (an InputError: the checkpoint has none).

    :param interval: --guidance_interval, "" or "lo,hi".
    :param objective: the interval is in the process's nodes (LEVELS): base
        timesteps (integers) for the DDPM family, EDM's sigma, a flow's t.
    :return: (lo, hi), or None for no interval.
    """
    if scale == 1.0 and not interval:
        return None
    if not class_cond:
        raise InputError("--guidance_scale and --guidance_interval need a class-conditional model (--class_cond True)")
    if not null_label:
        raise InputError(
            "--guidance_scale needs a model with a null label, and this one was trained without one: train with "
            "--class_dropout_prob 0.1 (which adds --null_label True), or sample with --guidance_scale 1"
        )
    if not interval:
        return None
    number = int if objective == flag_table.DDPM else float
    try:
        lo, hi = (number(v) for v in interval.split(","))
    except ValueError:
        lo, hi = 1, 0
    if not 0 <= lo <= hi:
        raise UsageError(
            f"--guidance_interval {interval!r} must be two values of {LEVELS[objective]} 'lo,hi' with 0 <= lo <= hi"
        )
    return lo, hi


def check_sampler(sampler, use_ddim=False, eta=0.0):
    """
    The sampler to use: --sampler, or what --use_ddim picks when it is empty
    ("ddim" or "ddpm"). Fails on a sampler that does not exist and on an
    --eta the chosen sampler would ignore.
    """
    name = sampler or ("ddim" if use_ddim else "ddpm")
    if name not in samplers.SAMPLERS:
        raise UsageError(f"unknown --sampler {name!r}; known samplers: {', '.join(samplers.SAMPLERS)}")
    if use_ddim and name != "ddim":
        raise UsageError(f"--use_ddim True picks the ddim sampler, which contradicts --sampler {name}: drop one")
    if eta != 0.0 and name not in samplers.ETA_DEFAULTS:
        hint = "add --use_ddim True or drop --eta" if name == "ddpm" else f"{name} ignores it: drop --eta"
        raise UsageError(
            f"--eta applies only to the samplers {', '.join(samplers.ETA_DEFAULTS)} (DDIM sampling with "
            f"--use_ddim True): {hint}"
        )
    return name


def check_sample_name(name):
    """--sample_name must be a plain file name stem."""
    if name and (not all(c.isalnum() or c in "._-" for c in name) or name.startswith(".")):
        raise UsageError(
            f"--sample_name {name!r} must be a plain file name stem (letters, digits, '.', '_', '-'; "
            "not starting with '.'): the outputs are written in $OPENAI_LOGDIR"
        )


def model_flags(args, super_res=False):
    """The model and diffusion flags among the parsed flags (what model_from_flags / diffusion_from_flags read)."""
    names = flag_table.SR_MODEL_AND_DIFFUSION if super_res else flag_table.MODEL_AND_DIFFUSION
    return {name: getattr(args, name) for name in names + flag_table.MODEL_EXTRAS}


def batch_labels(args, indices):
    """
    The requested classes of these sample indices, int64 [len(indices)]: all
    --class_label when it is >= 0, else each drawn from its sample's own label
    stream among --num_classes.
    """
    if args.class_label >= 0:
        return torch.full((len(indices),), args.class_label, dtype=torch.int64)
    return draw_labels(args.seed, indices, args.num_classes)


# ---------------------------------------------------------------- setup


def prepare(args, super_res=False, describe_sampler=True):
    """
    Set up the process group, load the model (so a bad checkpoint fails before
    the log directory is touched), configure the logger and resolve `args.seed`
    (random when < 0, the same on every rank).

    :param super_res: the model is a super-resolution model (large_size, small_size).
    :param describe_sampler: log the sampler and guidance (--sampler, --guidance_scale, --guidance_interval).
    :return: (model, diffusion) as model_loading.load_model returns them.
    """
    dist_util.setup_dist()
    model, diffusion = load_model(args.model_path, model_flags(args, super_res), use_fp16=args.use_fp16,
                                  use_bf16=args.use_bf16, compile=args.compile)
    logger.configure()
    args.seed = shared_seed(args.seed)
    if args.saved_flags is not None:
        logger.log(f"model flags from the training run's {FLAGS_FILENAME} beside {args.model_path}")
    logger.log(f"seed {args.seed}, {dist_util.get_world_size()} rank(s), device {dist_util.dev()}")
    if describe_sampler:
        logger.log(sampler_description(args.sampler, diffusion))
        if args.guidance_scale != 1.0 or args.guidance_interval:
            interval = f" at {LEVELS[args.objective]} {args.guidance_interval}" if args.guidance_interval else ""
            logger.log(f"classifier-free guidance at scale {args.guidance_scale}{interval}")
    return model, diffusion


def sampler_description(name, diffusion):
    """
    One log line: the sampler, the nodes it walks, noisiest first (base
    timesteps; EDM's sigmas, a flow's times), and its evaluations per sample.
    """
    steps = [f"{t:.4g}" if isinstance(t, float) else str(t) for t in samplers.walk_timesteps(diffusion)]
    shown = ", ".join(steps) if len(steps) <= 20 else f"{', '.join(steps[:10])}, ..., {steps[-1]}"
    evaluations = samplers.model_evaluations(name, len(steps))
    return f"sampler {name} over {len(steps)} timesteps ({shown}): {evaluations} model evaluations per sample"


# ---------------------------------------------------------------- drawing


def draw_samples(diffusion, model, shape, indices, *, seed, sampler, eta=None, clip_denoised=True,
                 model_kwargs=None, cond_fn=None, guidance_scale=1.0, guidance_interval=None):
    """
    Sample one batch, each sample from its own noise (sample_seeds).

    :param shape: the shape of one sample, (C, H, W).
    :param indices: the global sample indices of the batch (they seed it).
    :param eta: the sampler's noise scale (None: its default).
    :param cond_fn: classifier guidance (diffusion.sample_loop's); it takes
        gradients, so the batch then runs under torch.no_grad, not inference_mode.
    :param guidance_scale, guidance_interval: classifier-free guidance (see samplers).
    :return: float32 [len(indices) x C x H x W], roughly in [-1, 1].
    """
    device = dist_util.dev()
    with torch.inference_mode() if cond_fn is None else torch.no_grad():
        return diffusion.sample_loop(
            model, (len(indices), *shape), sampler=sampler, eta=eta, cond_fn=cond_fn, clip_denoised=clip_denoised,
            model_kwargs=model_kwargs, device=device, generator=sample_generators(seed, indices, device),
            guidance_scale=guidance_scale, guidance_interval=guidance_interval,
        )


def run_sampler(diffusion, model, args, indices, shape, model_kwargs, cond_fn=None):
    """draw_samples with the parsed sampling flags (--seed, --sampler, --eta, --clip_denoised, guidance)."""
    return draw_samples(
        diffusion, model, shape, indices, seed=args.seed, sampler=args.sampler, eta=args.eta,
        clip_denoised=args.clip_denoised, model_kwargs=model_kwargs, cond_fn=cond_fn,
        guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
    )


def sample_and_save(num_samples, batch_size, draw_batch, save_pngs=False, name="samples", desc="sampling"):
    """
    sample_in_shards over `num_samples` in batches of `batch_size`, then
    image_output.save_samples on rank 0 (draw_batch(indices) returns
    "images" and, optionally, "labels"); every rank waits for the files.
    """
    with spool_folder() as folder:
        result = sample_in_shards(num_samples, batch_size, draw_batch, folder, desc)
        if result is not None:
            save_samples(result["images"], result.get("labels"), save_pngs, name=name or "samples")
    dist_util.barrier()
