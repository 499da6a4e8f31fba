"""
UNetModel and SuperResModel: outputs against the reference's golden data and
this repository's regression data, attention layout, gradient checkpointing,
mixed precision, feature vectors, saving and loading, and error messages.

`python tests/test_unet.py` rewrites tests/data/unet_regression.pt from the
current implementation; do it only for an intended change of outputs.
"""

import inspect
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion import checkpoint_layout, script_util
from improved_diffusion.fp16_util import convert_module_to_f16
from improved_diffusion.nn import Dropout
from improved_diffusion.unet import QKVAttention, QKVAttentionLegacy, SuperResModel, UNetModel

REGRESSION_FILE = pathlib.Path(__file__).parent / "data" / "unet_regression.pt"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# Tiny configurations for the regression data: constructor keyword arguments by name.
REGRESSION_CONFIGS = {
    "conditional_scale_shift": {
        "cls": "UNetModel", "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "num_classes": 5, "num_heads": 2,
        "use_scale_shift_norm": True,
    },
    "plain_avgpool_heads": {
        "cls": "UNetModel", "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 2,
        "attention_resolutions": (1, 2), "channel_mult": (1, 1, 2), "conv_resample": False,
        "num_heads": 1, "num_heads_upsample": 4,
    },
    "super_res": {
        "cls": "SuperResModel", "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "num_heads": 4, "use_scale_shift_norm": True,
    },
    "one_dimensional": {
        "cls": "UNetModel", "in_channels": 2, "model_channels": 32, "out_channels": 2, "num_res_blocks": 1,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "dims": 1, "num_heads": 2,
    },
}


def deterministic_fill(model):
    """Set every parameter from a sine formula (no RNG, identical on every platform)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            angle = torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i
            fan_in = p[0].numel() if p.ndim > 1 else 10
            p.copy_((torch.sin(angle) / math.sqrt(fan_in)).reshape(p.shape))
    return model


def build_regression_case(name):
    """(model, x, timesteps, model_kwargs) of a REGRESSION_CONFIGS entry."""
    config = dict(REGRESSION_CONFIGS[name])
    cls = {"UNetModel": UNetModel, "SuperResModel": SuperResModel}[config.pop("cls")]
    model = deterministic_fill(cls(**config)).eval()
    spatial = (16,) * config.get("dims", 2)
    channels = config["in_channels"]
    x = torch.cos(torch.arange(2 * channels * math.prod(spatial), dtype=torch.float64) * 0.3)
    x = x.float().reshape(2, channels, *spatial)
    kwargs = {}
    if config.get("num_classes"):
        kwargs["y"] = torch.tensor([4, 1])
    if cls is SuperResModel:
        kwargs["low_res"] = torch.sin(torch.arange(2 * 3 * 64, dtype=torch.float64)).float().reshape(2, 3, 8, 8)
    return model, x, torch.tensor([3.5, 711.25]), kwargs


def tiny_model(**overrides):
    """A small UNetModel with random weights (zero-initialized layers filled too)."""
    kwargs = {
        "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "num_heads": 2, "use_scale_shift_norm": True,
    }
    kwargs.update(overrides)
    cls = kwargs.pop("cls", UNetModel)
    torch.manual_seed(0)
    model = cls(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def golden_model(case):
    """The model of a golden unet case, built from its flags, with its weights."""
    create = script_util.sr_create_model if case["super_res"] else script_util.create_model
    names = inspect.signature(create).parameters
    model = create(**{k: v for k, v in case["flags"].items() if k in names})
    model.load_state_dict(case["state_dict"], strict=True)
    return model.eval()


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def golden_cases(golden_dir):
    return torch.load(golden_dir / "unet_cases.pt", weights_only=True)


@pytest.mark.parametrize("index", range(3))
def test_golden_outputs(golden_cases, index):
    case = golden_cases[index]
    model = golden_model(case)
    listing = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    assert listing == case["keys"].strip()
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    with torch.no_grad():
        out = model(case["x"], case["timesteps"], **case["kwargs"])
    assert out.shape == case["expected"].shape
    assert relative_error(out, case["expected"]) < 2e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(REGRESSION_CONFIGS))
def test_regression_data(name, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    expected = torch.load(REGRESSION_FILE, weights_only=True)[name]
    model, x, t, kwargs = build_regression_case(name)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    with torch.no_grad():
        out = model.to(device)(x.to(device), t.to(device), **kwargs).cpu()
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 2e-4


def _reference_attention(q, k, v):
    """softmax(q.k / sqrt(d)) v for q, k, v of shape [N x d x T] -> [N x d x T]."""
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)
    return (weights @ v.transpose(1, 2)).transpose(1, 2)


def test_legacy_attention_head_layout():
    """Head h reads channels [3hd, 3hd + 3d) as q, k, v and writes [hd, hd + d)."""
    torch.manual_seed(1)
    n, length, heads, d = 2, 10, 3, 4
    qkv = torch.randn(n, 3 * heads * d, length)
    out = QKVAttentionLegacy(heads)(qkv)
    for h in range(heads):
        q, k, v = qkv[:, 3 * h * d : 3 * (h + 1) * d].split(d, dim=1)
        torch.testing.assert_close(out[:, h * d : (h + 1) * d], _reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_new_attention_order_head_layout():
    """q, k, v are the thirds of the channels; head h owns [hd, hd + d) of each and of the output."""
    torch.manual_seed(1)
    n, length, heads, d = 2, 10, 3, 4
    qkv = torch.randn(n, 3 * heads * d, length)
    out = QKVAttention(heads)(qkv)
    thirds = qkv.chunk(3, dim=1)
    for h in range(heads):
        q, k, v = (third[:, h * d : (h + 1) * d] for third in thirds)
        torch.testing.assert_close(out[:, h * d : (h + 1) * d], _reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, x, t, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss = model(x, t).square().mean()
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in model.parameters()]


def _saved_bytes(model, x, t):
    """Bytes of the tensors autograd saves in a forward pass outside checkpointed regions."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t).sum()
    return total


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_model(dropout=0.2).train()
    ckpt = tiny_model(dropout=0.2, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    loss_plain, grads_plain = _loss_and_grads(plain, x, t, seed=3)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, x, t, seed=3)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)
    assert _saved_bytes(ckpt, x.requires_grad_(), t) < 0.5 * _saved_bytes(plain, x, t)


