"""
Flags and factories: defaults, the published configurations' state-dict
listings, channel_mult and attention rules, the diffusion factory, argparse
helpers, reading flags back from weights and loading with flag diagnostics.
"""

import argparse

import pytest
import torch

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion import checkpoint_layout as layout
from improved_diffusion import script_util as su
from improved_diffusion.unet import AttentionBlock, SuperResModel

REFERENCE_DEFAULTS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "sigma_small": False,
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True,
}
MODEL_FLAGS = (
    "num_channels", "num_res_blocks", "learn_sigma", "class_cond", "use_checkpoint",
    "attention_resolutions", "num_heads", "num_heads_upsample", "use_scale_shift_norm",
    "dropout", "channel_mult", "num_classes",
)
TINY = {"num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8"}


def parse_flags(argv, super_res=False):
    """The full flag dict that image (or super-resolution) scripts would parse from argv."""
    defaults = su.sr_model_and_diffusion_defaults() if super_res else su.model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    return su.args_to_dict(parser.parse_args(argv), defaults.keys())


def build(flags):
    """The model of a flag dict (super-resolution when it has large_size)."""
    if "large_size" in flags:
        return su.sr_create_model(flags["large_size"], flags["small_size"], **{k: flags[k] for k in MODEL_FLAGS})
    return su.create_model(flags["image_size"], **{k: flags[k] for k in MODEL_FLAGS})


def tiny_flags(**overrides):
    return dict(su.model_and_diffusion_defaults(), image_size=16, **TINY) | overrides


def released_listings(golden_dir):
    """(flags, parameter count, "name (shape)" lines) of each published configuration."""
    for path in sorted((golden_dir / "unet_keys").glob("*.txt")):
        first, second, *lines = path.read_text().strip().split("\n")
        argv = first.removeprefix("# flags:").split()
        yield path.stem, parse_flags(argv, "--large_size" in argv), int(second.split(":")[1]), lines


def test_released_configurations_have_the_reference_state_dicts(golden_dir):
    listings = list(released_listings(golden_dir))
    assert len(listings) == 5
    for name, flags, count, lines in listings:
        with torch.device("meta"):
            model = build(flags)
        assert [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()] == lines, name
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_infer_model_flags_of_released_configurations(golden_dir):
    for name, flags, _, _ in released_listings(golden_dir):
        with torch.device("meta"):
            inferred = layout.infer_model_flags(build(flags).state_dict())
        size_flag = "large_size" if "large_size" in flags else "image_size"
        for key in ("num_channels", "num_res_blocks", "learn_sigma", "class_cond",
                    "use_scale_shift_norm", "attention_resolutions", size_flag):
            assert inferred[key] == flags[key], (name, key)
        assert inferred.get("num_classes") == (1000 if flags["class_cond"] else None)


# SPEC 15's objectives, off by default.
OBJECTIVE_DEFAULTS = dict(predict_v=False, snr_gamma=0.0, rescale_zero_terminal_snr=False)
# SPEC 13's guided-diffusion options, off by default.
GUIDED_DEFAULTS = dict(num_head_channels=-1, resblock_updown=False, use_new_attention_order=False, use_fp16=False)


def test_defaults():
    new = dict(channel_mult="", num_classes=1000, class_dropout_prob=0.0, image_channels=3, **OBJECTIVE_DEFAULTS,
               **GUIDED_DEFAULTS)
    assert su.model_and_diffusion_defaults() == dict(REFERENCE_DEFAULTS, **new)
    expected_sr = dict(REFERENCE_DEFAULTS, large_size=256, small_size=64, **new)
    del expected_sr["image_size"], expected_sr["sigma_small"]
    assert su.sr_model_and_diffusion_defaults() == expected_sr
    assert su.NUM_CLASSES == 1000


@pytest.mark.parametrize("size, mult", [
    (8, (1, 2)), (16, (1, 2, 2)), (32, (1, 2, 2, 2)), (64, (1, 2, 3, 4)),
    (128, (1, 1, 2, 3, 4)), (256, (1, 1, 2, 2, 4, 4)), (512, (0.5, 1, 1, 2, 2, 4, 4)),
    (1024, (0.5, 0.5, 1, 1, 2, 2, 4, 4)),
])
def test_default_channel_mult(size, mult):
    assert su.default_channel_mult(size) == mult


def test_super_resolution_default_channel_mult_at_512():
    assert su.default_channel_mult(512, super_res=True) == (1, 1, 2, 2, 4, 4)
    assert su.default_channel_mult(256, super_res=True) == su.default_channel_mult(256)


