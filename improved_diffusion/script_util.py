"""
The flags' defaults dicts of the reference and the factories that turn flags
into a model and a diffusion (SPEC §8, §12, §13).

The defaults come from the one flag table (improved_diffusion/flags.py). The
model's levels follow the image size (`default_channel_mult`) unless
--channel_mult lists them; --attention_resolutions lists the resolutions (16
means 16x16) whose blocks get self-attention. Each factory keeps the
reference's signature and hands its flags to `model_from_flags` and
`diffusion_from_flags`, which the scripts call with their parsed flags.
Reading a checkpoint's layout back into flags is checkpoint_layout.py's job.
"""

import math

from . import flags as flag_table
from . import gaussian_diffusion as gd
from .edm import EDMDiffusion
from .flow import FlowDiffusion
from .flags import NUM_CLASSES, str2bool
from .image_datasets import check_image_channels, image_hw
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "NUM_CLASSES", "str2bool", "model_and_diffusion_defaults", "sr_model_and_diffusion_defaults",
    "diffusion_defaults", "classifier_defaults", "classifier_and_diffusion_defaults", "create_model_and_diffusion",
    "create_model", "sr_create_model_and_diffusion", "sr_create_model", "create_gaussian_diffusion",
    "create_classifier", "create_classifier_and_diffusion", "model_from_flags", "diffusion_from_flags",
    "has_null_label", "add_dict_to_argparser", "args_to_dict", "default_channel_mult", "parse_channel_mult",
    "parse_attention_resolutions", "format_numbers", "image_size_hw", "DEFAULT_CHANNEL_MULT", "SR_DEFAULT_CHANNEL_MULT",
]

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

# ---------------------------------------------------------------- defaults


def model_and_diffusion_defaults():
    """The model and diffusion flags of image_train.py / image_sample.py and their defaults."""
    return flag_table.defaults(flag_table.MODEL_AND_DIFFUSION)


def sr_model_and_diffusion_defaults():
    """The super-resolution flags: the model defaults with large_size and small_size
    in place of image_size, and no sigma_small."""
    return flag_table.defaults(flag_table.SR_MODEL_AND_DIFFUSION)


def diffusion_defaults():
    """The diffusion flags among model_and_diffusion_defaults() (guided-diffusion's name)."""
    return flag_table.defaults(flag_table.DIFFUSION)


def classifier_defaults():
    """The flags of guided-diffusion's noisy classifier (create_classifier) and their defaults."""
    return flag_table.defaults(flag_table.CLASSIFIER)


def classifier_and_diffusion_defaults():
    """classifier_defaults() and diffusion_defaults() together."""
    return flag_table.defaults(flag_table.CLASSIFIER + flag_table.DIFFUSION)


# ---------------------------------------------------------------- levels and attention


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


def image_size_hw(image_size):
    """
    (H, W) of an --image_size: S (square), "H,W" (as the flag parses a
    rectangle) or a pair.
    """
    if isinstance(image_size, int):
        return image_size, image_size  # a bad square size is for default_channel_mult to name
    if isinstance(image_size, str):
        image_size = _parse_ints(image_size, "image_size", 'a size S or "H,W" such as "8,16"')
        image_size = image_size[0] if len(image_size) == 1 else image_size
    return image_hw(image_size)


def parse_channel_mult(channel_mult, image_size, size_flag="image_size"):
    """
    The width multipliers of each level as a tuple of numbers (ints, or floats
    for fractions such as 0.5; level l is int(num_channels * mult[l]) wide).

    :param channel_mult: "" (the default for the image's shorter side), a
                         string such as "1,2,2,2" or "0.5,1,1,2,2,4,4", or a sequence of numbers.
    :param image_size: S, "H,W" or (H, W): each side must halve once per level below the first.
    :param size_flag: the flag naming the image size, for error messages
                      ("large_size": a super-resolution model's defaults).
    """
    height, width = image_size_hw(image_size)
    if channel_mult in ("", None):
        side = min(height, width)
        if height != width and not (_is_power_of_two(side) and side >= 8):
            low, high = 2 ** max(3, side.bit_length() - 1), 2 ** max(3, side.bit_length())
            raise ValueError(
                f"--{size_flag} {height},{width}: the default levels follow the shorter side, {side}, which must "
                f"be a power of two >= 8: use --channel_mult, or a shorter side of {low} or {high}"
            )
        mult = default_channel_mult(side, super_res=size_flag == "large_size")
    else:
        mult = _parse_numbers(channel_mult, "channel_mult", 'a comma-separated list such as "1,2,2,2"')
        if not mult or min(mult) <= 0:
            raise ValueError(
                f"--channel_mult {format_numbers(channel_mult)} is invalid: give positive "
                f'numbers such as "1,2,2,2" or "0.5,1,1,2"'
            )
    factor = 2 ** (len(mult) - 1)
    if height % factor or width % factor:
        shown = str(height) if height == width else f"{height},{width}"
        nearest = _nearest_sizes(height, width, factor)
        raise ValueError(
            f"--{size_flag} {shown} cannot be halved {len(mult) - 1} times as the "
            f"{len(mult)} levels of --channel_mult {format_numbers(mult)} need: use a size "
            f"divisible by {factor} (the nearest: {' or '.join(nearest)}) or fewer levels"
        )
    return mult


