"""
Checkpoint sets of a training run: their file names, the order they are
written in, which sets are complete, which one to resume from, and retention.

A set for step N (N = optimizer updates in the weights) is, in write order:

    modelNNNNNN.pt            the UNet's state dict (the reference's format)
    ema_{rate}_NNNNNN.pt      one per EMA rate, same keys as the model
    phema_{std}_MMMMMM.pt     with --ema_std: the post-hoc EMA snapshots taken
                              since the previous set (steps M <= N), same keys
    optNNNNNN.pt              the AdamW state dict
    stateNNNNNN.pt            everything else exact resume needs (written last)

With save_format "safetensors" the model and EMA files are
modelNNNNNN.safetensors and ema_{rate}_NNNNNN.safetensors (the optimizer,
state and snapshot files stay torch pickles); everything below accepts sets of
either format. Snapshots are not needed to resume (the state file holds the
tracked profiles); they belong to the set they were written with.

Each file goes to a temporary name and is renamed (io_util), and the state
file comes last, so a set is complete exactly when its state file exists.
Retention removes a set's state file first, so a half-removed set is never
taken for a complete one, and removes the snapshots written with a removed set
(steps up to its N). Files that scripts/reconstruct_ema.py writes
(ema_std{std}_NNNNNN.pt) are never removed. A save that fails removes what it wrote of its set
and raises CheckpointSaveError, which says which set is the newest complete one.
"""

import re

import blobfile as bf

from . import dist_util
from .io_util import SAFETENSORS_SUFFIX, CheckpointError, atomic_save_checkpoint, import_safetensors
from .posthoc_ema import SNAPSHOT_FILE

SAVE_FORMATS = {"pt": ".pt", "safetensors": SAFETENSORS_SUFFIX}  # save_format -> suffix of model and EMA files
_STEP_DIGITS = r"(\d{6,})"
_WEIGHTS_SUFFIX = r"\.(?:pt|safetensors)"
_MODEL_RE = re.compile(rf"^model{_STEP_DIGITS}{_WEIGHTS_SUFFIX}$")
_STATE_RE = re.compile(rf"^state{_STEP_DIGITS}\.pt$")
# The files of a set: an EMA rate is a float as str() writes it (0.9999, 1e-05), so the rate pattern
# leaves out the ema_std{std}_ files of scripts/reconstruct_ema.py.
_SET_FILE = rf"(?:model|opt|state|ema_[0-9][0-9.e+-]*_){_STEP_DIGITS}{_WEIGHTS_SUFFIX}"
_ANY_RE = re.compile(rf"^{_SET_FILE}$")
_SNAPSHOT_RE = re.compile(rf"^{SNAPSHOT_FILE}$")
_TEMP_RE = re.compile(rf"^\.(?:{_SET_FILE}|{SNAPSHOT_FILE})\.[^.]+\.tmp$")  # io_util's


class CheckpointSaveError(OSError, ValueError):
    """
    A checkpoint set could not be written (disk full, permission denied, a
    store refusing). The message names the set, the cause and the newest
    complete set to resume from. An OSError, and a ValueError so that the
    scripts report it as one `error:` line.
    """


def check_save_format(save_format):
    """
    Check before training what saving in `save_format` needs: ValueError
    unless it is a key of SAVE_FORMATS, CheckpointError when it is
    "safetensors" and the safetensors package is missing.
    """
    _weights_suffix(save_format)
    if save_format == "safetensors":
        import_safetensors("--save_format safetensors")