def test_fractional_channel_mult():
    model = build(tiny_flags(num_channels=64, channel_mult="0.5,1,1.5"))
    assert model.channel_mult == (0.5, 1, 1.5)
    assert [model.input_blocks[i][0].out_channels for i in (1, 3, 5)] == [32, 64, 96]
    assert model.input_blocks[0][0].out_channels == model.out[2].in_channels == 32


@pytest.mark.parametrize("size", [0, 4, 48, 100, 300])
def test_unsupported_image_size(size):
    with pytest.raises(ValueError, match=f"unsupported image size {size}: use a power of two >= 8.*--channel_mult"):
        build(tiny_flags(image_size=size))


def test_channel_mult_flag_overrides_the_size_default():
    model = build(tiny_flags(image_size=48, channel_mult="1,3,2"))
    assert model.channel_mult == (1, 3, 2)
    assert model.input_blocks[-1][0].out_channels == 64


@pytest.mark.parametrize("value, message", [
    ("1,a", "is not a comma-separated list"),
    ("1,,2", "is not a comma-separated list"),
    ("0,1", "give positive numbers"),
    ("1,nan", "is not a comma-separated list"),
    ("1,2,2,2,2,2", "--image_size 16 cannot be halved 5 times"),
])
def test_bad_channel_mult(value, message):
    with pytest.raises(ValueError) as info:
        build(tiny_flags(channel_mult=value))
    assert "--channel_mult" in str(info.value) and message in str(info.value)


def test_bad_attention_resolutions():
    with pytest.raises(ValueError, match="--attention_resolutions '16;8' is not"):
        build(tiny_flags(attention_resolutions="16;8"))


def _attention_blocks(model):
    return [m for m in model.modules() if isinstance(m, AttentionBlock)]


def test_attention_resolutions():
    model = build(tiny_flags(image_size=32, attention_resolutions="16,8", channel_mult="1,2,2,2"))
    assert model.attention_resolutions == (2, 4)
    # down: 1 per block at two levels, middle: 1, up: 2 per level at two levels
    assert len(_attention_blocks(model)) == 2 + 1 + 4
    assert len(_attention_blocks(build(tiny_flags(attention_resolutions="")))) == 1  # the middle block's


def test_num_classes_flag():
    model = build(tiny_flags(class_cond=True, num_classes=10))
    assert model.label_emb.weight.shape == (10, 128)
    assert not hasattr(build(tiny_flags(num_classes=10)), "label_emb")
    with pytest.raises(ValueError, match="--num_classes 0 must be a positive integer"):
        build(tiny_flags(class_cond=True, num_classes=0))


def test_learn_sigma_doubles_the_output_channels():
    assert build(tiny_flags(learn_sigma=True)).out_channels == 6
    assert build(tiny_flags()).out_channels == 3


def test_reference_call_signatures_still_work():
    """Calls written against the reference: positional create_model, no new flags."""
    model = su.create_model(16, 32, 1, False, False, False, "8", 2, -1, True, 0.0)
    assert model.channel_mult == (1, 2, 2)
    sr = su.sr_create_model(32, 16, 32, 1, True, False, False, "8", 2, -1, True, 0.0)
    assert isinstance(sr, SuperResModel) and sr.in_channels == 6
    flags = dict(REFERENCE_DEFAULTS, image_size=16, **TINY)
    model, diffusion = su.create_model_and_diffusion(**flags)
    assert diffusion.num_timesteps == 1000


def test_small_size_larger_than_large_size():
    flags = dict(su.sr_model_and_diffusion_defaults(), large_size=32, small_size=64, **TINY)
    with pytest.raises(ValueError, match="--small_size 64 must not exceed --large_size 32"):
        su.sr_create_model_and_diffusion(**flags)


@pytest.mark.parametrize("kwargs, mean, var, loss", [
    ({}, "EPSILON", "FIXED_LARGE", "MSE"),
    ({"sigma_small": True}, "EPSILON", "FIXED_SMALL", "MSE"),
    ({"learn_sigma": True, "rescale_learned_sigmas": True}, "EPSILON", "LEARNED_RANGE", "RESCALED_MSE"),
    ({"use_kl": True, "predict_xstart": True}, "START_X", "FIXED_LARGE", "RESCALED_KL"),
])
def test_create_gaussian_diffusion_types(kwargs, mean, var, loss):
    diffusion = su.create_gaussian_diffusion(steps=100, **kwargs)
    assert diffusion.model_mean_type is gd.ModelMeanType[mean]
    assert diffusion.model_var_type is gd.ModelVarType[var]
    assert diffusion.loss_type is gd.LossType[loss]


