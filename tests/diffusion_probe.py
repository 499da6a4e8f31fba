"""The golden data's probe model: a deterministic elementwise stand-in for a network."""

import torch


class ProbeModel:
    """
    Output channel o is sin(0.5 (o + 1) x[:, o % C] + 0.003 (o + 1) ts + 0.01 y),
    with ts and y broadcast over the non-batch dimensions.
    """

    def __init__(self, out_channels):
        self.out_channels = out_channels

    def __call__(self, x, ts, y=None):
        shape = (-1,) + (1,) * (x.ndim - 2)
        ts = ts.float().view(shape)
        channels = []
        for o in range(self.out_channels):
            arg = 0.5 * (o + 1) * x[:, o % x.shape[1]] + 0.003 * (o + 1) * ts
            if y is not None:
                arg = arg + 0.01 * y.float().view(shape)
            channels.append(torch.sin(arg))
        return torch.stack(channels, dim=1)