def _weights_suffix(save_format):
    """The suffix of the model and EMA files of `save_format`; ValueError for an unknown one."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"--save_format {save_format!r}: expected one of {', '.join(SAVE_FORMATS)}")
    return SAVE_FORMATS[save_format]


def format_of_model_path(path):
    """The save_format of a model or EMA file, by its suffix."""
    return "safetensors" if str(path).endswith(SAFETENSORS_SUFFIX) else "pt"


class CheckpointSet:
    """
    The paths of the files of one checkpoint set.

    :param save_format: "pt" or "safetensors", the format of the model and EMA files.
    """

    def __init__(self, folder, step, ema_rates, save_format="pt"):
        suffix = _weights_suffix(save_format)
        self.folder = folder
        self.step = step
        self.save_format = save_format
        self.model = bf.join(folder, f"model{step:06d}{suffix}")
        self.emas = {rate: bf.join(folder, f"ema_{rate}_{step:06d}{suffix}") for rate in ema_rates}
        self.opt = bf.join(folder, f"opt{step:06d}.pt")
        self.state = bf.join(folder, f"state{step:06d}.pt")

    def save(self, model_state, ema_states, opt_state, run_state, snapshots=None):
        """
        Write the set, state file last. If a file cannot be written, the files
        of this set written so far are removed (the temporary file too), and
        CheckpointSaveError says why and which complete set is the newest.

        :param ema_states: {rate: state dict}, one per rate of this set.
        :param snapshots: {file name: state dict} of post-hoc EMA snapshots
            (posthoc_ema.snapshot_filename), written after the EMA files.
        """
        snapshot_files = [(bf.join(self.folder, name), state) for name, state in (snapshots or {}).items()]
        contents = [(self.model, model_state), *((p, ema_states[r]) for r, p in self.emas.items()),
                    *snapshot_files, (self.opt, opt_state), (self.state, run_state)]
        written = []
        for path, content in contents:
            try:
                atomic_save_checkpoint(content, path)
            except Exception as exc:
                left = _remove_all(reversed(written))
                raise CheckpointSaveError(self._failure_message(path, exc, written, left)) from exc
            written.append(path)

    def _failure_message(self, path, exc, written, left):
        """Why the set was not written, what was cleaned up (of `written`, `left` remain) and where to resume from."""
        cause = str(exc) if isinstance(exc, OSError) and str(exc) else f"{type(exc).__name__}: {exc}"
        if left:
            cleanup = f"; could not remove its files {', '.join(left)}, written before the failure"
        else:
            cleanup = f"; its {len(written)} file(s) written before the failure were removed" if written else ""
        try:
            latest = latest_complete(self.folder)
        except Exception as list_exc:  # a store that refuses writes may refuse listings too
            resume = f"the complete sets in {self.folder} could not be listed ({list_exc})"
        else:
            resume = (f"the newest complete set is {latest}: after fixing the cause, resume from it with "
                      f"--resume_checkpoint {latest}" if latest else
                      f"there is no complete checkpoint set in {self.folder} to resume from")
        return (f"cannot write the checkpoint set of step {self.step} in {self.folder}: writing "
                f"{bf.basename(path)} failed ({cause}){cleanup}; earlier sets are untouched; {resume}")


def _remove_all(paths):
    """Remove each path; return those that could not be removed."""
    left = []
    for path in paths:
        try:
            bf.remove(path)
        except Exception:  # noqa: BLE001 (reported by name: the set's error is the one to raise)
            left.append(path)
    return left


def step_from_model_path(path):
    """N from a path to modelNNNNNN.pt (or .safetensors); ValueError naming --resume_checkpoint otherwise."""
    match = _MODEL_RE.match(bf.basename(path))
    if not match:
        raise ValueError(
            f"--resume_checkpoint {path}: expected a file named modelNNNNNN.pt or modelNNNNNN.safetensors "
            f"(the model file of a checkpoint set), a log directory, or 'auto'"
        )
    return int(match.group(1))


def complete_steps(folder):
    """The sorted steps of the complete sets (model and state file present) in `folder`."""
    return sorted(_complete_models(folder))


def latest_complete(folder):
    """The model path of the newest complete set in `folder`, or None."""
    models = _complete_models(folder)
    return bf.join(folder, models[max(models)]) if models else None


def _complete_models(folder):
    """{step: model file name} of the complete sets in `folder` (the .pt file where both formats exist)."""
    if not bf.isdir(folder):
        return {}
    names = set(bf.listdir(folder))
    steps = [int(m.group(1)) for m in map(_STATE_RE.match, names) if m]
    models = {}
    for step in steps:
        for suffix in SAVE_FORMATS.values():
            if f"model{step:06d}{suffix}" in names:
                models.setdefault(step, f"model{step:06d}{suffix}")
    return models


def resolve_resume(resume_checkpoint, log_dir):
    """
    The model path to resume from, or None to start afresh.

    :param resume_checkpoint: "" (start afresh), "auto" (the newest complete
        set in `log_dir`, if any), a directory (its newest complete set, which
        must exist) or a modelNNNNNN.pt or modelNNNNNN.safetensors path.
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
                f"(modelNNNNNN.pt or .safetensors with its stateNNNNNN.pt) in this directory"
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
        ckpt = CheckpointSet(bf.dirname(path), step_from_model_path(path), ema_rates,
                             save_format=format_of_model_path(path))
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
        hint = f"no set there is complete ({ckpt.folder})"
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
    file of an older step (stale incomplete sets included) and the post-hoc
    EMA snapshots written with the removed sets (steps up to the newest
    removed one). No-op when keep <= 0.
    """
    steps = complete_steps(folder)
    if keep <= 0 or len(steps) <= keep:
        return
    oldest_kept, newest_removed = steps[-keep], steps[-keep - 1]
    doomed = []
    for name in bf.listdir(folder):
        step, last = _step_of_file(name, _ANY_RE), oldest_kept - 1
        if step is None:
            step, last = _step_of_file(name, _SNAPSHOT_RE), newest_removed
        if step is not None and step <= last:
            doomed.append(name)
    doomed.sort(key=lambda n: not n.startswith("state"))
    for name in doomed:
        bf.remove(bf.join(folder, name))


def _step_of_file(name, pattern):
    """N for a file name that `pattern` matches (its first group), else None."""
    match = pattern.match(name)
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
