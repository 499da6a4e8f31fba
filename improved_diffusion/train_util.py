"""
The training loop: AdamW, exponential moving averages of the weights,
microbatches, mixed precision, checkpoints that resume exactly, skipped
non-finite steps and a clean stop on SIGTERM / SIGINT.

Changes from the reference, all deliberate:

- Mixed precision is autocast over float32 weights. `use_fp16` runs the model
  under float16 autocast with the reference's dynamic loss scale (lg2 scale
  starts at 20, +fp16_scale_growth after a finite step, -1 after an overflow,
  which is skipped); the reference's float16 model copy with float32 master
  weights is gone, so the optimizer and EMA always see float32 tensors.
  `use_bf16` uses bfloat16 autocast and needs no loss scale.
- The number N in checkpoint names is the number of optimizer steps in the
  weights; a resumed run continues bitwise as the uninterrupted one (on CPU;
  same number of ranks), see checkpointing.py for the files.
- A step whose loss or gradient is not finite leaves the weights, the AdamW
  moments and the EMA untouched, on every rank alike; `max_bad_steps` such
  steps in a row end the run with TrainingError.
- With microbatches each microbatch's loss is weighted by its share of the
  batch, so the gradient is the full batch's mean whatever `microbatch` is
  (the reference summed the microbatch means).
- On a GPU nothing in a step waits for the device: batches are copied
  through pinned memory, the finiteness decision reaches AdamW (fused
  kernel, `found_inf`) and the EMA (a device-side weight) as tensors, and
  statistics accumulate on the device until a log step reads them in one
  transfer. Exceptions: the loss-second-moment sampler reads its losses every
  microbatch, and a health check reads the longest run of skipped steps every
  `max_bad_steps` steps. (On CPU, where reading a flag is free, the EMA
  reads it and uses nn.update_ema's single lerp.)
"""

import contextlib
import copy
import hashlib
import os
import re
import signal

import blobfile as bf
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpoint_layout import load_model_state_dict
from .checkpointing import (CheckpointSaveError, CheckpointSet, latest_complete, plan_resume, prune,
                            remove_stale_temporaries)
from .errors import TrainingError
from .io_util import CheckpointError
from .nn import update_ema
from .precision import warn_if_emulated_bf16
from .progress import TrainingProgress
from .resample import LossAwareSampler, UniformSampler
from .train_state import StepStats, StopRequest, capture_rng, control_group, restore_rng, seed_streams

INITIAL_LG_LOSS_SCALE = 20.0
INITIAL_LOG_LOSS_SCALE = INITIAL_LG_LOSS_SCALE  # the reference's name
STATE_FORMAT = 1


