"""
Command-line flags and the factories that turn them into a model and a diffusion.

The model's levels follow the image size (`default_channel_mult`) unless
--channel_mult lists them; --attention_resolutions lists the resolutions
(16 means 16x16) whose blocks get self-attention. Also: reading the flags
back from a state dict (`infer_model_flags`) and loading weights with an
error that names the flags to fix (`load_model_state_dict`).
"""

import argparse
import inspect
import math

from . import gaussian_diffusion as gd
from .image_datasets import check_image_channels
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# channel_mult by image size. The published sizes (32, 64, 256, and
# guided-diffusion's 128 and 512) never change. Every level halves the
# resolution; sizes up to 32 go down to 4x4, larger ones to 8x8. Sizes above
# 512 add one leading level of multiplier 0.5 per doubling.
DEFAULT_CHANNEL_MULT = {
    8: (1, 2),
    16: (1, 2, 2),
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}

# Super-resolution models differ at 512, as in guided-diffusion's 128->512 upsampler.
SR_DEFAULT_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4)}


def model_and_diffusion_defaults():
    """The flags of image_train.py / image_sample.py and their defaults."""
    return {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "attention_resolutions": "16,8",
        "dropout": 0.0,
        "learn_sigma": False,
        "sigma_small": False,
        "class_cond": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "predict_v": False,
        "snr_gamma": 0.0,
        "rescale_zero_terminal_snr": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "channel_mult": "",
        "num_classes": NUM_CLASSES,
        "num_head_channels": -1,
        "resblock_updown": False,
        "use_new_attention_order": False,
        "use_fp16": False,
        "class_dropout_prob": 0.0,
        "image_channels": 3,
    }


def sr_model_and_diffusion_defaults():
    """The super-resolution flags: the model defaults with large_size and small_size
    in place of image_size, and no sigma_small."""
    defaults = dict(large_size=256, small_size=64, **model_and_diffusion_defaults())
    del defaults["image_size"], defaults["sigma_small"]
    return defaults


def default_channel_mult(image_size, super_res=False):
    """
    The channel_mult used for `image_size` when --channel_mult is empty (see
    DEFAULT_CHANNEL_MULT; SR_DEFAULT_CHANNEL_MULT first for a super-resolution model).
    """
    if not _is_power_of_two(image_size) or image_size < 8:
        raise ValueError(
            f"unsupported image size {image_size}: use a power of two >= 8, "
            f"or give --channel_mult for other sizes"
        )
    if super_res and image_size in SR_DEFAULT_CHANNEL_MULT:
        return SR_DEFAULT_CHANNEL_MULT[image_size]
    largest = max(DEFAULT_CHANNEL_MULT)
    if image_size <= largest:
        return DEFAULT_CHANNEL_MULT[image_size]
    extra_levels = (image_size // largest).bit_length() - 1
    return (0.5,) * extra_levels + DEFAULT_CHANNEL_MULT[largest]


def parse_channel_mult(channel_mult, image_size, size_flag="image_size"):
    """
    The width multipliers of each level as a tuple of numbers (ints, or floats
    for fractions such as 0.5; level l is int(num_channels * mult[l]) wide).

    :param channel_mult: "" (the default for image_size), a string such as
                         "1,2,2,2" or "0.5,1,1,2,2,4,4", or a sequence of numbers.
    :param size_flag: the flag naming the image size, for error messages
                      ("large_size": a super-resolution model's defaults).
    """
    if channel_mult in ("", None):
        return default_channel_mult(image_size, super_res=size_flag == "large_size")
    mult = _parse_numbers(channel_mult, "channel_mult", 'a comma-separated list such as "1,2,2,2"')
    if not mult or min(mult) <= 0:
        raise ValueError(
            f"--channel_mult {_format_ints(channel_mult)} is invalid: give positive "
            f'numbers such as "1,2,2,2" or "0.5,1,1,2"'
        )
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"--{size_flag} {image_size} cannot be halved {len(mult) - 1} times as the "
            f"{len(mult)} levels of --channel_mult {_format_ints(mult)} need: use a size "
            f"divisible by {factor} or fewer levels"
        )
    return mult


