"""
Convert a model or EMA checkpoint between torch's format and safetensors,
the direction given by the suffixes:

    python scripts/convert_checkpoint.py model100000.pt model100000.safetensors
    python scripts/convert_checkpoint.py ema_0.9999_100000.safetensors ema_0.9999_100000.pt

The file holds a flat state dict of tensors (a model or EMA file, this
library's or the reference's); tensors keep their names, dtypes, shapes and
bits. Optimizer and state files hold more than tensors and stay .pt. Needs
the safetensors package (pip install safetensors).
"""

import torch

from improved_diffusion import cli
from improved_diffusion.errors import UsageError
from improved_diffusion.flags import parse
from improved_diffusion.io_util import CheckpointError, atomic_save_checkpoint, is_safetensors_path, load_checkpoint


def parse_args(argv=None):
    args, _ = parse("convert_checkpoint", argv, __doc__)
    if is_safetensors_path(args.in_path) == is_safetensors_path(args.out_path):
        kind = "safetensors" if is_safetensors_path(args.in_path) else "torch (.pt)"
        raise UsageError(f"IN_PATH and OUT_PATH are both {kind} files: exactly one of them must end in .safetensors")
    return args


def convert(input_path, output_path):
    """
    Write the state dict of `input_path` to `output_path` in the other format.

    :return: the number of tensors written.
    :raises CheckpointError: naming the file that is missing, unreadable, or
        (for safetensors) holds more than tensors.
    """
    state_dict = load_checkpoint(input_path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{input_path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    others = [f"{key!r} ({type(value).__name__})" for key, value in state_dict.items()
              if not isinstance(value, torch.Tensor)]
    if others:
        raise CheckpointError(
            f"{input_path} holds more than tensors ({', '.join(others[:3])}): only model and EMA files "
            f"convert; optimizer and state files stay .pt"
        )
    try:
        atomic_save_checkpoint(state_dict, output_path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {output_path}: {exc}") from exc
    return len(state_dict)


@cli.script
def main(argv=None):
    args = parse_args(argv)
    count = convert(args.in_path, args.out_path)
    print(f"wrote {args.out_path} ({count} tensors from {args.in_path})", flush=True)


if __name__ == "__main__":
    main()
