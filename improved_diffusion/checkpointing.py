"""
Checkpoint sets of a training run: their file names, the order they are
written in, which sets are complete, which one to resume from, and retention.

A set for step N (N = optimizer updates in the weights) is, in write order:

    modelNNNNNN.pt            the UNet's state dict (the reference's format)
    ema_{rate}_NNNNNN.pt      one per EMA rate, same keys as the model
    optNNNNNN.pt              the AdamW state dict
    stateNNNNNN.pt            everything else exact resume needs (written last)

Each file goes to a temporary name and is renamed (io_util), and the state
file comes last, so a set is complete exactly when its state file exists.
Retention removes a set's state file first, so a half-removed set is never
taken for a complete one.
"""

import re

import blobfile as bf

from . import dist_util
from .io_util import CheckpointError, atomic_torch_save

_STEP_DIGITS = r"(\d{6,})"
_MODEL_RE = re.compile(rf"^model{_STEP_DIGITS}\.pt$")
_STATE_RE = re.compile(rf"^state{_STEP_DIGITS}\.pt$")
_ANY_RE = re.compile(rf"^(?:model|opt|state|ema_[^_]+_){_STEP_DIGITS}\.pt$")
_TEMP_RE = re.compile(rf"^\.(?:model|opt|state|ema_[^_]+_){_STEP_DIGITS}\.pt\.[^.]+\.tmp$")  # io_util's temporaries


class CheckpointSet:
    """The paths of the files of one checkpoint set."""

    def __init__(self, folder, step, ema_rates):
        self.folder = folder
        self.step = step
        self.model = bf.join(folder, f"model{step:06d}.pt")
        self.emas = {rate: bf.join(folder, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates}
        self.opt = bf.join(folder, f"opt{step:06d}.pt")
        self.state = bf.join(folder, f"state{step:06d}.pt")

    def save(self, model_state, ema_states, opt_state, run_state):
        """
        Write the set, state file last.

        :param ema_states: {rate: state dict}, one per rate of this set.
        """
        atomic_torch_save(model_state, self.model)
        for rate, path in self.emas.items():
            atomic_torch_save(ema_states[rate], path)
        atomic_torch_save(opt_state, self.opt)
        atomic_torch_save(run_state, self.state)


def step_from_model_path(path):
    """N from a path to modelNNNNNN.pt; ValueError naming --resume_checkpoint otherwise."""
    match = _MODEL_RE.match(bf.basename(path))
    if not match:
        raise ValueError(
            f"--resume_checkpoint {path}: expected a file named modelNNNNNN.pt "
            f"(the model file of a checkpoint set), a log directory, or 'auto'"
        )
    return int(match.group(1))


def complete_steps(folder):
    """The sorted steps of the complete sets (model and state file present) in `folder`."""
    if not bf.isdir(folder):
        return []
    names = set(bf.listdir(folder))
    steps = [int(m.group(1)) for m in map(_STATE_RE.match, names) if m]
    return sorted(s for s in steps if f"model{s:06d}.pt" in names)


def latest_complete(folder):
    """The model path of the newest complete set in `folder`, or None."""
    steps = complete_steps(folder)
    return bf.join(folder, f"model{steps[-1]:06d}.pt") if steps else None


def resolve_resume(resume_checkpoint, log_dir):
    """
    The model path to resume from, or None to start afresh.

    :param resume_checkpoint: "" (start afresh), "auto" (the newest complete
        set in `log_dir`, if any), a directory (its newest complete set, which
        must exist) or a modelNNNNNN.pt path.
    """
    if not resume_checkpoint:
        return None
    if resume_checkpoint == "auto":
        return latest_complete(log_dir)
    if bf.isdir(resume_checkpoint):
        path = latest_complete(resume_checkpoint)
        if path is None:
            raise CheckpointError(
                f"--resume_checkpoint {resume_checkpoint}: no complete checkpoint set "
                f"(modelNNNNNN.pt with its stateNNNNNN.pt) in this directory"
            )
        return path
    step_from_model_path(resume_checkpoint)
    if not bf.exists(resume_checkpoint):
        raise CheckpointError(f"--resume_checkpoint {resume_checkpoint}: file not found")
    return resume_checkpoint


def plan_resume(resume_checkpoint, log_dir, ema_rates):
    """
    Decide on rank 0 what to resume from, and tell every rank.

    :return: (CheckpointSet, missing, message), or None to start afresh:
        `missing` lists the set's absent EMA, optimizer and state files and
        `message` explains them ("" when none is missing).
    :raises ValueError: on every rank alike (CheckpointError for file problems).
    """

    def decide():
        path = resolve_resume(resume_checkpoint, log_dir)
        if path is None:
            return None
        ckpt = CheckpointSet(bf.dirname(path), step_from_model_path(path), ema_rates)
        missing = [p for p in [*ckpt.emas.values(), ckpt.opt, ckpt.state] if not bf.exists(p)]
        return ckpt, missing, _incomplete_set_message(ckpt, missing) if missing else ""

    return _decided_on_rank0(decide)


def _decided_on_rank0(decide):
    """decide() run on rank 0; its result, or its ValueError re-raised, on every rank."""
    outcome = None
    if dist_util.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except ValueError as exc:
            outcome = (type(exc) is CheckpointError, str(exc))
    outcome = dist_util.broadcast_object(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    raise (CheckpointError if outcome[0] else ValueError)(outcome[1])


def _incomplete_set_message(ckpt, missing):
    """Why the set cannot be resumed as is: the `missing` paths; names the newest complete set."""
    latest = latest_complete(ckpt.folder)
    if latest is None:
        hint = f"there is no complete set in {ckpt.folder}"
    else:
        hint = f"the newest complete set in {ckpt.folder} is {bf.basename(latest)}"
    return (
        f"cannot resume from {ckpt.model}: {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} missing, so the checkpoint set of step "
        f"{ckpt.step} is incomplete (an interrupted save, a deleted file, or a set written by "
        f"another program); {hint}. Pass --allow_partial_resume True to resume from it anyway "
        f"(without EMA files the EMA starts from the model weights, without the optimizer "
        f"file AdamW starts afresh, without the state file the run is not an exact continuation)"
    )


def prune(folder, keep):
    """
    Keep the newest `keep` complete sets in `folder`; remove every checkpoint
    file of an older step (stale incomplete sets included). No-op when keep <= 0.
    """
    steps = complete_steps(folder)
    if keep <= 0 or len(steps) <= keep:
        return
    oldest_kept = steps[-keep]
    doomed = [n for n in bf.listdir(folder) if _step_of_file(n) is not None and _step_of_file(n) < oldest_kept]
    doomed.sort(key=lambda n: not n.startswith("state"))
    for name in doomed:
        bf.remove(bf.join(folder, name))


def _step_of_file(name):
    """N for a checkpoint file name of any kind, else None."""
    match = _ANY_RE.match(name)
    return int(match.group(1)) if match else None


def remove_stale_temporaries(folder):
    """
    Delete the hidden temporary files of checkpoint names that a save cut
    short (a killed run) left in `folder`; call only while nothing else saves
    there. Returns the removed names.
    """
    if not bf.isdir(folder):
        return []
    stale = sorted(name for name in bf.listdir(folder) if _TEMP_RE.match(name))
    for name in stale:
        bf.remove(bf.join(folder, name))
    return stale
