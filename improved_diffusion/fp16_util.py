"""
Mixed-precision helpers.

Two ways to run a model in 16 bits:

* the reference's `use_fp16` path: `model.convert_to_fp16()` stores the
  convolutions of the UNet's torso in float16 and the training loop keeps a
  flat float32 master copy of the parameters (`make_master_params` and the
  functions below);
* `torch.autocast` (bfloat16 on CPU and CUDA, float16 on CUDA), which needs
  none of this: the network keeps float32 weights, runs its convolutions and
  attention in the low precision and its normalization in float32.
"""

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _convert_conv(module, dtype):
    """Cast a convolution's weight and bias to `dtype` in place; other modules are left alone."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f16(module):
    """Store a convolution's parameters in float16 (use with `Module.apply`)."""
    _convert_conv(module, torch.float16)


def convert_module_to_f32(module):
    """Store a convolution's parameters in float32, undoing `convert_module_to_f16`."""
    _convert_conv(module, torch.float32)


def make_master_params(model_params):
    """
    A float32 copy of the model's parameters, flattened into one parameter.

    :return: a list holding a single 1-D nn.Parameter with every element.
    """
    flat = _flatten_dense_tensors([p.detach().float() for p in model_params])
    return [nn.Parameter(flat, requires_grad=True)]


def model_grads_to_master_grads(model_params, master_params):
    """Copy the model's gradients, as float32, into the flat master parameter."""
    master_params[0].grad = _flatten_dense_tensors(
        [p.grad.detach().float() for p in model_params]
    )


def unflatten_master_params(model_params, master_params):
    """Views of the flat master parameter shaped like each model parameter."""
    return _unflatten_dense_tensors(master_params[0].detach(), list(model_params))


def master_params_to_model_params(model_params, master_params):
    """Copy the master values back into the model parameters (cast to their dtypes)."""
    model_params = list(model_params)
    for param, master in zip(model_params, unflatten_master_params(model_params, master_params)):
        param.detach().copy_(master)


def zero_grad(model_params):
    """Zero the gradients of the given parameters, detaching them from any graph."""
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()