def parse_attention_resolutions(attention_resolutions, image_size):
    """
    Downsampling factors with attention: "16,8" -> (image_size // 16, image_size // 8).
    "" means no attention blocks on the way down or up (the middle block always has one).
    """
    if attention_resolutions in ("", None):
        return ()
    resolutions = _parse_ints(
        attention_resolutions, "attention_resolutions", 'resolutions such as "16,8" (or "" for none)'
    )
    if min(resolutions) < 1:
        raise ValueError(f"--attention_resolutions {attention_resolutions} must be positive")
    return tuple(image_size // res for res in resolutions)


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    sigma_small,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    channel_mult="",
    num_classes=NUM_CLASSES,
    predict_v=False,
    snr_gamma=0.0,
    rescale_zero_terminal_snr=False,
    num_head_channels=-1,
    resblock_updown=False,
    use_new_attention_order=False,
    use_fp16=False,
    class_dropout_prob=0.0,
    image_channels=3,
):
    """(UNetModel, SpacedDiffusion) from the flags of model_and_diffusion_defaults()."""
    flags = locals()
    return create_model(**_arguments_of(create_model, flags)), _diffusion_from_flags(flags)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    channel_mult="",
    num_classes=NUM_CLASSES,
    num_head_channels=-1,
    resblock_updown=False,
    use_new_attention_order=False,
    use_fp16=False,
    class_dropout_prob=0.0,
    image_channels=3,
):
    """A UNetModel for image_channels-channel images of size image_size (twice the output channels with learn_sigma)."""
    return _create_unet(UNetModel, image_size, "image_size", **_unet_flags(locals()))


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    channel_mult="",
    num_classes=NUM_CLASSES,
    predict_v=False,
    snr_gamma=0.0,
    rescale_zero_terminal_snr=False,
    num_head_channels=-1,
    resblock_updown=False,
    use_new_attention_order=False,
    use_fp16=False,
    class_dropout_prob=0.0,
    image_channels=3,
):
    """(SuperResModel, SpacedDiffusion) from the flags of sr_model_and_diffusion_defaults()."""
    flags = locals()
    return sr_create_model(**_arguments_of(sr_create_model, flags)), _diffusion_from_flags(flags)


def _arguments_of(factory, flags):
    """The entries of `flags` that name parameters of `factory`."""
    names = inspect.signature(factory).parameters
    return {k: v for k, v in flags.items() if k in names}


def _diffusion_from_flags(flags):
    """create_gaussian_diffusion from a model-and-diffusion factory's flags (diffusion_steps is its steps)."""
    return create_gaussian_diffusion(steps=flags["diffusion_steps"], **_arguments_of(create_gaussian_diffusion, flags))


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    channel_mult="",
    num_classes=NUM_CLASSES,
    num_head_channels=-1,
    resblock_updown=False,
    use_new_attention_order=False,
    use_fp16=False,
    class_dropout_prob=0.0,
    image_channels=3,
):
    """A SuperResModel producing large_size images; levels and attention follow large_size."""
    if small_size > large_size:
        raise ValueError(f"--small_size {small_size} must not exceed --large_size {large_size}")
    return _create_unet(SuperResModel, large_size, "large_size", **_unet_flags(locals()))


def _unet_flags(factory_args):
    """The network flags among a model factory's arguments (all but the size flags)."""
    drop = ("image_size", "large_size", "small_size")
    return {k: v for k, v in factory_args.items() if k not in drop}