def test_create_gaussian_diffusion_respacing():
    diffusion = su.create_gaussian_diffusion(steps=100, timestep_respacing="ddim10", rescale_timesteps=True)
    assert diffusion.num_timesteps == 10
    assert list(diffusion.timestep_map) == list(range(0, 100, 10))
    assert su.create_gaussian_diffusion(steps=50).num_timesteps == 50


def test_create_gaussian_diffusion_golden(golden_dir):
    cases = [c for c in torch.load(golden_dir / "diffusion_cases.pt", weights_only=True) if c["kind"] == "flags"]
    assert cases
    for case in cases:
        diffusion = su.create_gaussian_diffusion(**case["flags"])
        expected = case["expected"]
        assert diffusion.model_mean_type.name == expected["mean_type"]
        assert diffusion.model_var_type.name == expected["var_type"]
        assert diffusion.loss_type.name == expected["loss_type"]
        assert diffusion.num_timesteps == expected["num_timesteps"]
        assert list(diffusion.timestep_map) == list(expected["timestep_map"])
        torch.testing.assert_close(torch.as_tensor(diffusion.betas), torch.as_tensor(expected["betas"]))


@pytest.mark.parametrize("text, value", [
    ("yes", True), ("True", True), ("t", True), ("Y", True), ("1", True),
    ("no", False), ("FALSE", False), ("f", False), ("n", False), ("0", False),
])
def test_str2bool(text, value):
    assert su.str2bool(text) is value
    assert su.str2bool(value) is value


def test_str2bool_rejects_and_lists_accepted_values():
    with pytest.raises(argparse.ArgumentTypeError, match="'maybe'.*yes/true/t/y/1.*no/false/f/n/0"):
        su.str2bool("maybe")


def test_argparser_types_flags_by_their_defaults():
    flags = parse_flags(["--image_size", "32", "--learn_sigma", "yes", "--dropout", "0.1",
                         "--attention_resolutions", "16", "--channel_mult", "1,2"])
    assert flags == dict(su.model_and_diffusion_defaults(), image_size=32, learn_sigma=True,
                         dropout=0.1, attention_resolutions="16", channel_mult="1,2")
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, {"path": None})
    assert parser.parse_args(["--path", "x"]).path == "x"


def test_infer_model_flags_of_a_custom_model():
    flags = tiny_flags(image_size=48, channel_mult="1,3", num_res_blocks=2, class_cond=True,
                       num_classes=7, learn_sigma=True, use_scale_shift_norm=False)
    inferred = layout.infer_model_flags(build(flags).state_dict())
    assert inferred == {"num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,3", "class_cond": True,
                        "num_classes": 7, "learn_sigma": True, "use_scale_shift_norm": False,
                        "resblock_updown": False, "image_channels": 3}


def _load_error(weights_flags, model_flags):
    model = build(model_flags)
    with pytest.raises(ValueError) as info:
        layout.load_model_state_dict(model, build(weights_flags).state_dict(), model_flags, source="w.pt")
    return str(info.value)


@pytest.mark.parametrize("change, line", [
    ({"num_channels": 64}, "--num_channels 64 (the weights say 32)"),
    ({"num_res_blocks": 2}, "--num_res_blocks 2 (the weights say 1)"),
    ({"learn_sigma": True}, "--learn_sigma True (the weights say False)"),
    ({"class_cond": True}, "--class_cond True (the weights say False)"),
    ({"use_scale_shift_norm": False}, "--use_scale_shift_norm False (the weights say True)"),
    ({"image_size": 32}, "--image_size 32 (the weights say 16)"),
    ({"channel_mult": "1,2"}, '--channel_mult 1,2 (the weights say 1,2,2)'),
    ({"attention_resolutions": "4"}, "--attention_resolutions 4 (the weights say 8)"),
    ({"attention_resolutions": ""}, '--attention_resolutions "" (the weights say 8)'),
])
def test_load_names_each_contradicting_flag(change, line):
    message = _load_error(tiny_flags(), tiny_flags(**change))
    assert message.startswith("w.pt does not fit this model")
    assert line in message


