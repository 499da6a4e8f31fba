"""
The training core under every training loop (SPEC §17): TrainLoop (diffusion
models, train_util.py) and ClassifierTrainLoop (noisy classifiers,
classifier_util.py) subclass TrainingCore and add only their loss and what
they log. The core owns:

- microbatches, each weighted by its share of the batch (so the gradient is
  the full batch's mean whatever `microbatch` is), and DDP's no_sync;
- mixed precision over float32 weights: `use_fp16` is float16 autocast with
  the reference's dynamic loss scale (lg2 scale starts at 20,
  +fp16_scale_growth after a finite step, -1 after an overflow, which is
  skipped); `use_bf16` is bfloat16 autocast, without a loss scale;
- the update: AdamW (fused), gradient clipping (`grad_clip`), the learning
  rate (warm-up, linear decay), and a step whose loss or gradient is not
  finite leaving the weights, the AdamW moments and every average untouched,
  on every rank alike (`max_bad_steps` such steps in a row end the run);
- the averages of the weights: the EMAs of `ema_rate` and the power-function
  profiles of `ema_std` (post-hoc EMA, posthoc_ema.py) with their snapshots;
- stop agreement across ranks (SIGTERM / SIGINT at a step boundary);
- checkpoint sets (checkpointing.py), written by rank 0, a failure raised on
  every rank; exact resume; starting from other weights (`init_checkpoint`);
- progress and the log rows.

On a GPU nothing in a step waits for the device: batches are copied through
pinned memory, the finiteness decision and the clipping factor reach AdamW
(fused kernel, `found_inf`) and the averages as tensors, and statistics stay
on the device until a log step reads them. Exceptions: the loss-second-moment
sampler reads its losses every microbatch, and a health check reads the
longest run of skipped steps every `max_bad_steps` steps. (On CPU, where
reading a flag is free, the EMA reads it and uses nn.update_ema's single lerp.)
"""

import contextlib
import hashlib
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpointing import (CheckpointSaveError, CheckpointSet, check_save_format, plan_resume, prune,
                            remove_stale_temporaries)
from .errors import TrainingError
from .io_util import CheckpointError
from .nn import update_ema
from .posthoc_ema import PowerFunctionEMA, check_stds, parse_stds, snapshot_filename
from .precision import warn_if_emulated_bf16
from .progress import TrainingProgress
from .train_state import StepStats, StopRequest, capture_rng, control_group, restore_rng, seed_streams

INITIAL_LG_LOSS_SCALE = 20.0
STATE_FORMAT = 1
CLIP_EPS = 1e-6  # added to the norm in the clipping factor, as torch.nn.utils.clip_grad_norm_ does