def test_bfloat16_autocast_on_cpu(monkeypatch):
    model = tiny_model(num_classes=4).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 900.0]), torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(x, t, y)
    norm_calls = []
    group_norm = F.group_norm

    def recording_group_norm(inp, groups, weight=None, bias=None, eps=1e-5):
        norm_calls.append((inp.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return group_norm(inp, groups, weight, bias, eps)

    monkeypatch.setattr(F, "group_norm", recording_group_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 0.05
    assert norm_calls and all(w == torch.float32 and not on for _, w, on in norm_calls)
    assert any(dtype == torch.bfloat16 for dtype, _, _ in norm_calls)


def test_group_norm_of_bfloat16_matches_float32_rounded():
    torch.manual_seed(2)
    norm = tiny_model().out[0]
    x = torch.randn(2, 32, 8, 8).bfloat16()
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias).bfloat16()
    torch.testing.assert_close(norm(x), expected, rtol=0.01, atol=0.01)


def test_bfloat16_autocast_backward_runs():
    model = tiny_model(use_checkpoint=True).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_model(num_classes=4, use_checkpoint=True).cuda().train()
    x, t, y = torch.randn(2, 3, 16, 16).cuda(), torch.tensor([5.0, 900.0]).cuda(), torch.tensor([0, 3]).cuda()
    with torch.no_grad():
        expected = model.eval()(x, t, y)
    with torch.autocast("cuda", dtype=dtype):
        out = model.train()(x, t, y)
    assert out.dtype == torch.float32
    assert relative_error(out.detach(), expected) < 0.05
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@CUDA
def test_checkpointing_on_cuda_gives_the_same_gradients():
    plain = tiny_model(dropout=0.2).cuda().train()
    ckpt = tiny_model(dropout=0.2, use_checkpoint=True).cuda().train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16).cuda(), torch.tensor([10.0, 500.0]).cuda()
    _, grads_plain = _loss_and_grads(plain, x, t, seed=3)
    _, grads_ckpt = _loss_and_grads(ckpt, x, t, seed=3)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_convert_to_fp16_and_back(device):
    model = tiny_model().to(device).eval()
    x, t = torch.randn(2, 3, 16, 16, device=device), torch.tensor([5.0, 50.0], device=device)
    with torch.no_grad():
        expected = model(x, t)
        model.convert_to_fp16()
        assert model.inner_dtype == torch.float16
        assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
        assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
        assert model.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
        assert model.out[2].weight.dtype == torch.float32
        out = model(x, t)
        assert out.dtype == torch.float32
        assert relative_error(out, expected) < 0.02
        model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_convert_module_to_f16_leaves_other_layers():
    linear, conv = torch.nn.Linear(2, 2), torch.nn.Conv2d(2, 2, 1)
    convert_module_to_f16(linear)
    convert_module_to_f16(conv)
    assert linear.weight.dtype == torch.float32
    assert conv.weight.dtype == conv.bias.dtype == torch.float16


def test_dropout_statistics_and_gradient():
    torch.manual_seed(4)
    drop = Dropout(p=0.3).train()
    x = torch.ones(200_000, requires_grad=True)
    out = drop(x)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01
    zero, kept = out.unique().tolist()
    assert zero == 0.0 and kept == pytest.approx(1 / 0.7)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())
    assert torch.equal(drop.eval()(x), x)