def test_load_names_the_class_count_and_several_flags_at_once():
    weights = tiny_flags(class_cond=True, num_classes=10)
    message = _load_error(weights, tiny_flags(class_cond=True, num_channels=64, learn_sigma=True))
    for line in ("--num_classes 1000 (the weights say 10)", "--num_channels 64 (the weights say 32)",
                 "--learn_sigma True (the weights say False)"):
        assert line in message
    assert "missing" not in message


def test_load_super_resolution_weights_into_an_image_model():
    sr_flags = dict(su.sr_model_and_diffusion_defaults(), large_size=16, small_size=8, **TINY)
    model = build(tiny_flags())
    with pytest.raises(ValueError, match="6 input channels, this model 3: these are super-resolution"):
        layout.load_model_state_dict(model, build(sr_flags).state_dict(), tiny_flags())


def test_load_recognizes_an_optimizer_state():
    model = build(tiny_flags())
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="opt000010.pt is an optimizer state.*not model weights"):
        layout.load_model_state_dict(model, optimizer.state_dict(), tiny_flags(), source="opt000010.pt")
    with pytest.raises(ValueError, match="optimizer state"):
        layout.infer_model_flags(optimizer.state_dict())


def test_load_recognizes_wrapped_weights():
    model = build(tiny_flags())
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="start with 'module.'.*strip that prefix"):
        layout.load_model_state_dict(model, prefixed, tiny_flags())
    with pytest.raises(ValueError, match="does not hold UNet weights.*first keys are model, step"):
        layout.load_model_state_dict(model, {"model": {}, "step": 3}, tiny_flags())


def test_load_summarizes_keys_no_flag_explains():
    model = build(tiny_flags())
    state = dict(model.state_dict(), extra=torch.zeros(1))
    del state["out.2.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys: out.2.bias\n  1 unexpected keys: extra"):
        layout.load_model_state_dict(model, state, tiny_flags())


def test_load_fitting_weights_with_partial_flags():
    weights = build(tiny_flags(learn_sigma=True)).state_dict()
    model = build(tiny_flags(learn_sigma=True))
    assert layout.load_model_state_dict(model, weights, {}) is model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))


def test_objective_flags_build_the_diffusion_they_name():
    base = dict(steps=100, noise_schedule="linear")
    assert su.create_gaussian_diffusion(**base, predict_v=True).model_mean_type.name == "VELOCITY"
    assert su.create_gaussian_diffusion(**base, snr_gamma=5.0).snr_gamma == 5.0
    zero = su.create_gaussian_diffusion(**base, predict_v=True, rescale_zero_terminal_snr=True)
    assert zero.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("flags, needle", [
    (dict(rescale_zero_terminal_snr=True), "--predict_v True"),
    (dict(predict_v=True, predict_xstart=True), "exclude each other"),
    (dict(use_kl=True, snr_gamma=5.0), "--use_kl"),
])
def test_objective_flags_that_cannot_work_are_errors(flags, needle):
    with pytest.raises(ValueError, match=needle):
        su.create_gaussian_diffusion(steps=100, **flags)


def test_class_dropout_adds_the_null_label_embedding():
    plain = su.create_model_and_diffusion(**tiny_flags(class_cond=True, num_classes=10))[0]
    guided = su.create_model_and_diffusion(**tiny_flags(class_cond=True, num_classes=10, class_dropout_prob=0.1))[0]
    assert plain.label_emb.num_embeddings == 10 and plain.null_label is None
    assert guided.label_emb.num_embeddings == 11 and guided.null_label == 10 and guided.num_classes == 10


@pytest.mark.parametrize("flags", [dict(class_dropout_prob=0.1), dict(class_cond=True, class_dropout_prob=1.0)])
def test_class_dropout_needs_labels_and_a_probability_below_one(flags):
    with pytest.raises(ValueError, match="--class_dropout_prob"):
        su.create_model_and_diffusion(**tiny_flags(**flags))


def test_weights_with_a_null_label_name_the_null_label_flag_when_loaded_without_it():
    flags = tiny_flags(class_cond=True, num_classes=10)
    weights = su.create_model_and_diffusion(**dict(flags, class_dropout_prob=0.1))[0].state_dict()
    model = su.create_model_and_diffusion(**flags)[0]
    with pytest.raises(ValueError, match="--null_label False .*null label.*give --null_label True"):
        layout.load_model_state_dict(model, weights, flags)
    guided = su.create_model_and_diffusion(**dict(flags, class_dropout_prob=0.1))[0]
    layout.load_model_state_dict(guided, weights, dict(flags, class_dropout_prob=0.1))
