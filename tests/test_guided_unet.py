"""
The guided-diffusion (ADM) options of UNetModel and SuperResModel: the
published checkpoints' state-dict layouts, outputs against guided-diffusion's
golden cases and this repository's regression data, gradient checkpointing
and autocast through the new blocks, the flag diagnostics for guided-diffusion
weights, and a tiny ADM-style model trained, resumed and sampled by the scripts.

`python tests/test_guided_unet.py` rewrites tests/data/guided_unet_keys.json
(from ../shared/golden/guided/keys) and tests/data/guided_unet_regression.pt
(from the current implementation; do it only for an intended change of outputs).
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import pytest
import torch
from _train_helpers import TINY_MODEL, assert_same_files, run_script, set_names, write_images
from test_benchmarks import run_benchmark
from test_unet import _loss_and_grads, _saved_bytes, deterministic_fill, relative_error

from improved_diffusion import checkpoint_layout as layout
from improved_diffusion import script_util as su
from improved_diffusion.run_flags import FLAGS_FILENAME
from improved_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
from make_released_key_digests import listing_digest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
KEYS_FILE = DATA / "guided_unet_keys.json"
REGRESSION_FILE = DATA / "guided_unet_regression.pt"
GOLDEN_KEYS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "guided" / "keys"

# Tiny ADM-style configurations for the regression data: constructor keyword arguments.
ADM = {
    "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1, "attention_resolutions": (2,),
    "channel_mult": (1, 2), "use_scale_shift_norm": True, "resblock_updown": True, "num_head_channels": 16,
    "use_new_attention_order": True,
}
REGRESSION_CONFIGS = {
    "adm_new_order": dict(ADM, num_classes=5),
    "adm_legacy_fractional": dict(
        ADM, model_channels=64, out_channels=3, channel_mult=(0.5, 1, 2), attention_resolutions=(2, 4),
        num_head_channels=-1, num_heads=2, use_new_attention_order=False, use_scale_shift_norm=False,
    ),
    "adm_super_res": dict(ADM, num_head_channels=8, cls="SuperResModel"),
    "classifier_attention_pool": dict(ADM, image_size=16, out_channels=10, pool="attention", cls="EncoderUNetModel"),
    "classifier_spatial_v2_pool": dict(
        ADM, image_size=16, out_channels=10, pool="spatial_v2", resblock_updown=False, cls="EncoderUNetModel",
    ),
}
CLASSES = {"UNetModel": UNetModel, "SuperResModel": SuperResModel, "EncoderUNetModel": EncoderUNetModel}


def listing(model):
    return [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]


def parse_guided_flags(argv):
    """This library's full flag dict for a command line of guided-diffusion's flags."""
    if "--classifier_width" in argv:
        defaults = su.classifier_and_diffusion_defaults()
    elif "--large_size" in argv:
        defaults = su.sr_model_and_diffusion_defaults()
    else:
        defaults = su.model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    return vars(parser.parse_args(argv))


def build_from_flags(flags):
    """The model of a full flag dict: a classifier, a super-resolution model (large_size) or a UNet."""
    if "classifier_width" in flags:
        return su.create_classifier_and_diffusion(**flags)[0]
    create = su.sr_create_model_and_diffusion if "large_size" in flags else su.create_model_and_diffusion
    return create(**flags)[0]


def read_listing(path):
    """(flags, parameter count, "name (shape)" lines) of a golden listing."""
    first, second, *lines = path.read_text().strip().split("\n")
    return first.removeprefix("# flags:").split(), int(second.split(":")[1]), lines


def test_published_layouts_match_the_golden_listings(golden_dir):
    paths = sorted((golden_dir / "guided" / "keys").glob("*.txt"))
    assert len(paths) == 12
    for path in paths:
        argv, count, lines = read_listing(path)
        with torch.device("meta"):
            model = build_from_flags(parse_guided_flags(argv))
        assert listing(model) == lines, path.stem
        assert sum(p.numel() for p in model.parameters()) == count, path.stem


def test_published_layouts_match_the_listing_digests():
    digests = json.loads(KEYS_FILE.read_text())
    assert len(digests) == 12
    for name, expected in digests.items():
        with torch.device("meta"):
            model = build_from_flags(parse_guided_flags(expected["flags"]))
        lines = listing(model)
        assert len(lines) == expected["keys"], name
        assert listing_digest(lines) == expected["sha256"], name
        assert sum(p.numel() for p in model.parameters()) == expected["parameters"], name


def test_the_checkpoint_table_builds_every_published_layout():
    digests = json.loads(KEYS_FILE.read_text())
    layouts = {d["sha256"] for d in digests.values()}
    for name in layout.GUIDED_DIFFUSION_CHECKPOINTS:
        with torch.device("meta"):
            model = build_from_flags(layout.guided_checkpoint_flags(name))
        assert listing_digest(listing(model)) in layouts, name


@pytest.fixture(scope="module")
def guided_cases(golden_dir):
    cases = torch.load(golden_dir / "guided" / "cases.pt", weights_only=True)
    return [c for c in cases if c["kind"] in GOLDEN_DEFAULTS]


GOLDEN_DEFAULTS = {
    "gd_unet": su.model_and_diffusion_defaults,
    "gd_sr": su.sr_model_and_diffusion_defaults,
    "gd_classifier": su.classifier_and_diffusion_defaults,
}


def test_golden_forward_cases(guided_cases):
    assert sorted(c["kind"] for c in guided_cases) == ["gd_classifier"] * 2 + ["gd_sr"] + ["gd_unet"] * 2
    for case in guided_cases:
        model = build_from_flags(dict(GOLDEN_DEFAULTS[case["kind"]](), **case["flags"]))
        model.load_state_dict(case["state_dict"], strict=True)
        assert "\n".join(listing(model)) == case["keys"].strip()
        assert sum(p.numel() for p in model.parameters()) == case["num_params"]
        with torch.no_grad():
            out = model.eval()(case["x"], case["timesteps"], **case["kwargs"])
        assert out.shape == case["expected"].shape
        assert relative_error(out, case["expected"]) < 2e-4


def build_regression_case(name):
    """(model, x, timesteps, model_kwargs) of a REGRESSION_CONFIGS entry."""
    config = dict(REGRESSION_CONFIGS[name])
    cls = CLASSES[config.pop("cls", "UNetModel")]
    model = deterministic_fill(cls(**config)).eval()
    x = torch.sin(torch.arange(2 * 3 * 16 * 16, dtype=torch.float64) * 0.37).float().reshape(2, 3, 16, 16)
    kwargs = {}
    if config.get("num_classes"):
        kwargs["y"] = torch.tensor([4, 1])
    if cls is SuperResModel:
        kwargs["low_res"] = torch.cos(torch.arange(2 * 3 * 64, dtype=torch.float64)).float().reshape(2, 3, 8, 8)
    return model, x, torch.tensor([2.5, 640.0]), kwargs


@pytest.mark.parametrize("name", sorted(REGRESSION_CONFIGS))
def test_regression_data(name):
    expected = torch.load(REGRESSION_FILE, weights_only=True)[name]
    model, x, t, kwargs = build_regression_case(name)
    with torch.no_grad():
        out = model(x, t, **kwargs)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 2e-4


def adm_model(**overrides):
    """A tiny ADM-style UNetModel with random weights (zero-initialized layers filled too)."""
    torch.manual_seed(0)
    model = UNetModel(**dict(ADM, out_channels=3, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_resampling_blocks_are_residual_blocks():
    model = adm_model()
    down, up = model.input_blocks[2][0], model.output_blocks[1][-1]
    assert isinstance(down, ResBlock) and isinstance(up, ResBlock)
    emb = torch.randn(2, 128)
    assert down(torch.randn(2, 32, 8, 8), emb).shape == (2, 32, 4, 4)
    assert up(torch.randn(2, 64, 8, 8), emb).shape == (2, 64, 16, 16)


def test_head_width_sets_the_head_count():
    model = adm_model(channel_mult=(1, 2, 2), attention_resolutions=(1, 2))
    heads = {m.channels: m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {32: 2, 64: 4}
    orders = {type(m.attention) for m in model.modules() if isinstance(m, AttentionBlock)}
    assert orders == {QKVAttention}
    legacy = adm_model(use_new_attention_order=False)
    assert {type(m.attention) for m in legacy.modules() if isinstance(m, AttentionBlock)} == {QKVAttentionLegacy}


def test_attention_orders_differ_with_several_heads():
    new, legacy = adm_model(), adm_model(use_new_attention_order=False)
    legacy.load_state_dict(new.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 300.0])
    with torch.no_grad():
        assert relative_error(new(x, t), legacy(x, t)) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = adm_model(dropout=0.2).train()
    ckpt = adm_model(dropout=0.2, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    loss_plain, grads_plain = _loss_and_grads(plain, x, t, seed=3)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, x, t, seed=3)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)
    assert _saved_bytes(ckpt, x.requires_grad_(), t) < 0.5 * _saved_bytes(plain, x, t)


def test_bfloat16_autocast_forward_and_backward():
    model = adm_model(num_classes=4, use_checkpoint=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 900.0]), torch.tensor([0, 3])
    with torch.no_grad():
        expected = model.eval()(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x, t, y)
    assert out.dtype == torch.float32
    assert relative_error(out.detach(), expected) < 0.05
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_convert_to_fp16_covers_the_resampling_blocks():
    model = adm_model().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 50.0])
    with torch.no_grad():
        expected = model(x, t)
        model.convert_to_fp16()
        assert model.input_blocks[2][0].in_layers[2].weight.dtype == torch.float16
        out = model(x, t)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 0.02


def test_use_fp16_keeps_float32_weights():
    model = adm_model(use_fp16=True)
    assert model.use_fp16 and all(p.dtype == torch.float32 for p in model.parameters())


def test_head_width_that_does_not_divide_the_width():
    with pytest.raises(ValueError, match="--num_head_channels 24 does not divide the attention width 64"):
        adm_model(num_head_channels=24)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_classifier_pools_give_logits_and_gradients(pool):
    model = EncoderUNetModel(**dict(ADM, image_size=16, out_channels=7, pool=pool))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = model(x, torch.tensor([1.0, 900.0]))
    assert logits.shape == (2, 7)
    logits.logsumexp(dim=1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not hasattr(model, "label_emb") and len(model.output_blocks) == 0


def test_classifier_errors():
    with pytest.raises(ValueError, match="unknown --classifier_pool 'max': use one of adaptive, attention"):
        EncoderUNetModel(**dict(ADM, image_size=16, out_channels=7, pool="max"))
    with pytest.raises(ValueError, match="attention pooling needs num_head_channels"):
        EncoderUNetModel(**dict(ADM, image_size=16, out_channels=7, pool="attention", num_head_channels=-1))
    model = EncoderUNetModel(**dict(ADM, image_size=16, out_channels=7, pool="attention"))
    with pytest.raises(ValueError, match=r"built for 64 positions, the input has \[16, 16\].*--image_size"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1.0]))


def test_resblock_cannot_resample_both_ways():
    with pytest.raises(ValueError, match="up or down, not both"):
        ResBlock(32, 128, 0.0, up=True, down=True)


def test_count_flops_counts_both_matrix_products():
    class Counter:
        def __init__(self):
            self.total_ops = torch.zeros(1, dtype=torch.float64)

    qkv = torch.randn(2, 3 * 8, 10)
    for cls in (QKVAttention, QKVAttentionLegacy):
        counter = Counter()
        cls.count_flops(counter, (qkv,), cls(2)(qkv))
        assert counter.total_ops.item() == 2 * 2 * 10**2 * 8


def test_infer_model_flags_of_published_layouts():
    for name in ("64x64_diffusion.pt", "512x512_diffusion.pt", "64_256_upsampler.pt"):
        flags = layout.guided_checkpoint_flags(name)
        with torch.device("meta"):
            inferred = layout.infer_model_flags(build_from_flags(flags).state_dict())
        size_flag = "large_size" if "large_size" in flags else "image_size"
        for key in ("num_channels", "num_res_blocks", "resblock_updown", "class_cond", "learn_sigma",
                    "attention_resolutions", size_flag):
            assert inferred[key] == flags[key], (name, key)


def test_infer_model_flags_of_a_fractional_custom_model():
    model = adm_model(model_channels=64, channel_mult=(0.5, 1, 3), resblock_updown=False)
    inferred = layout.infer_model_flags(model.state_dict())
    assert inferred["channel_mult"] == "0.5,1,3" and inferred["resblock_updown"] is False
    assert inferred["num_res_blocks"] == 1


def test_guided_weights_with_improved_diffusion_flags_name_the_flags_to_fix():
    published = layout.guided_checkpoint_flags("64x64_diffusion.pt")
    with torch.device("meta"):
        weights = build_from_flags(published).state_dict()
    given = dict(published, resblock_updown=False, num_head_channels=-1, use_new_attention_order=False)
    with torch.device("meta"):
        model = build_from_flags(given)
    with pytest.raises(ValueError) as info:
        layout.load_model_state_dict(model, weights, given, source="64x64_diffusion.pt")
    message = str(info.value)
    assert "--resblock_updown False (the weights say True)" in message
    assert "--num_head_channels -1 (guided-diffusion's 64x64_diffusion.pt uses 64" in message
    assert "--use_new_attention_order False (guided-diffusion's 64x64_diffusion.pt uses True" in message
    assert layout.GUIDED_DIFFUSION_CHECKPOINTS["64x64_diffusion.pt"] in message


# A tiny ADM-style model for the scripts: residual resampling, new attention order, 16-channel heads.
ADM_SCRIPT_MODEL = dict(
    TINY_MODEL, attention_resolutions="4", num_head_channels=16, resblock_updown=True,
    use_new_attention_order=True, class_cond=True, num_classes=2, dropout=0.1,
)


def test_adm_model_trains_resumes_exactly_and_samples_through_the_scripts(tmp_path):
    images = write_images(tmp_path / "images", 4)
    images.joinpath("img_0.png").rename(images / "b_0.png")
    flags = dict(ADM_SCRIPT_MODEL, data_dir=images, batch_size=2, save_interval=2, log_interval=2, lr=1e-3)
    for run, extra in (("whole", {"max_steps": 4}), ("parts", {"max_steps": 2})):
        code, _, err = run_script("image_train.py", dict(flags, **extra), tmp_path / run)
        assert code == 0, err
    resume = {"max_steps": 4, "resume_checkpoint": tmp_path / "parts" / "model000002.pt"}
    code, _, err = run_script("image_train.py", dict(flags, **resume), tmp_path / "resumed")
    assert code == 0, err
    assert_same_files(tmp_path / "whole", tmp_path / "resumed", set_names(4))
    saved = json.loads((tmp_path / "whole" / FLAGS_FILENAME).read_text())
    for key in ("num_head_channels", "resblock_updown", "use_new_attention_order", "use_fp16"):
        assert saved[key] == ADM_SCRIPT_MODEL.get(key, False), key
    sample_flags = {"model_path": tmp_path / "whole" / "model000004.pt", "num_samples": 2, "batch_size": 2,
                    "use_ddim": True, "timestep_respacing": "ddim4", "seed": 0}
    code, _, err = run_script("image_sample.py", sample_flags, tmp_path / "samples")
    assert code == 0, err
    (npz,) = (tmp_path / "samples").glob("*.npz")
    with np.load(npz) as data:
        assert data["arr_0"].shape == (2, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert set(data["arr_1"]) <= {0, 1}


def test_adm_benchmark_runs_and_prints_a_table():
    args = ["--num_channels", "32", "--num_head_channels", "32", "--batch", "1", "--iters", "1", "--warmup", "0",
            "--threads", "1", "--precisions", "float32"]
    result = run_benchmark("bench_adm.py", args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| float32 |")]
    assert len(rows) == 2, result.stdout


def write_data_files():
    """Record the listing digests (from ../shared) and the regression outputs (from this implementation)."""
    digests = {}
    for path in sorted(GOLDEN_KEYS.glob("*.txt")):
        argv, count, lines = read_listing(path)
        digests[path.stem] = {"flags": argv, "parameters": count, "keys": len(lines), "sha256": listing_digest(lines)}
    KEYS_FILE.write_text(json.dumps(digests, indent=1) + "\n")
    outputs = {}
    for name in sorted(REGRESSION_CONFIGS):
        model, x, t, kwargs = build_regression_case(name)
        with torch.no_grad():
            outputs[name] = model(x, t, **kwargs)
    torch.save(outputs, REGRESSION_FILE)
    print(f"wrote {len(digests)} listing digests to {KEYS_FILE} and {len(outputs)} outputs to {REGRESSION_FILE}")


if __name__ == "__main__":
    write_data_files()