def test_get_feature_vectors_matches_forward():
    model = tiny_model(num_classes=3).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([7.0, 70.0]), torch.tensor([2, 0])
    with torch.no_grad():
        features = model.get_feature_vectors(x, t, y)
        out = model(x, t, y)
        assert len(features["down"]) == len(model.input_blocks)
        assert len(features["up"]) == len(model.output_blocks)
        assert features["middle"].shape == (2, 64, 8, 8)
        torch.testing.assert_close(model.out(features["up"][-1]), out)


def test_super_res_feature_vectors_read_nchw():
    model = tiny_model(cls=SuperResModel).eval()
    x, low_res, t = torch.randn(2, 3, 32, 16), torch.randn(2, 3, 16, 8), torch.tensor([3.0, 30.0])
    with torch.no_grad():
        features = model.get_feature_vectors(x, t, low_res=low_res)
        out = model(x, t, low_res=low_res)
    assert features["down"][0].shape == (2, 32, 32, 16)
    torch.testing.assert_close(model.out(features["up"][-1]), out)


@pytest.mark.parametrize("dims, spatial", [(1, (16,)), (3, (2, 8, 8))])
def test_one_and_three_dimensional_signals(dims, spatial):
    model = tiny_model(dims=dims, in_channels=2, out_channels=2).eval()
    x = torch.randn(2, 2, *spatial)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 2.0]))
    assert out.shape == x.shape


def test_save_and_load_round_trip(tmp_path):
    flags = dict(
        script_util.model_and_diffusion_defaults(),
        image_size=16, num_channels=32, num_res_blocks=1, class_cond=True, num_classes=7,
        learn_sigma=True,
    )
    model, _ = script_util.create_model_and_diffusion(**flags)
    deterministic_fill(model).eval()
    torch.save(model.state_dict(), tmp_path / "model000001.pt")
    loaded, _ = script_util.create_model_and_diffusion(**flags)
    state = torch.load(tmp_path / "model000001.pt", weights_only=True)
    checkpoint_layout.load_model_state_dict(loaded.eval(), state, flags, source="model000001.pt")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([4.0, 400.0]), torch.tensor([6, 0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_labels_given_to_an_unconditional_model():
    with pytest.raises(ValueError, match="unconditional.*--class_cond True"):
        tiny_model()(torch.randn(1, 3, 16, 16), torch.tensor([1.0]), y=torch.tensor([0]))


def test_labels_missing_for_a_conditional_model():
    with pytest.raises(ValueError, match="class-conditional: pass labels y"):
        tiny_model(num_classes=3)(torch.randn(1, 3, 16, 16), torch.tensor([1.0]))


def test_labels_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"labels y must have shape \[2\]"):
        tiny_model(num_classes=3)(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), y=torch.tensor([1]))


def test_head_count_that_does_not_divide_the_width():
    with pytest.raises(ValueError, match="3 attention heads cannot split 32 channels.*--num_heads"):
        tiny_model(num_heads=3, attention_resolutions=(1,))


def test_width_that_group_norm_cannot_split():
    with pytest.raises(ValueError, match="GroupNorm\\(32\\) cannot split 48 channels.*--num_channels"):
        tiny_model(model_channels=48)


def test_input_size_the_levels_cannot_halve():
    model = tiny_model(channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="cannot be halved 2 times.*divisible by 4"):
        model(torch.randn(1, 3, 18, 18), torch.tensor([1.0]))


def test_super_res_without_low_res():
    with pytest.raises(ValueError, match="needs low_res"):
        tiny_model(cls=SuperResModel)(torch.randn(1, 3, 16, 16), torch.tensor([1.0]))


def write_regression_file():
    """Record the current outputs of REGRESSION_CONFIGS (run only after checking the golden tests)."""
    outputs = {}
    for name in sorted(REGRESSION_CONFIGS):
        model, x, t, kwargs = build_regression_case(name)
        with torch.no_grad():
            outputs[name] = model(x, t, **kwargs)
    REGRESSION_FILE.parent.mkdir(exist_ok=True)
    torch.save(outputs, REGRESSION_FILE)


if __name__ == "__main__":
    write_regression_file()


@pytest.mark.parametrize("dims, shape, factor", [(1, (2, 3, 5), 2), (2, (2, 3, 4, 5), 2), (3, (2, 3, 2, 4, 5), (1, 2, 2))])
def test_upsample_matches_interpolate_nearest_with_its_gradient(dims, shape, factor):
    from improved_diffusion.unet import _upsample_nearest

    x = torch.randn(shape, requires_grad=True)
    ours = _upsample_nearest(x, dims)
    reference = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    assert torch.equal(ours, reference)
    grad = torch.randn_like(ours)
    # The backward sums each 2x2 (or 2) block, in another order than interpolate's kernel.
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])
