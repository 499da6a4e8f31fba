"""
The UNet denoiser of improved-diffusion and its super-resolution variant.

State dicts are interchangeable with the reference implementation: module
names, parameter shapes and their order are the same. The options of
openai/guided-diffusion's ADM family (head width `num_head_channels`,
residual up/downsampling `resblock_updown`, `use_new_attention_order`,
fractional `channel_mult`) build its layouts as well, and `EncoderUNetModel`
is its noisy classifier. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`; residual and attention
blocks can recompute their activations in the backward pass
(`use_checkpoint`); the network runs under `torch.autocast` (normalization
stays in float32) or, as in the reference, with its torso converted to
float16 by `convert_to_fp16()`.
"""

from abc import abstractmethod
import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    Dropout,
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` ([N x C x ...]) given embeddings `emb` ([N x E])."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _inner_stride(dims):
    """Resampling factor per spatial axis: 3-D signals keep their first (depth) axis."""
    return (1, 2, 2) if dims == 3 else 2


class Upsample(nn.Module):
    """
    Nearest-neighbour upsampling by 2, optionally followed by a 3x3 convolution.

    [N x C x H x W] -> [N x C x 2H x 2W] (3-D: the depth axis keeps its size).
    """

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        x = _upsample_nearest(x, self.dims)
        return self.conv(x) if self.use_conv else x


def _upsample_nearest(x, dims):
    """
    Nearest-neighbour upsampling by 2 of the last axis (dims=1) or the last two
    (dims=2, 3): F.interpolate's numbers. Each axis is doubled by stacking x
    with itself, which is vectorized on CPU forward and backward (the backward
    adds two slices), unlike interpolate or a strided expand.
    """
    x = torch.stack([x, x], dim=-1).flatten(-2)
    if dims == 1:
        return x
    return torch.stack([x, x], dim=-2).flatten(-3, -2)


class Downsample(nn.Module):
    """
    Downsampling by 2 with a strided 3x3 convolution or 2x2 average pooling.

    [N x C x H x W] -> [N x C x H/2 x W/2] (3-D: the depth axis keeps its size).
    """

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = _inner_stride(dims)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding.

    :param channels: input width C.
    :param emb_channels: embedding width E.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output width (default C).
    :param use_conv: a 3x3 instead of a 1x1 convolution on the skip path when widths differ.
    :param use_scale_shift_norm: the embedding scales and shifts the normalized
                                 activations instead of being added to them.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param use_checkpoint: recompute activations in the backward pass.
    :param up: upsample by 2 (guided-diffusion's resblock_updown): the main path
               after its first normalization and activation, the skip path at its start.
    :param down: downsample by 2 (2x2 average pooling) at the same two places.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), conv_nd(dims, channels, out, 3, padding=1)
        )
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both: give up=True or down=True")
        self.updown = up or down
        if self.updown:
            resample = Upsample if up else Downsample
            self.h_upd = resample(channels, False, dims)
            self.x_upd = resample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            SiLU(), linear(emb_channels, 2 * out if use_scale_shift_norm else out)
        )
        self.out_layers = nn.Sequential(
            normalization(out),
            SiLU(),
            Dropout(p=dropout),
            zero_module(conv_nd(dims, out, out, 3, padding=1)),
        )
        if out == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out, 3 if use_conv else 1, padding=int(use_conv))

    def forward(self, x, emb):
        """[N x C x ...] and [N x E] -> [N x out_channels x ...]."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest((norm(h) * (1 + scale)).add_(shift))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def count_flops_attn(model, _x, y):
    """
    A `thop` counter for the attention modules: the two matrix products of
    attention over T positions cost 2 * N * T^2 * C multiply-adds for an
    output y of shape [N x C x T] (or [N x C x H x W], T = H * W). Use as
    `thop.profile(model, inputs, custom_ops={QKVAttention: QKVAttention.count_flops})`.
    """
    out = y[0] if isinstance(y, (tuple, list)) else y
    n, c, *spatial = out.shape
    positions = math.prod(spatial)
    model.total_ops += torch.DoubleTensor([2 * n * positions**2 * c])


class _PackedAttention(nn.Module):
    """
    Multi-head attention over packed queries, keys and values, with the
    weights softmax(q.k / sqrt(C)) of scaled_dot_product_attention (whose
    fused CPU and CUDA kernels accumulate the softmax in float32).

    forward: [N x 3HC x T] -> [N x HC x T], the references' layout. The UNet
    passes transposed views of [N x T x 3HC] tokens, which `_heads` reads
    without a copy.
    """

    def __init__(self, n_heads=1):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        n, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"{width} qkv channels do not split into q, k, v of {self.n_heads} heads")
        q, k, v = self._heads(qkv.transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(n, length, width // 3).transpose(1, 2)

    def _heads(self, tokens):
        """[N x T x 3HC] -> q, k, v, each [N x H x T x C]."""
        raise NotImplementedError

    count_flops = staticmethod(count_flops_attn)


class QKVAttentionLegacy(_PackedAttention):
    """
    improved-diffusion's head layout: head h owns the channels [3hC, 3hC + 3C),
    split into its query, key and value of C channels each; its output goes to
    channels [hC, hC + C).
    """

    def _heads(self, tokens):
        n, length, width = tokens.shape
        return tokens.reshape(n, length, self.n_heads, width // self.n_heads).transpose(1, 2).chunk(3, dim=-1)


class QKVAttention(_PackedAttention):
    """
    guided-diffusion's new attention order: the channels split into q, k and v
    first (thirds of HC channels), then each into heads, head h owning
    [hC, hC + C) of each third; its output goes to channels [hC, hC + C).
    """

    def _heads(self, tokens):
        n, length, _ = tokens.shape
        return tuple(t.reshape(n, length, self.n_heads, -1).transpose(1, 2) for t in tokens.chunk(3, dim=-1))


def attention_heads(channels, num_heads, num_head_channels):
    """
    The head count of an attention block of `channels` channels: num_heads,
    or channels // num_head_channels when num_head_channels > 0.
    """
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(
                f"{num_heads} attention heads cannot split {channels} channels: choose "
                f"--num_heads and --num_heads_upsample that divide every attention width"
            )
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"--num_head_channels {num_head_channels} does not divide the attention width {channels}: "
            f"give a positive head width that divides every attention width, or -1 to use --num_heads"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """
    Self-attention between all spatial positions, added to the input.

    [N x C x ...] -> [N x C x ...], with `num_heads` heads (or heads of
    `num_head_channels` channels when that is > 0), in improved-diffusion's
    head layout or, with `use_new_attention_order`, guided-diffusion's.
    `qkv` and `proj_out` are 1x1 Conv1d modules (the references' parameter
    layout); they are applied as matrix products over [N x T x C] tokens, so
    that each head's q, k and v are contiguous for the fused attention kernels.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        use_checkpoint=False,
        num_head_channels=-1,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, 3 * channels, 1)
        order = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = order(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)
        tokens = self.norm(x).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        h = self.attention(qkv.transpose(1, 2)).transpose(1, 2)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (x + h.transpose(1, 2)).reshape(n, c, *spatial)


class UNetModel(nn.Module):
    """
    The timestep-conditioned UNet.

    :param in_channels: channels of the input.
    :param model_channels: base width; level l has int(model_channels * channel_mult[l])
                           channels (multipliers may be fractions, as 0.5).
    :param out_channels: channels of the output.
    :param num_res_blocks: residual blocks per level on the way down (one more on the way up).
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) at which
                                  blocks are followed by self-attention.
    :param dropout: dropout rate inside residual blocks.
    :param channel_mult: width multiplier of each level.
    :param conv_resample: learned 3x3 convolutions for up- and downsampling.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of class labels for a class-conditional model, else None.
    :param use_checkpoint: gradient checkpointing in residual and attention blocks.
    :param num_heads: attention heads on the way down and in the middle.
    :param num_heads_upsample: attention heads on the way up (-1: num_heads).
    :param use_scale_shift_norm: FiLM-like conditioning in residual blocks.
    :param num_head_channels: channels per attention head; when > 0 it sets the
                              head count of every attention block instead of
                              num_heads and num_heads_upsample (-1: unused).
    :param resblock_updown: resample between levels with residual blocks
                            (ResBlock up/down) instead of Upsample/Downsample.
    :param use_new_attention_order: guided-diffusion's QKVAttention head layout
                                    instead of QKVAttentionLegacy's.
    :param use_fp16: guided-diffusion's flag, recorded as `self.use_fp16`; the
                     weights stay float32 (float16 arithmetic comes from
                     torch.autocast in the training loop, or from convert_to_fp16()).
    :param image_size: the image size, recorded as `self.image_size` (guided-diffusion's argument).
    :param null_label: one more label embedding, index num_classes, meaning "no
                       class" (classifier-free guidance; only models trained with
                       --class_dropout_prob > 0 have it).
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        num_head_channels=-1,
        resblock_updown=False,
        use_new_attention_order=False,
        use_fp16=False,
        image_size=None,
        null_label=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_head_channels = num_head_channels
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.use_fp16 = use_fp16
        self.image_size = image_size

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            linear(model_channels, emb_dim), SiLU(), linear(emb_dim, emb_dim)
        )
        self.null_label = num_classes if null_label and num_classes is not None else None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(self.null_label is not None), emb_dim)
        skip_widths = self._build_input_blocks()
        width = self._width(-1)
        self.middle_block = TimestepEmbedSequential(
            self._res_block(width, width),
            self._attention(width, num_heads),
            self._res_block(width, width),
        )
        self._build_head(skip_widths)

    def _build_head(self, skip_widths):
        """Create what follows the middle block: `output_blocks` and `out`."""
        self._build_output_blocks(skip_widths)
        self.out = nn.Sequential(
            normalization(self._width(0)),
            SiLU(),
            zero_module(conv_nd(self.dims, self._width(0), self.out_channels, 3, padding=1)),
        )

    def _width(self, level):
        """The width of a level: int(model_channels * channel_mult[level])."""
        return int(self.model_channels * self.channel_mult[level])

    def _res_block(self, channels, out_channels, up=False, down=False):
        return ResBlock(
            channels,
            4 * self.model_channels,
            self.dropout,
            out_channels=out_channels,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention(self, channels, num_heads):
        return AttentionBlock(
            channels,
            num_heads=num_heads,
            use_checkpoint=self.use_checkpoint,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def _downsample(self, channels):
        """The block closing a level on the way down: [N x C x H x W] -> [N x C x H/2 x W/2]."""
        if self.resblock_updown:
            return self._res_block(channels, channels, down=True)
        return Downsample(channels, self.conv_resample, dims=self.dims)

    def _upsample(self, channels):
        """The layer closing a level on the way up: [N x C x H x W] -> [N x C x 2H x 2W]."""
        if self.resblock_updown:
            return self._res_block(channels, channels, up=True)
        return Upsample(channels, self.conv_resample, dims=self.dims)

    def _build_input_blocks(self):
        """Create `input_blocks`; return the width of each block's output (the skips)."""
        ch = self._width(0)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(self.dims, self.in_channels, ch, 3, padding=1))]
        )
        skip_widths = [ch]
        for level in range(len(self.channel_mult)):
            ds = 2**level
            for _ in range(self.num_res_blocks):
                layers = [self._res_block(ch, self._width(level))]
                ch = self._width(level)
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(self._downsample(ch)))
                skip_widths.append(ch)
        return skip_widths

    def _build_output_blocks(self, skip_widths):
        """Create `output_blocks`, consuming the skip widths from the deepest one."""
        ch = self._width(-1)
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(self.channel_mult))):
            width = self._width(level)
            for i in range(self.num_res_blocks + 1):
                layers = [self._res_block(ch + skip_widths.pop(), width)]
                ch = width
                if 2**level in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(self._upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def convert_to_fp16(self):
        """Store the torso's convolutions in float16 (the reference's use_fp16)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Store the torso's convolutions in float32 again."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)

    @property
    def inner_dtype(self):
        """The dtype the torso runs in: float16 after convert_to_fp16(), else float32."""
        return next(self.input_blocks.parameters()).dtype

    def _check_inputs(self, x, y):
        """Raise ValueError for labels that do not fit the model or an input size it cannot halve."""
        if self.num_classes is None and y is not None:
            raise ValueError(
                "labels y were given to an unconditional model: drop y, or build the "
                "model with --class_cond True"
            )
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    "this model is class-conditional: pass labels y (an [N] integer tensor) "
                    "or build it with --class_cond False"
                )
            if tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"labels y must have shape [{x.shape[0]}], got {list(y.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        sizes = x.shape[3:] if self.dims == 3 else x.shape[2:]
        if any(s % factor for s in sizes):
            raise ValueError(
                f"input of spatial size {list(x.shape[2:])} cannot be halved "
                f"{len(self.channel_mult) - 1} times (channel_mult {self.channel_mult}): "
                f"use a size divisible by {factor}"
            )

    def _blocks(self, x, timesteps, y):
        """Run the torso, yielding ("down" | "middle" | "up", activation) after each block."""
        self._check_inputs(x, y)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.type(self.inner_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
            yield "down", h
        h = self.middle_block(h, emb)
        yield "middle", h
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            yield "up", h

    def forward(self, x, timesteps, y=None):
        """
        :param x: [N x C x ...] inputs.
        :param timesteps: [N] timesteps (may be fractional).
        :param y: [N] integer labels, for a class-conditional model only.
        :return: [N x out_channels x ...] outputs, in x's dtype.
        """
        for _, h in self._blocks(x, timesteps, y):
            pass
        return self.out(h.type(x.dtype)).type(x.dtype)

    def get_feature_vectors(self, x, timesteps, y=None):
        """
        The activations after every block, in x's dtype.

        :return: a dict: "down", the list of input-block outputs; "middle", the
                 middle block's output (a tensor, as in the reference); "up",
                 the list of output-block outputs.
        """
        result = {"down": [], "middle": None, "up": []}
        for stage, h in self._blocks(x, timesteps, y):
            if stage == "middle":
                result["middle"] = h.type(x.dtype)
            else:
                result[stage].append(h.type(x.dtype))
        return result


class SuperResModel(UNetModel):
    """
    A UNet conditioned on a low-resolution image, which is upsampled
    bilinearly to the input's size and concatenated to it on the channel axis.

    Takes the same arguments as UNetModel; the network sees 2 * in_channels inputs.
    """

    def __init__(self, in_channels, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    @staticmethod
    def _with_low_res(x, low_res):
        """[N x C x H x W] and [N x C x h x w] -> [N x 2C x H x W]."""
        if low_res is None:
            raise ValueError("SuperResModel needs low_res, the [N x C x h x w] image to upsample")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return torch.cat([x, upsampled], dim=1)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        return super().forward(self._with_low_res(x, low_res), timesteps, **kwargs)

    def get_feature_vectors(self, x, timesteps, low_res=None, **kwargs):
        return super().get_feature_vectors(self._with_low_res(x, low_res), timesteps, **kwargs)


class AttentionPool2d(nn.Module):
    """
    CLIP's attention pooling, as guided-diffusion's classifiers use it: the
    mean position, prepended to the positions and given learned positional
    embeddings, attends to all of them (QKVAttention, heads of
    `num_heads_channels` channels); [N x C x H x W] -> [N x output_dim].
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = attention_heads(embed_dim, 1, num_heads_channels)
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        n, c, *spatial = x.shape
        positions = self.positional_embedding.shape[1] - 1
        if math.prod(spatial) != positions:
            raise ValueError(
                f"attention pooling was built for {positions} positions, the input has {list(spatial)}: "
                f"give images of the classifier's --image_size"
            )
        x = x.reshape(n, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]


POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(UNetModel):
    """
    guided-diffusion's noisy classifier: the UNet's way down and middle block,
    then a pooling head to out_channels logits; forward(x, timesteps) ->
    [N x out_channels]. Arguments as guided-diffusion's, in its order.

    :param image_size: the input size (attention pooling's positions).
    :param pool: "adaptive" (average pool, then a zero-initialized 1x1 conv),
                 "attention" (AttentionPool2d; needs num_head_channels > 0),
                 "spatial" or "spatial_v2" (an MLP over the spatial means of
                 every block's output, ReLU or GroupNorm+SiLU inside).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        if pool not in POOLS:
            raise ValueError(f"unknown --classifier_pool {pool!r}: use one of {', '.join(POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("attention pooling needs num_head_channels > 0 (its heads' width)")
        self.pool = pool
        super().__init__(
            in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
            dropout=dropout, channel_mult=channel_mult, conv_resample=conv_resample, dims=dims,
            use_checkpoint=use_checkpoint, num_heads=num_heads, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, num_head_channels=num_head_channels,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order,
            use_fp16=use_fp16, image_size=image_size,
        )

    def _build_head(self, skip_widths):
        self.output_blocks = nn.ModuleList()  # no way up: _blocks ends at the middle block
        width = self._width(-1)
        if self.pool == "adaptive":
            self.out = nn.Sequential(
                normalization(width), SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(self.dims, width, self.out_channels, 1)), nn.Flatten(),
            )
        elif self.pool == "attention":
            final_size = self.image_size // 2 ** (len(self.channel_mult) - 1)
            self.out = nn.Sequential(
                normalization(width), SiLU(),
                AttentionPool2d(final_size, width, self.num_head_channels, self.out_channels),
            )
        else:
            features = sum(skip_widths) + width
            inner = [nn.ReLU()] if self.pool == "spatial" else [normalization(2048), SiLU()]
            self.out = nn.Sequential(nn.Linear(features, 2048), *inner, nn.Linear(2048, self.out_channels))

    def forward(self, x, timesteps):
        """[N x C x H x W] and [N] timesteps -> [N x out_channels] logits, in x's dtype."""
        spatial = self.pool.startswith("spatial")
        means = []
        for _, h in self._blocks(x, timesteps, None):
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        return self.out(torch.cat(means, dim=-1) if spatial else h.type(x.dtype))
