"""
The diffusion model's training loop: TrainLoop, a thin loop over the training
core (train_core.TrainingCore: microbatches, mixed precision, AdamW with
clipping and the learning-rate schedule, the EMAs and post-hoc EMA profiles,
stop signals, checkpoints that resume exactly). What it adds: the diffusion
losses under timesteps from the schedule sampler, label dropout for
classifier-free guidance, an evaluator of the first EMA during training,
and fine-tuning from other weights whose class count differs
(`load_init_weights`).

Changes from the reference, all deliberate:

- Mixed precision is autocast over float32 weights (see train_core.py): the
  reference's float16 model copy with float32 master weights is gone, so the
  optimizer and EMA always see float32 tensors.
- The number N in checkpoint names is the number of optimizer steps in the
  weights; a resumed run continues bitwise as the uninterrupted one (on CPU;
  same number of ranks), see checkpointing.py for the files.
- A step whose loss or gradient is not finite leaves the weights, the AdamW
  moments and the EMA untouched, on every rank alike; `max_bad_steps` such
  steps in a row end the run with TrainingError.
- With microbatches each microbatch's loss is weighted by its share of the
  batch, so the gradient is the full batch's mean whatever `microbatch` is
  (the reference summed the microbatch means).
- The loss terms are logged without reading them back from the device
  (log_loss_dict).
"""

import copy
import re

import blobfile as bf
import torch

from . import logger
from .checkpoint_layout import load_model_state_dict
from .checkpointing import latest_complete
from .errors import TrainingError
from .resample import LossAwareSampler, UniformSampler
from .train_core import INITIAL_LG_LOSS_SCALE, TrainingCore, get_blob_logdir, log_loss_dict

INITIAL_LOG_LOSS_SCALE = INITIAL_LG_LOSS_SCALE  # the reference's name
LABEL_EMBEDDING = "label_emb.weight"

__all__ = [
    "INITIAL_LG_LOSS_SCALE", "INITIAL_LOG_LOSS_SCALE", "TrainLoop", "check_eval_interval", "load_init_weights",
    "parse_resume_step_from_filename", "get_blob_logdir", "find_resume_checkpoint", "find_ema_checkpoint",
    "log_loss_dict", "TrainingError",
]


class TrainLoop(TrainingCore):
    """
    Trains `model` on batches from `data` with `diffusion`'s training losses.

    :param data: an iterator of (images [N x C x H x W] in [-1, 1], cond dict
        of [N x ...] model kwargs such as "y"); if it has state_dict() and
        load_state_dict(), its position is saved and restored on resume.
    :param batch_size: images per rank per step (the global batch is
        batch_size x ranks).
    :param ema_rate: a float or a comma-separated string such as "0.9999,0.999".
    :param schedule_sampler: the timestep sampler (default uniform).
    :param evaluator: called as evaluator(model, step) on every rank with a
        copy of the model holding the first EMA, every `eval_interval` steps
        and after the last step (not after a stop signal); returns a dict of
        metrics, logged in that step's row (evaluation.TrainingEvaluator).
    :param eval_interval: a multiple of log_interval (0: no evaluation).
    :param class_dropout_prob: replace each label y by the model's null_label
        with this probability (classifier-free guidance training).
    :param options: the other keywords of train_core.TrainingCore (use_bf16,
        seed, max_steps, keep_checkpoints, max_bad_steps, allow_partial_resume,
        run_flags, checkpoint_dir, check_replicas, progress, ema_std,
        ema_snapshot_interval, grad_clip, lr_warmup_steps, save_format,
        init_checkpoint); `run_flags` also name the flags to fix when weights
        do not fit the model.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        evaluator=None,
        eval_interval=0,
        class_dropout_prob=0.0,
        **options,
    ):
        if class_dropout_prob > 0 and getattr(model, "null_label", None) is None:
            raise ValueError("--class_dropout_prob needs a model built with a null label (the same flag builds it)")
        if evaluator is not None:
            check_eval_interval(eval_interval, log_interval)
        self.diffusion = diffusion
        self.class_dropout_prob = class_dropout_prob
        self.evaluator = evaluator
        self.eval_interval = eval_interval
        super().__init__(
            model=model,
            data=data,
            batch_size=batch_size,
            microbatch=microbatch,
            lr=lr,
            ema_rate=ema_rate,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            schedule_sampler=schedule_sampler or UniformSampler(diffusion),
            weight_decay=weight_decay,
            lr_anneal_steps=lr_anneal_steps,
            **options,
        )

    # ----- the core's hooks --------------------------------------------------

    def _step_gradient(self, batch, cond):
        return self.forward_backward(batch, cond)

    def _load_model_weights(self, state, source):
        load_model_state_dict(self.model, state, self.run_flags, source=source)

    def _load_init_weights(self, state, source):
        note = load_init_weights(self.model, state, self.run_flags, source=source)
        if note:
            logger.log(note)

    def _evaluate_if_due(self):
        """Log the evaluator's metrics of the first EMA every eval_interval steps and after the last one."""
        if self.evaluator is None or not (self.step % self.eval_interval == 0 or self._done()):
            return False
        ema_model = copy.deepcopy(self.model).eval()
        ema_model.load_state_dict(self._ema_state_dict(self.ema_params[0]))
        logger.log(f"evaluating the EMA {self.ema_rate[0]} at step {self.step}...")
        for key, value in self.evaluator(ema_model, self.step).items():
            logger.logkv(key, value)
        return True

    # ----- the loss ----------------------------------------------------------

    def forward_backward(self, batch, cond):
        """Accumulate the gradient of the batch's mean loss; return that loss (0-d, detached)."""
        batch = self._to_device(batch)
        cond = self._drop_labels({k: self._to_device(v) for k, v in cond.items()})
        return self._backward_in_parts(
            batch.shape[0], lambda part: self._microbatch_loss(batch[part], {k: v[part] for k, v in cond.items()})
        )

    def _drop_labels(self, cond):
        """Each label becomes the null label with probability class_dropout_prob (Ho & Salimans 2022, Alg. 1)."""
        if not self.class_dropout_prob or "y" not in cond:
            return cond
        y = cond["y"]
        drop = torch.rand(y.shape, generator=self.generator, device=self.generator.device) < self.class_dropout_prob
        return dict(cond, y=torch.where(drop.to(y.device), torch.full_like(y, self.model.null_label), y))

    def _microbatch_loss(self, micro, micro_cond):
        """The microbatch's mean importance-weighted loss (0-d); logs its terms."""
        t, weights = self.schedule_sampler.sample(micro.shape[0], self.device, generator=self.generator)
        losses = self.diffusion.training_losses_at(
            self._model_fn, micro, t, model_kwargs=micro_cond, generator=self.generator
        )
        if isinstance(self.schedule_sampler, LossAwareSampler):
            finite = torch.isfinite(losses["loss"])
            self.schedule_sampler.update_with_local_losses(t[finite], losses["loss"].detach()[finite])
        weighted = {k: v * weights for k, v in losses.items()}
        log_loss_dict(self.diffusion, t, weighted)
        return weighted["loss"].mean()