def _create_unet(
    cls,
    size,
    size_flag,
    *,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    channel_mult,
    num_classes,
    num_head_channels,
    resblock_updown,
    use_new_attention_order,
    use_fp16,
    class_dropout_prob=0.0,
    image_channels=3,
):
    check_image_channels(image_channels)
    if class_cond and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"--num_classes {num_classes} must be a positive integer with --class_cond True")
    if not 0 <= class_dropout_prob < 1 or (class_dropout_prob > 0 and not class_cond):
        raise ValueError(
            f"--class_dropout_prob {class_dropout_prob} must lie in [0, 1), and above 0 only with "
            "--class_cond True (it trains the null label of classifier-free guidance)"
        )
    return cls(
        in_channels=image_channels,
        model_channels=num_channels,
        out_channels=image_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, size, size_flag),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
        image_size=size,
        null_label=class_dropout_prob > 0,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    predict_v=False,
    snr_gamma=0.0,
    rescale_zero_terminal_snr=False,
):
    """
    A SpacedDiffusion over the retained steps of `timestep_respacing` ("" keeps all).

    Loss: RESCALED_KL with use_kl, else RESCALED_MSE with rescale_learned_sigmas,
    else MSE, weighted by min-SNR-gamma when snr_gamma > 0. Mean: START_X with
    predict_xstart, VELOCITY with predict_v, else EPSILON. Variance:
    LEARNED_RANGE with learn_sigma, else FIXED_SMALL with sigma_small, else
    FIXED_LARGE. rescale_zero_terminal_snr rescales the betas to abar_T = 0
    (it needs predict_v or predict_xstart).
    """
    if predict_v and predict_xstart:
        raise ValueError("--predict_v and --predict_xstart exclude each other: give one")
    if rescale_zero_terminal_snr and not (predict_v or predict_xstart):
        raise ValueError(
            "--rescale_zero_terminal_snr True makes abar = 0 at the last step, where an eps-prediction model "
            "cannot give x_0: add --predict_v True (or --predict_xstart True)"
        )
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if rescale_zero_terminal_snr:
        betas = gd.rescale_zero_terminal_snr(betas)
    mean_type = gd.ModelMeanType.EPSILON
    if predict_xstart or predict_v:
        mean_type = gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.VELOCITY
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps], betas=betas),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        snr_gamma=snr_gamma,
    )


def diffusion_defaults():
    """The diffusion flags among model_and_diffusion_defaults() (guided-diffusion's name)."""
    names = set(inspect.signature(create_gaussian_diffusion).parameters) | {"diffusion_steps"}
    return {k: v for k, v in model_and_diffusion_defaults().items() if k in names}


def classifier_defaults():
    """The flags of guided-diffusion's noisy classifier (create_classifier) and their defaults."""
    return {
        "image_size": 64,
        "classifier_use_fp16": False,
        "classifier_width": 128,
        "classifier_depth": 2,
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",
    }


def classifier_and_diffusion_defaults():
    """classifier_defaults() and diffusion_defaults() together."""
    return {**classifier_defaults(), **diffusion_defaults()}


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
    image_channels=3,
):
    """
    An EncoderUNetModel over num_classes classes of image_channels-channel
    images, with the levels of image_size (default_channel_mult) and attention
    heads of 64 channels.
    """
    check_image_channels(image_channels)
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=image_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=parse_attention_resolutions(classifier_attention_resolutions, image_size),
        channel_mult=default_channel_mult(image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
    image_channels=3,
    **more_diffusion_flags,
):
    """
    (EncoderUNetModel, SpacedDiffusion) from the flags of
    classifier_and_diffusion_defaults(), num_classes and image_channels.
    """
    flags = {k: v for k, v in locals().items() if k != "more_diffusion_flags"}
    flags.update(more_diffusion_flags)
    return create_classifier(**_arguments_of(create_classifier, flags)), _diffusion_from_flags(flags)