class TrainLoop:
    """
    Trains `model` on batches from `data` with `diffusion`'s training losses.

    :param data: an iterator of (images [N x C x H x W] in [-1, 1], cond dict
        of [N x ...] model kwargs such as "y"); if it has state_dict() and
        load_state_dict(), its position is saved and restored on resume.
    :param batch_size: images per rank per step (the global batch is
        batch_size x ranks).
    :param microbatch: split each batch into parts of this many images for
        gradient accumulation; -1 or 0: no split.
    :param ema_rate: a float or a comma-separated string such as "0.9999,0.999".
    :param resume_checkpoint: "" (start afresh), a modelNNNNNN.pt path, a log
        directory (its newest complete set) or "auto" (the newest complete set
        in `checkpoint_dir`, if any).
    :param lr_anneal_steps: decay the learning rate linearly to 0 over this
        many steps, then stop (0: constant, no end).
    :param use_bf16: bfloat16 autocast (excludes use_fp16).
    :param seed: seeds this rank's dropout and sampling streams (mixed with
        the rank); None: draw them from torch's global generator.
    :param max_steps: stop after this many optimizer steps in all (0: no
        limit); unlike lr_anneal_steps, the learning rate is unaffected.
    :param keep_checkpoints: keep only this many newest complete checkpoint
        sets (0: all); older ones are deleted after a new set is complete.
    :param max_bad_steps: end the run after this many non-finite steps in a
        row (0: never).
    :param allow_partial_resume: accept a set without its EMA, optimizer or
        state files (EMA from the model, fresh AdamW, inexact continuation).
    :param run_flags: the run's flags (plain data), saved in state files and
        used to name the flags to fix when weights do not fit the model.
    :param checkpoint_dir: where checkpoints go; default the logger's directory.
    :param check_replicas: at each save, check that every rank holds bitwise
        the same weights (raises RuntimeError otherwise).
    :param evaluator: called as evaluator(model, step) on every rank with a
        copy of the model holding the first EMA, every `eval_interval` steps
        and after the last step (not after a stop signal); returns a dict of
        metrics, logged in that step's row (evaluation.TrainingEvaluator).
    :param eval_interval: a multiple of log_interval (0: no evaluation).
    :param class_dropout_prob: replace each label y by the model's null_label
        with this probability (classifier-free guidance training).
    :param progress: a progress.TrainingProgress told of every step (None: none).
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
        use_bf16=False,
        seed=None,
        max_steps=0,
        keep_checkpoints=0,
        max_bad_steps=20,
        allow_partial_resume=False,
        run_flags=None,
        checkpoint_dir=None,
        check_replicas=False,
        evaluator=None,
        eval_interval=0,
        class_dropout_prob=0.0,
        progress=None,
    ):
        self.progress = progress or TrainingProgress(enabled=False)
        if class_dropout_prob > 0 and getattr(model, "null_label", None) is None:
            raise ValueError("--class_dropout_prob needs a model built with a null label (the same flag builds it)")
        self.class_dropout_prob = class_dropout_prob
        if use_fp16 and use_bf16:
            raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
        if evaluator is not None:
            check_eval_interval(eval_interval, log_interval)
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = _parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.keep_checkpoints = keep_checkpoints
        self.max_bad_steps = max_bad_steps
        self.allow_partial_resume = allow_partial_resume
        self.run_flags = dict(run_flags or {})
        self.checkpoint_dir = checkpoint_dir or get_blob_logdir()
        self.check_replicas = check_replicas
        self.evaluator = evaluator
        self.eval_interval = eval_interval
        self.evaluated_step = None

        self.device = next(model.parameters()).device
        self.rank = dist_util.get_rank() if dist_util.is_initialized() else 0
        self.world_size = dist_util.get_world_size() if dist_util.is_initialized() else 1
        self.autocast_dtype = torch.float16 if use_fp16 else torch.bfloat16 if use_bf16 else None
        if use_bf16:
            warn_if_emulated_bf16(dist_util.dev())
        self.step = 0
        self.saved_step = None
        self.stop = StopRequest()
        self.stop_signal = None

        self.seed = seed
        self.generator = torch.Generator(self.device)
        self._seed_streams()
        self.params = list(model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=True)
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rate]
        self.lg_loss_scale = self._f64(INITIAL_LG_LOSS_SCALE) if use_fp16 else None
        self._lg_growth, self._lg_drop = self._f64(fp16_scale_growth), self._f64(-1.0)
        self.stats = StepStats(diffusion.num_timesteps, self.device)
        self.ddp_model = self._wrap_ddp()
        self._control_group = control_group(self.world_size)
        self._resume(resume_checkpoint)

    # ----- setup -------------------------------------------------------------

    def _f64(self, value):
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def _seed_streams(self):
        """Seed dropout (torch's global generator) and timestep/noise sampling (self.generator) for self.step."""
        seed_streams(self.generator, self.seed, self.rank, self.step)

    def _wrap_ddp(self):
        """The model, wrapped in DistributedDataParallel when there are several ranks."""
        if self.world_size == 1:
            return self.model
        return DDP(
            self.model,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            bucket_cap_mb=128,
            find_unused_parameters=False,
        )

    # ----- resume ------------------------------------------------------------

    def _resume(self, resume_checkpoint):
        """Load the checkpoint set that `resume_checkpoint` designates, if any (every rank)."""
        plan = plan_resume(resume_checkpoint, self.checkpoint_dir, self.ema_rate)
        if plan is None:
            return
        ckpt, missing, message = plan
        if missing and not self.allow_partial_resume:
            raise CheckpointError(message)
        if missing:
            logger.log(f"warning: resuming from an incomplete set (--allow_partial_resume): {message}")
        logger.log(f"loading model from checkpoint: {ckpt.model}...")
        state = dist_util.load_state_dict(ckpt.model)
        load_model_state_dict(self.model, state, self.run_flags, source=ckpt.model)
        self.step = self.saved_step = ckpt.step
        for rate, ema in zip(self.ema_rate, self.ema_params):
            if ckpt.emas[rate] in missing:
                torch._foreach_copy_(ema, [p.detach() for p in self.params])
            else:
                logger.log(f"loading EMA from checkpoint: {ckpt.emas[rate]}...")
                self._load_ema(ema, ckpt.emas[rate])
        if ckpt.opt not in missing:
            logger.log(f"loading optimizer state from checkpoint: {ckpt.opt}...")
            self._load_opt(ckpt.opt)
        if ckpt.state in missing:
            self._seed_streams()
        else:
            self._load_run_state(ckpt.state, ckpt.step)

    def _load_ema(self, ema, path):
        """Copy the parameters of the model state dict at `path` into the EMA list `ema`."""
        state = dist_util.load_state_dict(path)
        for (name, param), target in zip(self.model.named_parameters(), ema):
            value = state.get(name)
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing"
                raise CheckpointError(
                    f"{path} is not an EMA of this model: parameter {name} is {found}, "
                    f"expected shape {tuple(param.shape)}"
                )
            target.copy_(value)

    def _load_opt(self, path):
        """
        Load an AdamW state dict, this library's or the reference's (whose
        torch may have saved `step` as a number and fewer group settings);
        this run's fused kernel and weight decay apply.
        """
        state = dist_util.load_state_dict(path)
        try:
            for group in state["param_groups"]:
                group.update(fused=True, foreach=None, weight_decay=self.weight_decay)
            for param_state in state["state"].values():
                param_state["step"] = torch.as_tensor(param_state["step"], dtype=torch.float32)
            self.opt.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path} does not fit this model's parameters ({exc}); an optimizer state from a "
                f"--use_fp16 run of the reference (one flattened parameter) cannot be loaded: move "
                f"the file aside and pass --allow_partial_resume True to start AdamW afresh"
            ) from exc

    def _load_run_state(self, path, step):
        """Restore what exact resume needs from the state file of step `step`."""
        state = dist_util.load_state_dict(path)
        if state.get("format") != STATE_FORMAT or state.get("step") != step:
            raise CheckpointError(f"{path} is not the state file of step {step} written by this library")
        self._warn_changed_flags(state["flags"])
        if state["sampler"] and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state["sampler"])
        if self.use_fp16 and state["lg_loss_scale"] is not None:
            self.lg_loss_scale.fill_(state["lg_loss_scale"])
        self.stats.load_state_dict(state["stats"])
        if state["world_size"] != self.world_size:
            self._accept_other_world_size(path, state["world_size"])
            return
        mine = state["ranks"][self.rank]
        restore_rng(mine["rng"], self.generator)
        if mine["data"] is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(mine["data"])

    def _accept_other_world_size(self, path, saved_world_size):
        message = (
            f"{path} was written by a run with {saved_world_size} rank(s), this run has "
            f"{self.world_size}: the random streams and data positions are per rank, so "
            f"the continuation cannot be exact"
        )
        if not self.allow_partial_resume:
            raise CheckpointError(message + "; pass --allow_partial_resume True to continue anyway")
        logger.log(f"warning: {message}; continuing with fresh streams")
        self._seed_streams()

    def _warn_changed_flags(self, saved_flags):
        changed = sorted(
            k for k in set(saved_flags) & set(self.run_flags)
            if k != "resume_checkpoint" and saved_flags[k] != self.run_flags[k]
        )
        if changed:
            details = ", ".join(f"{k}: {saved_flags[k]!r} -> {self.run_flags[k]!r}" for k in changed)
            logger.log(f"warning: flags changed since the checkpoint was saved ({details})")

    # ----- the loop ----------------------------------------------------------

    def run_loop(self):
        """
        Train until lr_anneal_steps or max_steps (if set) or a stop signal,
        logging every log_interval steps and saving every save_interval steps
        and at the end. After SIGTERM or SIGINT (on any rank) every rank
        finishes its step, the set is saved and the loop returns with
        `stop_signal` set.
        """
        self.progress.begin(self.step, self._last_step())
        with self.stop.installed():
            while not self._done():
                batch, cond = next(self.data)
                loss = self.run_step(batch, cond)
                self.progress.update(self.step, loss)
                self._after_step()
                if self._stop_agreed():
                    break
            self.progress.close()
            if self.saved_step != self.step:
                self.save()
        if self.stop_signal is not None:
            logger.log(f"stopped by {signal.Signals(self.stop_signal).name} after saving step {self.step}")

    def _last_step(self):
        """The step the run ends at (the nearer of lr_anneal_steps and max_steps), or None."""
        ends = [n for n in (self.lr_anneal_steps, self.max_steps) if n]
        return min(ends) if ends else None

    def _done(self):
        return bool(
            (self.lr_anneal_steps and self.step >= self.lr_anneal_steps)
            or (self.max_steps and self.step >= self.max_steps)
        )

    def _after_step(self):
        if self.evaluator is not None and (self.step % self.eval_interval == 0 or self._done()):
            self._evaluate()
        if self.step % self.log_interval == 0:
            self._log_interval()
        elif self.evaluated_step == self.step:
            logger.logkv("step", self.step)
            logger.dumpkvs()
        elif self.max_bad_steps and self.step % self.max_bad_steps == 0:
            self._check_bad_streak(int(self.stats.longest_bad_streak.item()))
        if self.step % self.save_interval == 0:
            self.save()

    def _stop_agreed(self):
        """Whether any rank received a stop signal (the same answer on every rank)."""
        self.stop_signal = self.stop.agreed(self.world_size, self._control_group)
        return self.stop_signal is not None

    def run_step(self, batch, cond):
        """
        One optimizer step on this rank's batch (the gradient is averaged over ranks).

        :param batch: [N x C x H x W] images in [-1, 1].
        :param cond: dict of [N x ...] model keyword arguments.
        :return: the batch's mean loss (0-d, detached, on the device).
        """
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_backward(batch, cond)
        self._optimize(loss)
        self.step += 1
        self.log_step()
        return loss

    def forward_backward(self, batch, cond):
        """Accumulate the gradient of the batch's mean loss; return that loss (0-d, detached)."""
        batch = self._to_device(batch)
        cond = self._drop_labels({k: self._to_device(v) for k, v in cond.items()})
        total = torch.zeros((), device=self.device)
        for start in range(0, batch.shape[0], self.microbatch):
            part = slice(start, start + self.microbatch)
            micro, micro_cond = batch[part], {k: v[part] for k, v in cond.items()}
            is_last = start + self.microbatch >= batch.shape[0]
            with self._no_sync_unless(is_last):
                loss = self._microbatch_loss(micro, micro_cond) * (micro.shape[0] / batch.shape[0])
                scale = self._loss_scale()
                (loss if scale is None else loss * scale).backward()
            total += loss.detach()
        return total

    def _drop_labels(self, cond):
        """Each label becomes the null label with probability class_dropout_prob (Ho & Salimans 2022, Alg. 1)."""
        if not self.class_dropout_prob or "y" not in cond:
            return cond
        y = cond["y"]
        drop = torch.rand(y.shape, generator=self.generator, device=self.generator.device) < self.class_dropout_prob
        return dict(cond, y=torch.where(drop.to(y.device), torch.full_like(y, self.model.null_label), y))

    def _to_device(self, tensor):
        """`tensor` on the training device; CPU to GPU through pinned memory, so the host does not wait."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _no_sync_unless(self, is_last):
        """DDP's no_sync (gradients stay local) for all but the last microbatch."""
        if is_last or self.world_size == 1:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _microbatch_loss(self, micro, micro_cond):
        """The microbatch's mean importance-weighted loss (0-d); logs its terms."""
        t, weights = self.schedule_sampler.sample(micro.shape[0], self.device, generator=self.generator)
        losses = self.diffusion.training_losses(
            self._model_fn, micro, t, model_kwargs=micro_cond, generator=self.generator
        )
        if isinstance(self.schedule_sampler, LossAwareSampler):
            finite = torch.isfinite(losses["loss"])
            self.schedule_sampler.update_with_local_losses(t[finite], losses["loss"].detach()[finite])
        weighted = {k: v * weights for k, v in losses.items()}
        for key, values in weighted.items():
            logger.logkv_mean(key, values.mean().detach())
        self.stats.add_losses(t, weighted)
        return weighted["loss"].mean()

    def _model_fn(self, x, t, **kwargs):
        """The (DDP-wrapped) model under autocast when mixed precision is on; float32 output."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.ddp_model(x, t, **kwargs).float()

    def _loss_scale(self):
        """2 ** lg_loss_scale as a float32 0-d tensor with use_fp16, else None."""
        return None if self.lg_loss_scale is None else torch.exp2(self.lg_loss_scale).float()

    def _optimize(self, loss):
        """Apply the step if loss and gradient are finite on every rank; update EMA, loss scale, stats."""
        scale = self._loss_scale()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if scale is not None:
            grad_norm = grad_norm / scale
        ok = self._agree(torch.isfinite(grad_norm) & torch.isfinite(loss))
        for group in self.opt.param_groups:
            group["lr"] = self._current_lr()
        self.opt.grad_scale = scale
        self.opt.found_inf = (~ok).float()
        self.opt.step()
        self._update_emas(ok)
        if self.lg_loss_scale is not None:
            self.lg_loss_scale += torch.where(ok, self._lg_growth, self._lg_drop)
        self.stats.add_step(ok, grad_norm)

    def _update_emas(self, ok):
        """
        Move each EMA toward the weights unless the step was skipped (`ok` false).
        On CPU, reading `ok` costs nothing and nn.update_ema's lerp is cheapest;
        elsewhere lerp would read its weight on the host, so the update is
        ema += (1 - rate) * ok * (params - ema) with the weight on the device.
        """
        params = [p.detach() for p in self.params]
        if self.device.type == "cpu":
            if ok.item():
                for rate, ema in zip(self.ema_rate, self.ema_params):
                    update_ema(ema, params, rate=rate)
            return
        for rate, ema in zip(self.ema_rate, self.ema_params):
            deltas = torch._foreach_sub(params, ema)
            torch._foreach_mul_(deltas, ok * (1.0 - rate))
            torch._foreach_add_(ema, deltas)

    def _agree(self, ok):
        """`ok` (0-d bool) and-ed over ranks, without waiting on the device."""
        if self.world_size == 1:
            return ok
        flag = ok.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag > 0

    def _current_lr(self):
        """The learning rate of the step about to be taken (linear decay with lr_anneal_steps)."""
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * (1 - self.step / self.lr_anneal_steps)

    # ----- logging -----------------------------------------------------------

    def log_step(self):
        """Log the position after a step: updates so far and samples seen by all ranks."""
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.batch_size * self.world_size)

    def _log_interval(self):
        """Write the interval's statistics (one device read) and check the bad-step streak."""
        info = self.stats.read()
        for key, value in info["quartiles"].items():
            logger.logkv(key, value)
        if info["grad_norm"] is not None:
            logger.logkv("grad_norm", info["grad_norm"])
        logger.logkv("bad_steps", info["bad_steps"])
        if self.lg_loss_scale is not None:
            logger.logkv("lg_loss_scale", self.lg_loss_scale)
        logger.dumpkvs()
        if info["bad_steps"]:
            logger.log(
                f"skipped {info['bad_steps']} step(s) with a non-finite loss or gradient in the "
                f"last {self.log_interval} (weights and EMA unchanged by them)"
            )
        self._check_bad_streak(info["longest_bad_streak"])

    def _check_bad_streak(self, longest):
        if self.max_bad_steps and longest >= self.max_bad_steps:
            last = f"; the last saved checkpoint is of step {self.saved_step}" if self.saved_step else ""
            raise TrainingError(
                f"stopping at step {self.step}: {longest} steps in a row had a non-finite loss or "
                f"gradient (--max_bad_steps {self.max_bad_steps}); the weights have not changed since "
                f"the last finite step{last}. Check the data, lower --lr, or use --use_bf16 instead "
                f"of --use_fp16"
            )

    def _evaluate(self):
        """Log the evaluator's metrics of the first EMA (a copy of the model holding it, in eval mode)."""
        ema_model = copy.deepcopy(self.model).eval()
        ema_model.load_state_dict(self._ema_state_dict(self.ema_params[0]))
        logger.log(f"evaluating the EMA {self.ema_rate[0]} at step {self.step}...")
        for key, value in self.evaluator(ema_model, self.step).items():
            logger.logkv(key, value)
        self.evaluated_step = self.step

    # ----- saving ------------------------------------------------------------

    def save(self):
        """
        Write the checkpoint set of the current step (call on every rank: the
        per-rank random and data states are gathered; only rank 0 writes).
        """
        run_state = self._run_state()
        if self.check_replicas:
            self._check_replicas_identical()
        ckpt = CheckpointSet(self.checkpoint_dir, self.step, self.ema_rate)
        error = None
        if self.rank == 0:
            logger.log(f"saving checkpoint set of step {self.step} in {self.checkpoint_dir}...")
            try:
                ema_states = {r: self._ema_state_dict(ema) for r, ema in zip(self.ema_rate, self.ema_params)}
                ckpt.save(self.model.state_dict(), ema_states, self.opt.state_dict(), run_state)
                prune(self.checkpoint_dir, self.keep_checkpoints)
                for name in remove_stale_temporaries(self.checkpoint_dir):
                    logger.log(f"removed {name}, left by a save that was cut short")
            except Exception as exc:
                same_error = isinstance(exc, CheckpointSaveError)
                error = (same_error, str(exc) if same_error else f"{type(exc).__name__}: {exc}")
                dist_util.broadcast_object(error)
                raise
        error = dist_util.broadcast_object(error)
        if error is not None:
            same_error, text = error
            if same_error:  # the set was not written: every rank ends with rank 0's message
                raise CheckpointSaveError(text)
            raise RuntimeError(f"rank 0 failed to save the checkpoint set of step {self.step}: {text}")
        self.saved_step = self.step

    def _ema_state_dict(self, ema):
        """The model's state dict with the EMA values in place of the parameters."""
        state = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), ema):
            state[name] = value
        return state

    def _run_state(self):
        """Everything beyond weights and AdamW that exact resume needs (gathers every rank's part)."""
        local = {
            "rng": capture_rng(self.generator),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }
        sampler = self.schedule_sampler
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "flags": self.run_flags,
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
            "lg_loss_scale": None if self.lg_loss_scale is None else self.lg_loss_scale.item(),
            "stats": self.stats.state_dict(),
            "ranks": dist_util.all_gather_object(local),
        }

    def _check_replicas_identical(self):
        """Raise RuntimeError on every rank unless all ranks hold bitwise the same weights and EMA."""
        digest = hashlib.sha256()
        for tensor in self.params + [p for ema in self.ema_params for p in ema]:
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = dist_util.all_gather_object(digest.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"replicas differ at step {self.step}: weight digests by rank {digests}")
        logger.log(f"replicas identical at step {self.step} on {len(digests)} rank(s) (sha256 {digests[0][:16]})")