def load_init_weights(model, state_dict, flags, source="the weights"):
    """
    Load weights to start a new run from (--init_checkpoint): strictly
    (checkpoint_layout.load_model_state_dict, whose errors name the flags to
    fix), except that a label embedding of another class count is left as the
    model made it.

    :param flags: the flags `model` was built from.
    :return: a line saying that the label embedding starts afresh, or None.
    :raises ValueError: for weights that do not fit the model otherwise.
    """
    own = model.state_dict().get(LABEL_EMBEDDING)
    theirs = state_dict.get(LABEL_EMBEDDING)
    if own is None or not isinstance(theirs, torch.Tensor) or theirs.shape == own.shape or theirs.ndim != 2 \
            or theirs.shape[1] != own.shape[1]:
        load_model_state_dict(model, state_dict, flags, source=source)
        return None
    load_model_state_dict(model, {**state_dict, LABEL_EMBEDDING: own}, flags, source=source)
    null = " and the null label" if getattr(model, "null_label", None) is not None else ""
    return (
        f"--init_checkpoint {source}: its label embedding has {theirs.shape[0]} rows, this model's "
        f"{own.shape[0]} (--num_classes {flags.get('num_classes', own.shape[0])}{null}): the label embedding "
        f"starts afresh, every other weight comes from the checkpoint"
    )


def check_eval_interval(eval_interval, log_interval):
    """ValueError unless eval_interval is a positive multiple of log_interval."""
    if eval_interval < 1 or eval_interval % log_interval:
        raise ValueError(
            f"--eval_interval {eval_interval} must be a positive multiple of --log_interval {log_interval}, "
            "so that the metrics land in that step's row of progress.csv"
        )


def parse_resume_step_from_filename(filename):
    """N from a path ending in modelNNNNNN.pt (the updates in it); 0 for any other name."""
    match = re.search(r"model(\d+)\.pt$", bf.basename(filename))
    return int(match.group(1)) if match else 0


def find_resume_checkpoint():
    """
    The model file of the newest complete checkpoint set in get_blob_logdir()
    (what --resume_checkpoint auto resumes from), or None.
    """
    return latest_complete(get_blob_logdir())


def find_ema_checkpoint(main_checkpoint, step, rate):
    """The path of ema_{rate}_{step:06d}.pt beside `main_checkpoint` if that file exists, else None."""
    if not main_checkpoint:
        return None
    path = bf.join(bf.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if bf.exists(path) else None