def add_dict_to_argparser(parser, default_dict):
    """Add a --key flag per entry, typed by its default (booleans through str2bool)."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        parser.add_argument(f"--{key}", default=value, type=value_type)


def args_to_dict(args, keys):
    """{key: args.key} for each key."""
    return {k: getattr(args, k) for k in keys}


_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def str2bool(v):
    """Parse a command-line boolean: yes/true/t/y/1 or no/false/f/n/0, any case."""
    if isinstance(v, bool):
        return v
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"boolean value expected, got {v!r}: use one of {'/'.join(_TRUE)} for true "
        f"or {'/'.join(_FALSE)} for false"
    )


def _is_power_of_two(n):
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def _parse_ints(value, flag, expected):
    """A tuple of ints from "1,2,3", an int or a sequence of ints; ValueError naming --flag otherwise."""
    if isinstance(value, int):
        return (value,)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag} {value!r} is not {expected}") from None


def _parse_numbers(value, flag, expected):
    """
    A tuple of finite numbers from "0.5,1,2", a number or a sequence: each an
    int when it is whole, else a float. ValueError naming --flag otherwise.
    """
    if isinstance(value, (int, float)):
        value = (value,)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"--{flag} {value!r} is not {expected}")
    return tuple(int(n) if n.is_integer() else n for n in numbers)


def _format_ints(values):
    """(1, 2, 2) or "1,2,2" -> "1,2,2"; (0.5, 1) -> "0.5,1"."""
    if isinstance(values, str):
        return values
    return ",".join(str(v) for v in values)


# guided-diffusion's published diffusion checkpoints and the flags that load
# each here (its README's flags; dropout only matters for fine-tuning). With
# 1000 steps, this library's defaults --rescale_timesteps True and
# --rescale_learned_sigmas True give the same numbers as guided-diffusion's False.
_ADM_256 = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
GUIDED_DIFFUSION_CHECKPOINTS = {
    "64x64_diffusion.pt": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
        "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
        "--use_scale_shift_norm True"
    ),
    "128x128_diffusion.pt": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
    ),
    "256x256_diffusion.pt": _ADM_256 + " --class_cond True",
    "256x256_diffusion_uncond.pt": _ADM_256 + " --class_cond False",
    "512x512_diffusion.pt": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"
    ),
    "64_256_upsampler.pt": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 "
        "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
    ),
    "128_512_upsampler.pt": (
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
        "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True"
    ),
    "lsun_bedroom.pt": _ADM_256 + " --class_cond False --dropout 0.1",
    "lsun_cat.pt": _ADM_256 + " --class_cond False --dropout 0.1",
    "lsun_horse.pt": _ADM_256 + " --class_cond False --dropout 0.1",
    "lsun_horse_nodropout.pt": _ADM_256 + " --class_cond False --dropout 0.0",
}

# The flags that shape attention but not the weights: a published layout's values are a hint.
_HEAD_FLAGS = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order")


def guided_checkpoint_flags(name):
    """
    The full flag dict (this library's defaults, then the published flags) of
    a GUIDED_DIFFUSION_CHECKPOINTS entry, for create_model_and_diffusion or,
    for an upsampler, sr_create_model_and_diffusion.
    """
    argv = GUIDED_DIFFUSION_CHECKPOINTS[name].split()
    defaults = sr_model_and_diffusion_defaults() if "--large_size" in argv else model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return vars(parser.parse_args(argv))


def _layout_of_flags(flags):
    """The _read_layout dict that a model built from a full flag dict has."""
    size = flags.get("large_size", flags.get("image_size"))
    size_flag = "large_size" if "large_size" in flags else "image_size"
    mult = parse_channel_mult(flags["channel_mult"], size, size_flag)
    levels = {2**i for i in range(len(mult))}
    return {
        "model_channels": flags["num_channels"],
        "in_channels": flags.get("image_channels", 3) * (2 if "large_size" in flags else 1),
        "out_channels": flags.get("image_channels", 3) * (2 if flags["learn_sigma"] else 1),
        "channel_mult": mult,
        "num_res_blocks": flags["num_res_blocks"],
        "attention_ds": set(parse_attention_resolutions(flags["attention_resolutions"], size)) & levels,
        # One more label embedding, the null label, when trained with class dropout.
        "num_classes": flags["num_classes"] + (flags.get("class_dropout_prob", 0) > 0) if flags["class_cond"] else None,
        "use_scale_shift_norm": flags["use_scale_shift_norm"],
        "resblock_updown": flags["resblock_updown"],
    }


def _published_hints(layout, flags):
    """
    For weights with the layout of published guided-diffusion checkpoints:
    a line naming them with the flags that load them, and one per attention
    flag that the given flags set otherwise (the weights cannot show those).
    """
    names = [name for name in GUIDED_DIFFUSION_CHECKPOINTS
             if _layout_of_flags(guided_checkpoint_flags(name)) == layout]
    if not names:
        return []
    published = guided_checkpoint_flags(names[0])
    hints = [
        f"--{flag} {flags[flag]} (guided-diffusion's {names[0]} uses {published[flag]}, which the weights cannot show)"
        for flag in _HEAD_FLAGS
        if flag in flags and flags[flag] != published[flag]
    ]
    return hints + [
        f"these weights have the layout of guided-diffusion's {' / '.join(names)}, which loads with "
        f"{GUIDED_DIFFUSION_CHECKPOINTS[names[0]]}"
    ]


def infer_model_flags(state_dict):
    """
    The flags that can be read off UNet weights.

    :return: a dict with num_channels, num_res_blocks, channel_mult (such as
             "1,2,2,2"), learn_sigma, class_cond, num_classes (class-conditional
             weights only), use_scale_shift_norm, resblock_updown and
             image_channels (1 or 3, from the input channels); and, when
             channel_mult is the default of an image size, that size (as
             large_size for super-resolution weights, else image_size) and
             attention_resolutions. The attention heads (num_heads,
             num_head_channels, use_new_attention_order) leave no trace in the
             weights' shapes and are never inferred.
    :raises ValueError: for an optimizer state or anything else that holds no UNet weights.
    """
    layout = _read_layout(state_dict, "the state dict")
    flags = {
        "num_channels": layout["model_channels"],
        "num_res_blocks": layout["num_res_blocks"],
        "channel_mult": _format_ints(layout["channel_mult"]),
        "class_cond": layout["num_classes"] is not None,
        "use_scale_shift_norm": layout["use_scale_shift_norm"],
        "resblock_updown": layout["resblock_updown"],
    }
    if layout["num_classes"] is not None:
        flags["num_classes"] = layout["num_classes"]
    super_res, channels = _image_channels_of(layout["in_channels"])
    if channels is not None:
        flags["image_channels"] = channels
        if layout["out_channels"] in (channels, 2 * channels):
            flags["learn_sigma"] = layout["out_channels"] == 2 * channels
    size = _size_with_default_mult(layout["channel_mult"], super_res)
    if size is not None:
        flags["large_size" if super_res else "image_size"] = size
        flags["attention_resolutions"] = _format_resolutions(layout["attention_ds"], size)
    return flags


def load_model_state_dict(model, state_dict, flags, source="the weights"):
    """
    Load weights into a model built from `flags`, strictly.

    :param flags: the flags the model was built from (model_and_diffusion_defaults()
                  or sr_model_and_diffusion_defaults() keys; missing keys are not checked).
    :param source: where the weights came from (a path), for error messages.
    :return: the model.
    :raises ValueError: naming each flag the weights contradict, as
                        "--flag X (the weights say Y)", or, when no flag explains the
                        mismatch, summarizing the missing, unexpected and misshapen keys;
                        for weights with the layout of a published guided-diffusion
                        checkpoint, also the flags that load it (GUIDED_DIFFUSION_CHECKPOINTS).
    """
    layout = _read_layout(state_dict, source)
    problems = _contradictions(layout, flags, model)
    if problems:
        problems += _published_hints(layout, flags)
    else:
        problems = _key_differences(model.state_dict(), state_dict)
    if problems:
        raise ValueError(
            f"{source} does not fit this model:\n  " + "\n  ".join(problems)
            + "\nFix these flags, or load weights trained with the flags given."
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def _read_layout(state_dict, source):
    """
    The architecture visible in UNet weights: a dict with model_channels,
    in_channels, out_channels, channel_mult (tuple), num_res_blocks (None when
    levels differ), attention_ds (downsampling factors of the down path's
    attention), num_classes (None when unconditional), use_scale_shift_norm
    and resblock_updown.
    """
    _check_model_weights(state_dict, source)
    resblock_updown = _upsampling_res_blocks(state_dict) > 0
    levels = _input_levels(state_dict, resblock_updown)
    model_channels = state_dict["time_embed.0.weight"].shape[1]
    label_emb = state_dict.get("label_emb.weight")
    middle_out = state_dict["middle_block.0.in_layers.2.weight"].shape[0]
    return {
        "model_channels": model_channels,
        "in_channels": state_dict["input_blocks.0.0.weight"].shape[1],
        "out_channels": state_dict["out.2.weight"].shape[0],
        "channel_mult": tuple(_multiplier(level[0][0], model_channels) for level in levels),
        "num_res_blocks": len(levels[0]) if len({len(lv) for lv in levels}) == 1 else None,
        "attention_ds": {2**i for i, level in enumerate(levels) if any(a for _, a in level)},
        "num_classes": None if label_emb is None else label_emb.shape[0],
        "use_scale_shift_norm": state_dict["middle_block.0.emb_layers.1.weight"].shape[0] == 2 * middle_out,
        "resblock_updown": resblock_updown,
    }


def _upsampling_res_blocks(state_dict):
    """How many output blocks end in a residual block that upsamples (resblock_updown)."""
    blocks = set()
    for key in state_dict:
        part, index, position, *rest = key.split(".") + ["", ""]
        if part == "output_blocks" and position != "0" and rest[:2] == ["in_layers", "0"]:
            blocks.add(index)
    return len(blocks)


def _input_levels(state_dict, resblock_updown):
    """
    The residual blocks of each level on the way down: a list per level of
    (output width, followed by attention) pairs, without the blocks that downsample.
    """
    last = max(int(k.split(".")[1]) for k in state_dict if k.startswith("input_blocks."))
    blocks = []
    for i in range(1, last + 1):
        conv = state_dict.get(f"input_blocks.{i}.0.in_layers.2.weight")
        blocks.append(None if conv is None else (conv.shape[0], f"input_blocks.{i}.1.qkv.weight" in state_dict))
    if resblock_updown:
        per_level = (len(blocks) + 1) // (_upsampling_res_blocks(state_dict) + 1)
        return [blocks[start : start + per_level - 1] for start in range(0, len(blocks), per_level)]
    levels = [[]]
    for block in blocks:
        if block is None:
            levels.append([])
        else:
            levels[-1].append(block)
    return levels


def _multiplier(width, model_channels):
    """A level's channel_mult entry from its width: an int when whole (2), else a float (0.5)."""
    ratio = width / model_channels
    return int(ratio) if ratio.is_integer() else ratio


_REQUIRED_KEYS = (
    "time_embed.0.weight",
    "input_blocks.0.0.weight",
    "middle_block.0.in_layers.2.weight",
    "middle_block.0.emb_layers.1.weight",
    "out.2.weight",
)


def _check_model_weights(state_dict, source):
    """Raise ValueError unless state_dict looks like UNet weights, saying what it is instead."""
    if not isinstance(state_dict, dict):
        message = f"{source} holds a {type(state_dict).__name__}, not a state dict of model weights"
        raise ValueError(message)  # noqa: TRY004 (callers report every bad checkpoint as a ValueError)
    if {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"{source} is an optimizer state (keys 'state' and 'param_groups'), not model "
            f"weights: give a modelNNNNNN.pt or ema_RATE_NNNNNN.pt file instead of optNNNNNN.pt"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if not missing:
        return
    if all(str(k).startswith("module.") for k in state_dict):
        hint = "its keys start with 'module.' (saved from a DistributedDataParallel wrapper): strip that prefix"
    else:
        hint = f"its first keys are {', '.join(map(str, list(state_dict)[:5]))}"
    raise ValueError(f"{source} does not hold UNet weights (no '{missing[0]}'): {hint}")


def _contradictions(layout, flags, model):
    """["--flag X (the weights say Y)", ...] for each flag that the weights contradict."""
    super_res = isinstance(model, SuperResModel)
    weights_in, model_in = layout["in_channels"], model.in_channels
    channels = model_in // 2 if super_res else model_in
    weights_channels = weights_in / (2 if super_res else 1)
    if weights_in != model_in and weights_channels in (1, 3):
        return [_say("image_channels", flags.get("image_channels", 3), int(weights_channels))]
    if weights_in != model_in:
        hint = ""
        if weights_in == 2 * model_in:
            hint = ": these are super-resolution weights, for the super_res scripts"
        elif 2 * weights_in == model_in:
            hint = ": these are image-model weights, for the image scripts"
        return [f"the weights take {weights_in} input channels, this model {model_in}{hint}"]
    found = {
        "num_channels": layout["model_channels"],
        "num_res_blocks": layout["num_res_blocks"],
        "use_scale_shift_norm": layout["use_scale_shift_norm"],
        "resblock_updown": layout["resblock_updown"],
        "class_cond": layout["num_classes"] is not None,
    }
    if layout["out_channels"] in (channels, 2 * channels):
        found["learn_sigma"] = layout["out_channels"] == 2 * channels
    null_problem = []
    if layout["num_classes"] is not None and flags.get("class_cond"):
        with_null = flags.get("class_dropout_prob", 0) > 0
        found["num_classes"] = layout["num_classes"] - with_null
        if not with_null and layout["num_classes"] == flags["num_classes"] + 1:
            del found["num_classes"]
            null_problem = [
                f"--class_dropout_prob {flags.get('class_dropout_prob', 0.0)} (the weights have "
                f"{layout['num_classes']} label embeddings: {flags['num_classes']} classes and a null label; "
                "give the --class_dropout_prob they were trained with, e.g. 0.1)"
            ]
    problems = null_problem + [
        _say(flag, flags[flag], value)
        for flag, value in found.items()
        if flag in flags and value is not None and flags[flag] != value
    ]
    size_flag = "large_size" if super_res else "image_size"
    if size_flag in flags:
        problems += _level_contradictions(layout, flags, size_flag)
    return problems


def _level_contradictions(layout, flags, size_flag):
    """Contradictions in the levels (image size or channel_mult) or, if those agree, in attention."""
    size, given_mult = flags[size_flag], flags.get("channel_mult", "")
    mult = parse_channel_mult(given_mult, size, size_flag)
    if mult != layout["channel_mult"]:
        weights_size = _size_with_default_mult(layout["channel_mult"], size_flag == "large_size")
        if given_mult in ("", None) and weights_size is not None:
            return [_say(size_flag, size, weights_size)]
        return [_say("channel_mult", given_mult, _format_ints(layout["channel_mult"]))]
    levels = {2**i for i in range(len(mult))}
    given_ds = set(parse_attention_resolutions(flags.get("attention_resolutions", ""), size)) & levels
    if given_ds == layout["attention_ds"] or "attention_resolutions" not in flags:
        return []
    return [_say("attention_resolutions", flags["attention_resolutions"],
                 _format_resolutions(layout["attention_ds"], size))]


def _key_differences(expected, state_dict):
    """Missing, unexpected and misshapen keys of state_dict, a few of each, as message lines."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} (weights {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    lines = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            lines.append(f"{len(keys)} {what} keys: {', '.join(keys[:3])}{more}")
    return lines


def _size_with_default_mult(channel_mult, super_res=False):
    """The image size whose default channel_mult is `channel_mult`, or None."""
    for exponent in range(3, 17):
        if default_channel_mult(2**exponent, super_res) == tuple(channel_mult):
            return 2**exponent
    return None


def _format_resolutions(attention_ds, size):
    """Downsampling factors -> the --attention_resolutions string ("16,8"; '""' for none)."""
    return ",".join(str(size // ds) for ds in sorted(attention_ds)) or '""'


def _image_channels_of(in_channels):
    """
    (super_res, image_channels) read off a UNet's input channels: 1 or 3 for
    an image model, twice that for a super-resolution model (which also sees
    the upsampled low-resolution image); image_channels None otherwise.
    """
    if in_channels in (2, 6):
        return True, in_channels // 2
    return False, in_channels if in_channels in (1, 3) else None


def _say(flag, given, found):
    """ "--flag X (the weights say Y)", with empty strings shown as "". """
    given = '""' if given in ("", None) else given
    return f"--{flag} {given} (the weights say {found})"