class TrainingCore:
    """
    The shared part of the training loops. A subclass implements
    `_step_gradient(batch, cond)` (accumulate the gradient of one batch,
    return its mean loss) and `_load_model_weights(state, source)`, and may
    override `_evaluate_if_due()`, `_load_init_weights(state, source)` and
    `_loaders()`.

    :param model: the network; its parameters are trained.
    :param data: an iterator of (batch, cond); if it has state_dict() and
        load_state_dict(), its position is saved and restored on resume.
    :param batch_size: examples per rank per step (the global batch is
        batch_size x ranks).
    :param microbatch: split each batch into parts of this many examples for
        gradient accumulation; -1 or 0: no split.
    :param resume_checkpoint: "" (start afresh), a modelNNNNNN.pt path, a log
        directory (its newest complete set) or "auto" (the newest complete set
        in `checkpoint_dir`, if any).
    :param schedule_sampler: the timestep sampler, whose state (if it has
        state_dict()) is saved and restored.
    :param ema_rate: EMA rates, a float, a list or a comma-separated string
        such as "0.9999,0.999" ("" or []: none).
    :param ema_std: sigma_rel of the power-function EMA profiles to track
        (post-hoc EMA), a list or a comma-separated string ("" or []: none).
    :param ema_snapshot_interval: snapshot every profile every this many
        steps (0: at every save); the snapshots are written with the next
        checkpoint set.
    :param lr_anneal_steps: decay the learning rate linearly to 0 over this
        many steps, then stop (0: constant, no end).
    :param lr_warmup_steps: multiply the learning rate of update n = 1..K by
        n / K (linear warm-up from 0; 0: none).
    :param grad_clip: scale the gradient down to this global norm when it is
        longer (0: no clipping); the logged grad_norm is the norm before.
    :param use_bf16: bfloat16 autocast (excludes use_fp16).
    :param seed: seeds this rank's dropout and sampling streams (mixed with
        the rank); None: draw them from torch's global generator.
    :param max_steps: stop after this many optimizer steps in all (0: no
        limit); unlike lr_anneal_steps, the learning rate is unaffected.
    :param keep_checkpoints: keep only this many newest complete checkpoint
        sets (0: all); older ones, and the snapshots written with them, are
        deleted after a new set is complete.
    :param max_bad_steps: end the run after this many non-finite steps in a
        row (0: never).
    :param allow_partial_resume: accept a set without its EMA, optimizer or
        state files (EMA from the model, fresh AdamW, inexact continuation).
    :param run_flags: the run's flags (plain data), saved in state files.
    :param checkpoint_dir: where checkpoints go; default get_blob_logdir().
    :param check_replicas: at each save, check that every rank holds bitwise
        the same weights (raises RuntimeError otherwise).
    :param progress: a progress.TrainingProgress told of every step (None: none).
    :param save_format: "pt" or "safetensors", the format of the model and EMA files.
    :param init_checkpoint: start from the weights in this file (with a fresh
        optimizer, averages, step count and schedule) unless the run resumes.
    """

    def __init__(
        self,
        *,
        model,
        data,
        batch_size,
        microbatch,
        lr,
        log_interval,
        save_interval,
        resume_checkpoint,
        schedule_sampler=None,
        ema_rate=(),
        ema_std=(),
        ema_snapshot_interval=0,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        use_bf16=False,
        weight_decay=0.0,
        lr_anneal_steps=0,
        lr_warmup_steps=0,
        grad_clip=0.0,
        seed=None,
        max_steps=0,
        keep_checkpoints=0,
        max_bad_steps=20,
        allow_partial_resume=False,
        run_flags=None,
        checkpoint_dir=None,
        check_replicas=False,
        progress=None,
        save_format="pt",
        init_checkpoint="",
    ):
        check_update_options(use_fp16=use_fp16, use_bf16=use_bf16, grad_clip=grad_clip,
                             lr_warmup_steps=lr_warmup_steps, ema_snapshot_interval=ema_snapshot_interval)
        check_save_format(save_format)
        self.model = model
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.schedule_sampler = schedule_sampler
        self.ema_rate = parse_ema_rates(ema_rate)
        self.ema_std = parse_ema_stds(ema_std)
        self.ema_snapshot_interval = ema_snapshot_interval
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.lr_warmup_steps = lr_warmup_steps
        self.grad_clip = grad_clip
        self.max_steps = max_steps
        self.keep_checkpoints = keep_checkpoints
        self.max_bad_steps = max_bad_steps
        self.allow_partial_resume = allow_partial_resume
        self.run_flags = dict(run_flags or {})
        self.checkpoint_dir = checkpoint_dir or get_blob_logdir()
        self.check_replicas = check_replicas
        self.progress = progress or TrainingProgress(enabled=False)
        self.save_format = save_format

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
        plan = plan_resume(resume_checkpoint, self.checkpoint_dir, self.ema_rate)
        if plan is None and init_checkpoint:
            self._start_from(init_checkpoint)
        elif init_checkpoint:
            logger.log(f"resuming the run in {plan[0].folder}: --init_checkpoint {init_checkpoint} only starts a run")
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rate]
        self.posthoc = PowerFunctionEMA(self.params, self.ema_std) if self.ema_std else None
        self.pending_snapshots = {}  # rank 0: {file name: host state dict} taken since the last save
        self.lg_loss_scale = self._f64(INITIAL_LG_LOSS_SCALE) if use_fp16 else None
        self._lg_growth, self._lg_drop = self._f64(fp16_scale_growth), self._f64(-1.0)
        self.stats = StepStats(self.device)
        self.ddp_model = self._wrap_ddp()
        self._control_group = control_group(self.world_size)
        if plan is not None:
            self._resume(*plan)

    # ----- what a loop adds --------------------------------------------------

    def _step_gradient(self, batch, cond):
        """Accumulate the gradient of one batch's mean loss; return that loss (0-d, detached)."""
        raise NotImplementedError

    def _load_model_weights(self, state, source):
        """Load the state dict `state` (read from `source`) into the model, strictly."""
        raise NotImplementedError

    def _load_init_weights(self, state, source):
        """Load `state` for init_checkpoint; by default as strictly as a resumed model file."""
        self._load_model_weights(state, source)

    def _evaluate_if_due(self):
        """Evaluate after this step if due; True when that logged values that need a row now."""
        return False

    def _loaders(self):
        """{name: iterator} whose positions the state file keeps per rank."""
        return {"data": self.data}

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

    def _start_from(self, path):
        """Load the weights of `path` (init_checkpoint) on every rank."""
        logger.log(f"starting from the weights in {path} (fresh optimizer, averages, step count and schedule)...")
        self._load_init_weights(dist_util.load_state_dict(path), path)

    # ----- resume ------------------------------------------------------------

    def _resume(self, ckpt, missing, message):
        """Load the checkpoint set `ckpt` (checkpointing.plan_resume's plan) on every rank."""
        if missing and not self.allow_partial_resume:
            raise CheckpointError(message)
        if missing:
            logger.log(f"warning: resuming from an incomplete set (--allow_partial_resume): {message}")
        logger.log(f"loading model from checkpoint: {ckpt.model}...")
        self._load_model_weights(dist_util.load_state_dict(ckpt.model), ckpt.model)
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
            self._restart_posthoc()
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
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("step") != step:
            raise CheckpointError(f"{path} is not the state file of step {step} written by this library")
        self._warn_changed_flags(state["flags"])
        if state["sampler"] and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state["sampler"])
        if self.use_fp16 and state.get("lg_loss_scale") is not None:
            self.lg_loss_scale.fill_(state["lg_loss_scale"])
        if state.get("stats") is not None:
            self.stats.load_state_dict(state["stats"])
        self._load_posthoc(state.get("posthoc_ema"), path)
        if state["world_size"] != self.world_size:
            self._accept_other_world_size(path, state["world_size"])
            return
        mine = state["ranks"][self.rank]
        restore_rng(mine["rng"], self.generator)
        for name, loader in self._loaders().items():
            if mine.get(name) is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(mine[name])

    def _load_posthoc(self, saved, path):
        """Restore the tracked profiles of `ema_std` from a state file's (None when it has none)."""
        if self.posthoc is None:
            return
        saved_stds = [] if saved is None else [float(s) for s in saved["stds"]]
        if saved_stds == self.ema_std:
            self.posthoc.load_state_dict(saved)
            return
        had = ",".join(f"{s:g}" for s in saved_stds) or "none"
        message = (f"{path} tracks the post-hoc EMA profiles --ema_std {had}, this run "
                   f"{','.join(f'{s:g}' for s in self.ema_std)}")
        if not self.allow_partial_resume:
            raise CheckpointError(
                f"{message}: resume with the run's --ema_std, or pass --allow_partial_resume True to start "
                f"these profiles from the current weights"
            )
        logger.log(f"warning: {message}; the profiles start from the current weights")
        self._restart_posthoc()

    def _restart_posthoc(self):
        """Start every tracked profile from the current weights, as if they had not changed for self.step updates."""
        if self.posthoc is not None:
            self.posthoc.restart(self.step)

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
        last = self._last_step()
        return last is not None and self.step >= last

    def _after_step(self):
        if self.posthoc is not None and self.ema_snapshot_interval and self.step % self.ema_snapshot_interval == 0:
            self._take_snapshots()
        evaluated = self._evaluate_if_due()
        if self.step % self.log_interval == 0:
            self._log_interval()
        elif evaluated:
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
        :param cond: dict of [N x ...] conditioning (model keyword arguments, labels "y").
        :return: the batch's mean loss (0-d, detached, on the device).
        """
        self.opt.zero_grad(set_to_none=True)
        loss = self._step_gradient(batch, cond)
        self._optimize(loss)
        self.step += 1
        self.log_step()
        return loss

    def _parts(self, size):
        """(slice, is_last) of each microbatch of a batch of `size`."""
        return [(slice(s, s + self.microbatch), s + self.microbatch >= size) for s in range(0, size, self.microbatch)]

    def _backward_in_parts(self, size, part_loss):
        """
        Accumulate the gradient of a batch of `size` examples microbatch by
        microbatch: part_loss(slice) is the 0-d mean loss of a part, weighted
        by the part's share of the batch (DDP syncs on the last part only).
        Returns the batch's mean loss (0-d, detached).
        """
        total = torch.zeros((), device=self.device)
        for part, is_last in self._parts(size):
            with self._no_sync_unless(is_last):
                loss = part_loss(part) * ((min(part.stop, size) - part.start) / size)
                scale = self._loss_scale()
                (loss if scale is None else loss * scale).backward()
            total += loss.detach()
        return total

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

    def _model_fn(self, x, t, **kwargs):
        """The (DDP-wrapped) model under autocast when mixed precision is on; float32 output."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.ddp_model(x, t, **kwargs).float()

    def _loss_scale(self):
        """2 ** lg_loss_scale as a float32 0-d tensor with use_fp16, else None."""
        return None if self.lg_loss_scale is None else torch.exp2(self.lg_loss_scale).float()

    def _optimize(self, loss):
        """Apply the step if loss and gradient are finite on every rank; update the averages, loss scale, stats."""
        scale = self._loss_scale()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if scale is not None:
            grad_norm = grad_norm / scale
        ok = self._agree(torch.isfinite(grad_norm) & torch.isfinite(loss))
        if self.grad_clip:
            torch._foreach_mul_(grads, clip_factor(grad_norm, self.grad_clip))
        for group in self.opt.param_groups:
            group["lr"] = self._current_lr()
        self.opt.grad_scale = scale
        self.opt.found_inf = (~ok).float()
        self.opt.step()
        self._update_emas(ok)
        if self.posthoc is not None:
            self.posthoc.update(self.step + 1)
        if self.lg_loss_scale is not None:
            self.lg_loss_scale += torch.where(ok, self._lg_growth, self._lg_drop)
        self.stats.add_step(ok, grad_norm)

    def _update_emas(self, ok):
        """
        Move each EMA toward the weights unless the step was skipped (`ok` false).
        On CPU, reading `ok` costs nothing and nn.update_ema's lerp is cheapest;
        elsewhere lerp would read its weight on the host, so the update is
        ema += (1 - rate) * ok * (params - ema) with the weight on the device.
        (The post-hoc profiles count a skipped step as an update of unchanged
        weights, so they need no flag: posthoc_ema.PowerFunctionEMA.)
        """
        if not self.ema_rate:
            return
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
        """The learning rate of the step about to be taken (update self.step + 1)."""
        return scheduled_lr(self.lr, self.step, lr_anneal_steps=self.lr_anneal_steps,
                            lr_warmup_steps=self.lr_warmup_steps)

    # ----- logging -----------------------------------------------------------

    def log_step(self):
        """Log the position after a step: updates so far and samples seen by all ranks."""
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.batch_size * self.world_size)

    def _log_interval(self):
        """Write the interval's row (one device read for the update statistics) and check the bad-step streak."""
        info = self.stats.read()
        if info["grad_norm"] is not None:
            logger.logkv("grad_norm", info["grad_norm"])
        logger.logkv("bad_steps", info["bad_steps"])
        if self.lg_loss_scale is not None:
            logger.logkv("lg_loss_scale", self.lg_loss_scale)
        logger.dumpkvs()
        if info["bad_steps"]:
            logger.log(
                f"skipped {info['bad_steps']} step(s) with a non-finite loss or gradient in the "
                f"last {self.log_interval} (weights and averages unchanged by them)"
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

    # ----- saving ------------------------------------------------------------

    def save(self):
        """
        Write the checkpoint set of the current step (call on every rank: the
        per-rank random and data states are gathered; only rank 0 writes).
        A set that cannot be written ends the run on every rank with
        CheckpointSaveError (which names the newest complete set).
        """
        run_state = self._run_state()
        if self.check_replicas:
            self._check_replicas_identical()
        ckpt = CheckpointSet(self.checkpoint_dir, self.step, self.ema_rate, save_format=self.save_format)
        error = None
        if self.rank == 0:
            logger.log(f"saving checkpoint set of step {self.step} in {self.checkpoint_dir}...")
            try:
                ema_states = {r: self._ema_state_dict(ema) for r, ema in zip(self.ema_rate, self.ema_params)}
                ckpt.save(self.model.state_dict(), ema_states, self.opt.state_dict(), run_state,
                          snapshots=self._snapshots_to_write())
                self.pending_snapshots.clear()
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
        """The model's state dict with the averaged values `ema` in place of the parameters."""
        state = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), ema):
            state[name] = value
        return state

    def _snapshot_states(self):
        """{file name: state dict} of every tracked profile now (live tensors)."""
        return {snapshot_filename(std, self.step): self._ema_state_dict(self.posthoc.average(std))
                for std in self.ema_std}

    def _take_snapshots(self):
        """Rank 0: keep a host copy of every tracked profile now, to be written with the next set."""
        if self.rank != 0:
            return
        for name, state in self._snapshot_states().items():
            self.pending_snapshots[name] = {k: _host_copy(v) for k, v in state.items()}

    def _snapshots_to_write(self):
        """{file name: state dict} of the snapshots that go into the set being saved."""
        if self.posthoc is None:
            return {}
        if self.device.type == "cuda" and self.pending_snapshots:
            torch.cuda.synchronize(self.device)  # the host copies were made without waiting
        snapshots = dict(self.pending_snapshots)
        if not self.ema_snapshot_interval:
            snapshots.update(self._snapshot_states())
        return snapshots

    def _run_state(self):
        """Everything beyond weights and AdamW that exact resume needs (gathers every rank's part)."""
        local = {"rng": capture_rng(self.generator)}
        for name, loader in self._loaders().items():
            local[name] = loader.state_dict() if hasattr(loader, "state_dict") else None
        sampler = self.schedule_sampler
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "flags": self.run_flags,
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
            "lg_loss_scale": None if self.lg_loss_scale is None else self.lg_loss_scale.item(),
            "stats": self.stats.state_dict(),
            "posthoc_ema": None if self.posthoc is None else self.posthoc.state_dict(),
            "ranks": dist_util.all_gather_object(local),
        }

    def _check_replicas_identical(self):
        """Raise RuntimeError on every rank unless all ranks hold bitwise the same weights and averages."""
        digest = hashlib.sha256()
        averages = [p for ema in self.ema_params for p in ema]
        if self.posthoc is not None:
            averages += [p for average in self.posthoc.averages for p in average]
        for tensor in self.params + averages:
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = dist_util.all_gather_object(digest.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"replicas differ at step {self.step}: weight digests by rank {digests}")
        logger.log(f"replicas identical at step {self.step} on {len(digests)} rank(s) (sha256 {digests[0][:16]})")