def check_eval_interval(eval_interval, log_interval):
    """ValueError unless eval_interval is a positive multiple of log_interval."""
    if eval_interval < 1 or eval_interval % log_interval:
        raise ValueError(
            f"--eval_interval {eval_interval} must be a positive multiple of --log_interval {log_interval}, "
            "so that the metrics land in that step's row of progress.csv"
        )


def _parse_ema_rates(ema_rate):
    """[0.9999, ...] from a float or a comma-separated string."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    return [float(x) for x in str(ema_rate).split(",") if x.strip()]


def parse_resume_step_from_filename(filename):
    """N from a path ending in modelNNNNNN.pt (the updates in it); 0 for any other name."""
    match = re.search(r"model(\d+)\.pt$", bf.basename(filename))
    return int(match.group(1)) if match else 0


def get_blob_logdir():
    """Where checkpoints go by default: $DIFFUSION_BLOB_LOGDIR if set, else the logger's directory."""
    return os.environ.get("DIFFUSION_BLOB_LOGDIR") or logger.get_dir()


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


def log_loss_dict(diffusion, ts, losses):
    """
    logkv_mean of each loss term's batch mean, and of its mean in each quarter
    of the timesteps as KEY_q0 ... KEY_q3.

    :param ts: [N] timesteps; :param losses: dict of [N] loss terms.
    """
    quartiles = (4 * ts.detach().cpu() // diffusion.num_timesteps).tolist()
    for key, values in losses.items():
        values = values.detach().float().cpu()
        logger.logkv_mean(key, values.mean().item())
        for quartile, value in zip(quartiles, values.tolist()):
            logger.logkv_mean(f"{key}_q{int(quartile)}", value)
