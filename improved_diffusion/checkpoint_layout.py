"""
What a checkpoint's weights say about the flags that built them: reading the
layout of UNet weights back into flags (`infer_model_flags`), loading weights
strictly with an error that names each flag to fix (`load_model_state_dict`),
and the flags of guided-diffusion's published checkpoints
(GUIDED_DIFFUSION_CHECKPOINTS, whose layouts the errors recognize).
"""

from . import flags as flag_table
from .script_util import (
    default_channel_mult,
    format_numbers,
    has_null_label,
    parse_attention_resolutions,
    parse_channel_mult,
)
from .unet import SuperResModel

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
    names = flag_table.SR_MODEL_AND_DIFFUSION if "--large_size" in argv else flag_table.MODEL_AND_DIFFUSION
    parsed, _ = flag_table.parse_with([flag_table.FLAGS[n] for n in names], argv)
    return {name: getattr(parsed, name) for name in names}


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
        # One more label embedding with the null label.
        "num_classes": flags["num_classes"] + has_null_label(flags) if flags["class_cond"] else None,
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
        "channel_mult": format_numbers(layout["channel_mult"]),
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
        with_null = model.null_label is not None
        found["num_classes"] = layout["num_classes"] - with_null
        if not with_null and layout["num_classes"] == flags["num_classes"] + 1:
            del found["num_classes"]
            null_problem = [
                f"--null_label False (the weights have {layout['num_classes']} label embeddings: "
                f"{flags['num_classes']} classes and a null label; give --null_label True)"
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
        return [_say("channel_mult", given_mult, format_numbers(layout["channel_mult"]))]
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