# ----- the update's options ------------------------------------------------------


def check_update_options(*, use_fp16=False, use_bf16=False, grad_clip=0.0, lr_warmup_steps=0, ema_snapshot_interval=0):
    """ValueError naming the flag for options of the update that cannot work together or at all."""
    if use_fp16 and use_bf16:
        raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
    if not grad_clip >= 0:
        raise ValueError(f"--grad_clip {grad_clip} must be >= 0 (the largest gradient norm kept; 0: no clipping)")
    if lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps {lr_warmup_steps} must be >= 0 (0: no warm-up)")
    if ema_snapshot_interval < 0:
        raise ValueError(f"--ema_snapshot_interval {ema_snapshot_interval} must be >= 0 (0: a snapshot at every save)")


def clip_factor(grad_norm, max_norm):
    """
    The factor min(1, max_norm / (||g|| + 1e-6)) that scales a gradient of
    norm `grad_norm` (a 0-d tensor, left on its device) to at most `max_norm`
    (clipping by the global norm: Pascanu et al. 2013, "On the difficulty of
    training recurrent neural networks", Algorithm 1).
    """
    return torch.clamp(max_norm / (grad_norm + CLIP_EPS), max=1.0)


def scheduled_lr(lr, step, *, lr_anneal_steps=0, lr_warmup_steps=0):
    """
    The learning rate of update step + 1 (step: updates done before it):
    lr, times 1 - step / lr_anneal_steps with a linear decay, times
    min(1, (step + 1) / lr_warmup_steps) with a warm-up (update n of the
    first K gets n / K of the rate, update K the full rate; the linear
    warm-up of Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.2).
    """
    if lr_anneal_steps:
        lr = lr * (1 - step / lr_anneal_steps)
    if lr_warmup_steps and step < lr_warmup_steps:
        lr = lr * ((step + 1) / lr_warmup_steps)
    return lr


