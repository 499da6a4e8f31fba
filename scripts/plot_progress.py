"""
Draw a training run's progress.csv against steps as a PNG, for those without
TensorBoard: the loss terms (loss, mse, vb, on a log scale) in one panel and,
when the run logged it (image_train.py --eval_interval), FID in a second.

    python scripts/plot_progress.py LOGDIR [--output PNG] [--keys loss,mse,vb]

Needs matplotlib (pip install -e .[plot]).
"""

import csv
import math
import os

from improved_diffusion import cli
from improved_diffusion.errors import InputError
from improved_diffusion.flags import parse

EVAL_KEYS = ("fid",)


class PlotError(InputError):
    """A log directory or flag this script cannot plot."""


def read_progress(path):
    """{column: ([steps], [values])} for each numeric column of progress.csv, skipping empty cells."""
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist: give the log directory of a training run (its OPENAI_LOGDIR)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise PlotError(f"{path} has no rows with a step column")
    series = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        for key, cell in row.items():
            value = _number(cell)
            if key != "step" and value is not None:
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return series


def _number(cell):
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot(series, keys, output, title):
    """Write the PNG: `keys` in a log-scale panel, EVAL_KEYS that are present in another."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError(
            "plot_progress.py needs matplotlib: pip install matplotlib (or pip install -e .[plot])"
        ) from exc
    present = [key for key in keys if key in series]
    if not present:
        raise PlotError(f"none of the columns {', '.join(keys)} is in the log; it has {', '.join(sorted(series))}")
    evals = [key for key in EVAL_KEYS if key in series]
    figure, axes = plt.subplots(1 + len(evals), 1, figsize=(8, 4 + 3 * len(evals)), squeeze=False, sharex=True)
    for key in present:
        axes[0, 0].plot(*series[key], label=key)
    axes[0, 0].set_yscale("log" if all(v > 0 for key in present for v in series[key][1]) else "linear")
    axes[0, 0].set_ylabel("loss terms")
    axes[0, 0].legend()
    axes[0, 0].set_title(title)
    for axis, key in zip(axes[1:, 0], evals):
        axis.plot(*series[key], marker="o", label=key)
        axis.set_ylabel(key.upper())
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


@cli.script
def main(argv=None):
    args, _ = parse("plot_progress", argv, __doc__)
    output = args.output or os.path.join(args.logdir, "progress.png")
    series = read_progress(os.path.join(args.logdir, "progress.csv"))
    plot(series, [key.strip() for key in args.keys.split(",") if key.strip()], output, args.logdir)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
