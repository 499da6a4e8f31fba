"""
A trained model ready to sample: built from its flags on the meta device (no
random initialization that the checkpoint would replace), its weights
loaded strictly with an error that names the flags to fix, then the run's
precision and compilation wrappers.
"""

import torch

from . import dist_util
from .checkpoint_layout import load_model_state_dict
from .errors import InputError, UsageError
from .precision import warn_if_emulated_bf16
from .script_util import diffusion_from_flags, model_from_flags


def load_model(model_path, flags, use_fp16=False, use_bf16=False, compile=False):
    """
    Build the model and diffusion of a flag dict and load `model_path` into the model.

    :param flags: the model and diffusion flags (model_from_flags, diffusion_from_flags).
    :return: (model, diffusion); the model in eval mode on dist_util.dev(),
        converted to float16 with use_fp16, wrapped in bfloat16 autocast
        with use_bf16, and torch.compile'd with compile (then wrapped in
        CompiledBatches, so a run compiles once).
    :raises UsageError: for flags that build no model; InputError (a
        CheckpointError) for a checkpoint that is missing, unreadable or does not fit them.
    """
    try:
        with torch.device("meta"):
            model, diffusion = model_from_flags(flags), diffusion_from_flags(flags)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state_dict = dist_util.load_state_dict(model_path, map_location="cpu")
    model.to_empty(device=dist_util.dev())
    try:
        load_model_state_dict(model, state_dict, flags, model_path)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if use_fp16:
        model.convert_to_fp16()
    model.eval()
    if use_bf16:
        warn_if_emulated_bf16(dist_util.dev())
        model = AutocastModel(model)
    if compile:
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