def parse_ema_rates(ema_rate):
    """[0.9999, ...] from a float, a list of floats or a comma-separated string."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    if isinstance(ema_rate, (list, tuple)):
        return [float(x) for x in ema_rate]
    return [float(x) for x in str(ema_rate).split(",") if x.strip()]


def parse_ema_stds(ema_std):
    """The checked sigma_rel values of `ema_std`: a list or a comma-separated string ("" or []: none)."""
    if not ema_std:
        return []
    return parse_stds(ema_std) if isinstance(ema_std, str) else check_stds(ema_std)


def _host_copy(tensor):
    """A copy of `tensor` in host memory (pinned and without waiting, from a GPU; valid after a synchronize)."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


# ----- logging and folders ----------------------------------------------------------


def log_loss_dict(diffusion, ts, losses):
    """
    logkv_mean of each loss term's batch mean, and of its mean in each quarter
    of the noise levels (diffusion.noise_level_quartile) as KEY_q0 ... KEY_q3 (a quarter with no timestep in the
    interval is left out of the row). Nothing is read back from the device:
    each quarter's sum and count go to the logger as tensors.

    :param ts: [N] timesteps; :param losses: dict of [N] loss terms.
    """
    quartile = diffusion.noise_level_quartile(ts)
    in_quartile = (quartile[:, None] == torch.arange(4, device=quartile.device)).to(torch.float32)  # [N x 4]
    counts = in_quartile.sum(dim=0)
    for key, values in losses.items():
        values = values.detach().float()
        logger.logkv_mean(key, values.mean())
        sums = values @ in_quartile.to(values.device)
        for q in range(4):
            logger.logkv_mean(f"{key}_q{q}", sums[q], count=counts[q])


def get_blob_logdir():
    """Where checkpoints go by default: $DIFFUSION_BLOB_LOGDIR if set, else the logger's directory."""
    return os.environ.get("DIFFUSION_BLOB_LOGDIR") or logger.get_dir()