def _nearest_sizes(height, width, factor):
    """The sizes nearest to H x W whose sides are multiples of `factor` (each side rounded down and up)."""
    sides = [sorted({max(factor, side // factor * factor), -(-side // factor) * factor}) for side in (height, width)]
    sizes = sorted({(h, w) for h in sides[0] for w in sides[1]}, key=lambda hw: (abs(hw[0] - height) + abs(hw[1] - width), hw))
    return [str(h) if h == w and height == width else f"{h},{w}" for h, w in sizes[:2]]


def parse_attention_resolutions(attention_resolutions, image_size):
    """
    Downsampling factors with attention: "16,8" -> (S // 16, S // 8) for the
    shorter side S of `image_size` (S, "H,W" or (H, W)). "" means no attention
    blocks on the way down or up (the middle block always has one).
    """
    if attention_resolutions in ("", None):
        return ()
    resolutions = _parse_ints(
        attention_resolutions, "attention_resolutions", 'resolutions such as "16,8" (or "" for none)'
    )
    if min(resolutions) < 1:
        raise ValueError(f"--attention_resolutions {attention_resolutions} must be positive")
    side = min(image_size_hw(image_size))
    return tuple(side // res for res in resolutions)


# ---------------------------------------------------------------- factories


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
    null_label=None,
    objective="ddpm",
    continuous_timesteps=False,
    sigma_data=0.5,
    sigma_min=0.002,
    sigma_max=80.0,
    P_mean=-1.2,
    P_std=1.2,
    logit_mean=0.0,
    logit_std=1.0,
    time_sampling="logit_normal",
):
    """(UNetModel, process) from the flags of model_and_diffusion_defaults() (null_label: has_null_label;
    the process: diffusion_from_flags)."""
    flags = dict(locals())
    return model_from_flags(flags), diffusion_from_flags(flags)


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
    null_label=None,
):
    """A UNetModel for image_channels-channel images of size image_size (twice the output channels with learn_sigma)."""
    return model_from_flags(dict(locals()))


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
    null_label=None,
    objective="ddpm",
    continuous_timesteps=False,
    sigma_data=0.5,
    sigma_min=0.002,
    sigma_max=80.0,
    P_mean=-1.2,
    P_std=1.2,
    logit_mean=0.0,
    logit_std=1.0,
    time_sampling="logit_normal",
):
    """(SuperResModel, process) from the flags of sr_model_and_diffusion_defaults() (the process:
    diffusion_from_flags)."""
    flags = dict(locals())
    return model_from_flags(flags), diffusion_from_flags(flags)


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
    null_label=None,
):
    """A SuperResModel producing large_size images; levels and attention follow large_size."""
    return model_from_flags(dict(locals()))


def has_null_label(flags):
    """
    Whether the model of a flag dict has the null label of classifier-free
    guidance: --null_label when given (not None), else, for flags written
    before that flag existed, whether it was trained with class dropout.
    """
    null_label = flags.get("null_label")
    return flags.get("class_dropout_prob", 0.0) > 0 if null_label is None else bool(null_label)


def model_from_flags(flags):
    """
    The network of a flag dict: a SuperResModel when it has large_size (the
    flags of sr_model_and_diffusion_defaults()), else a UNetModel
    (model_and_diffusion_defaults()); null_label as has_null_label says.
    """
    if "large_size" in flags:
        if flags["small_size"] > flags["large_size"]:
            raise ValueError(f"--small_size {flags['small_size']} must not exceed --large_size {flags['large_size']}")
        cls, size_flag = SuperResModel, "large_size"
    else:
        cls, size_flag = UNetModel, "image_size"
    size, channels, class_cond = flags[size_flag], flags["image_channels"], flags["class_cond"]
    num_classes, dropout_prob, null_label = flags["num_classes"], flags["class_dropout_prob"], has_null_label(flags)
    check_image_channels(channels)
    if class_cond and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"--num_classes {num_classes} must be a positive integer with --class_cond True")
    if not 0 <= dropout_prob < 1 or (dropout_prob > 0 and not (class_cond and null_label)):
        raise ValueError(
            f"--class_dropout_prob {dropout_prob} must lie in [0, 1), and above 0 only with --class_cond True "
            "and --null_label True (it trains the null label of classifier-free guidance)"
        )
    if null_label and not class_cond:
        raise ValueError("--null_label True needs --class_cond True: the null label is one more class label")
    return cls(
        in_channels=channels,
        model_channels=flags["num_channels"],
        out_channels=channels * (2 if flags["learn_sigma"] else 1),
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=parse_attention_resolutions(flags["attention_resolutions"], size),
        dropout=flags["dropout"],
        channel_mult=parse_channel_mult(flags["channel_mult"], size, size_flag),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=flags["use_checkpoint"],
        num_heads=flags["num_heads"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        num_head_channels=flags["num_head_channels"],
        resblock_updown=flags["resblock_updown"],
        use_new_attention_order=flags["use_new_attention_order"],
        use_fp16=flags["use_fp16"],
        image_size=size if isinstance(size, int) else image_size_hw(size),
        null_label=null_label,
    )


def diffusion_from_flags(flags):
    """
    The noise process of a flag dict, by --objective (absent flags take their
    defaults): "ddpm", create_gaussian_diffusion (its diffusion_steps is the
    steps); "edm", an EDMDiffusion; "flow", a FlowDiffusion. The EDM and flow
    processes sample over the nodes --timestep_respacing names by default.
    """
    objective = flags.get("objective", flag_table.DDPM)
    if objective not in flag_table.OBJECTIVES:
        raise ValueError(f"--objective {objective!r} is unknown: use one of {', '.join(flag_table.OBJECTIVES)}")
    values = {name: flags.get(name, flag.default) for name, flag in flag_table.FLAGS.items()}
    if objective != flag_table.DDPM and values["learn_sigma"]:
        raise ValueError(
            f"--learn_sigma True: the {objective} objective learns no variance (its network outputs the data's "
            "channels); drop --learn_sigma"
        )
    if objective == flag_table.EDM:
        return EDMDiffusion(
            sigma_data=values["sigma_data"], sigma_min=values["sigma_min"], sigma_max=values["sigma_max"],
            P_mean=values["P_mean"], P_std=values["P_std"], timestep_respacing=values["timestep_respacing"],
        )
    if objective == flag_table.FLOW:
        return FlowDiffusion(
            logit_mean=values["logit_mean"], logit_std=values["logit_std"], time_sampling=values["time_sampling"],
            timestep_respacing=values["timestep_respacing"],
        )
    arguments = {name: values[name] for name in flag_table.DIFFUSION}
    return create_gaussian_diffusion(
        steps=arguments.pop("diffusion_steps"), continuous_timesteps=values["continuous_timesteps"], **arguments
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
    continuous_timesteps=False,
):
    """
    A SpacedDiffusion over the retained steps of `timestep_respacing` ("" keeps
    all, continuous_timesteps or not; else with continuous_timesteps the exact
    fractional timesteps of its spelling: respace.space_timesteps).

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
    continuous_timesteps = bool(continuous_timesteps and timestep_respacing)
    return SpacedDiffusion(
        use_timesteps=space_timesteps(
            steps, timestep_respacing or [steps], betas=betas, continuous_timesteps=continuous_timesteps
        ),
        continuous_timesteps=continuous_timesteps,
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        snr_gamma=snr_gamma,
    )


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
    classifier = create_classifier(
        image_size, classifier_use_fp16, classifier_width, classifier_depth, classifier_attention_resolutions,
        classifier_use_scale_shift_norm, classifier_resblock_updown, classifier_pool, num_classes, image_channels,
    )
    diffusion = diffusion_from_flags(dict(
        more_diffusion_flags, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps,
        noise_schedule=noise_schedule, timestep_respacing=timestep_respacing, use_kl=use_kl,
        predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
    ))
    return classifier, diffusion


# ---------------------------------------------------------------- argparse helpers of the reference


def add_dict_to_argparser(parser, default_dict):
    """Add a --key flag per entry, typed by its default (booleans through str2bool)."""
    for key, value in default_dict.items():
        parser.add_argument(f"--{key}", default=value, type=flag_table.type_of(value))


def args_to_dict(args, keys):
    """{key: args.key} for each key."""
    return {k: getattr(args, k) for k in keys}


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


def format_numbers(values):
    """(1, 2, 2) or "1,2,2" -> "1,2,2"; (0.5, 1) -> "0.5,1" (how channel_mult is written)."""
    if isinstance(values, str):
        return values
    return ",".join(str(v) for v in values)
