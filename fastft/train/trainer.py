"""The training loop: lean, rank-aware, resumable.

One optimizer step = ``grad_accum`` micro-batches. Their target tokens are counted (and
all-reduced across ranks) before the first backward, and every micro-batch's summed loss is
divided by that step total, so accumulation over k micro-batches gives the same gradient as one
batch k times larger (not the mean of per-micro-batch means that HF fixed in late 2024).

Precision: weights live in the run dtype (bf16 on this CPU), except trainable embeddings and
RMSNorm weights, kept in fp32 as autocast does (fastft/train/precision.py: bf16 hid their first Adam
updates); the other trainable parameters get fp32 master copies inside the optimizer; no
autocast (on CPU it re-casts fp32 weights every forward: 227 tok/s with autocast vs 295 tok/s
with bf16 weights, ENVIRONMENT.md). fp16 adds dynamic loss scaling (GPU only). Gradients
accumulate in the parameter dtype: on the tiny test Llama the relative gradient error of bf16
vs fp32 is 5.8e-3 for one batch of 8 and 6.4e-3 for 8 micro-batches of 1, i.e. the accumulation
adds little to bf16's own compute error.

Divergence guard: a step whose loss or pre-clip gradient norm is not finite is skipped inside the
fused AdamW (which computes the norm anyway; the loss reaches it as GradScaler's ``found_inf``,
a device tensor), so NaN/inf never reaches the weights or the moments; metrics.jsonl marks the
step ``"bad": true``. ``train.max_bad_steps`` such steps in a row stop the run with
TrainingDiverged (exit code 3) without saving: the last good checkpoint stays the newest. The
one host sync per step (loss, norm and the bad flag together) is the one the loop already had.

Best model: every evaluation with the early-stopping metric, the end-of-run one included, can
become the best (checkpointed when early stopping or periodic saves are on). With early
stopping and ``train.load_best_at_end``, ``final/`` gets the best checkpoint's weights and the
summary's ``eval_after`` is the best's evaluation (``eval_last`` the last one's).
"""
from __future__ import annotations

import json
import math
import resource
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from fastft.atomic_files import replace_dir
from fastft.data import DataBundle
from fastft.data.collate import Collator
from fastft.errors import ConfigError, TrainingDiverged
from fastft.ops.fused_linear_cross_entropy import check_labels
from fastft.train import checkpoint as ck
from fastft.train import dist_checkpoint as dcp_ck
from fastft.train import distributed as dist
from fastft.train.evaluation import lm_eval
from fastft.train.finetune import apply_freezing, param_groups
from fastft.train.utils import CausalLMLoss, LrSchedule, build_optimizer, set_lr

MetricsHook = Callable[..., dict]  # (model, tokenizer, bundle, step) -> {"name": float}


class Trainer:
    """Train ``model`` (already in its run dtype, LoRA injected, freezing applied) on ``data``.

    Args:
        cfg: the resolved ``fastft.config.Config``.
        run_dir: output directory (created by the caller after all validation).
        metrics_hook: optional callable returning extra eval metrics (e.g. classification).
    """

    def __init__(self, cfg, run_dir: Path, model, tokenizer, data: DataBundle, device: torch.device,
                 metrics_hook: MetricsHook | None = None, log: Callable[[str], None] = print):
        self.cfg, self.t, self.run_dir = cfg, cfg.train, Path(run_dir)
        self.model, self.tokenizer, self.data, self.device = model, tokenizer, data, device
        self.metrics_hook, self.log = metrics_hook, (log if dist.is_main() else (lambda s: None))
        self.is_lora = cfg.finetune.mode == "lora"
        # a data format may bring its own collator (packing adds per-sample position ids)
        self.collate = getattr(data, "collator", None) or Collator(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.n_local = len(dist.shard(list(range(len(data.train)))))
        self.micro_per_epoch = math.ceil(self.n_local / self.t.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.t.grad_accum)
        self.total_steps = self.t.max_steps or max(1, math.ceil(self.t.epochs * self.steps_per_epoch))
        self.warmup = self.t.warmup_steps or int(self.t.warmup_ratio * self.total_steps)
        self.schedule = LrSchedule(self.total_steps, self.warmup, self.t.scheduler)
        if self.warmup >= self.total_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup}: warmup must be shorter than the run "
                              f"({self.total_steps} steps)")
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        self.low_precision = bool(trainable - {torch.float32})  # optimizer keeps fp32 masters
        self.fp16 = torch.float16 in dtypes
        self.loss_scale, self.good_steps = (2.0 ** 16 if self.fp16 else 1.0), 0
        self.unfrozen = False
        self.strategy = dist.resolve_strategy(self.t.distributed, cfg.finetune.mode, dist.world_size())
        dist.check_supported(self.strategy, cfg)
        if getattr(data, "label_names", None):  # sequence classification: (B,) labels
            from fastft.models.classifier import ClassificationLoss

            self.loss_mod = ClassificationLoss(model, cfg.train.label_smoothing)
        else:
            self.loss_mod = CausalLMLoss(model, cfg.train.label_smoothing, cfg.model.fused_ce,
                                         cfg.model.recompute_cheap)
        # DDP around the loss module, or FSDP2 sharding it in place (fastft/train/distributed.py);
        # before the optimizer, which must see FSDP2's sharded parameters
        self.ddp = dist.wrap(self.loss_mod, self.strategy, device, self.log)
        if self.strategy != "none":
            self.log(f"distributed: {self.strategy} on {dist.world_size()} ranks; global batch "
                     f"{self.t.batch_size} x {self.t.grad_accum} accumulation x {dist.world_size()} ranks = "
                     f"{self.t.batch_size * self.t.grad_accum * dist.world_size()} sequences")
        if self.strategy == "fsdp" and self.metrics_hook is not None:
            self.log("train.distributed=fsdp: per-task evaluation metrics are off (they need the whole model)")
            self.metrics_hook = None
        self.optimizer = build_optimizer(param_groups(model, cfg.finetune, self.t.lr, self.t.weight_decay),
                                         self.t, self.low_precision)
        self.step, self.micro_pos = 0, 0
        self.best, self.bad_evals = None, 0
        self.best_step, self.best_metrics = None, {}
        self.bad_steps, self.bad_steps_total = 0, 0  # bad steps in a row / in all (_judge)
        self._good_norms: list[float] = []  # grad norms of the last good steps
        self._perm: tuple[int, list[int]] = (-1, [])
        self._stop_requested = False
        self.tb = None

    # ---------------------------------------------------------------- data
    def _micro_batch(self, pos: int, to_device: bool = True) -> dict[str, torch.Tensor]:
        """Micro-batch number ``pos`` of the endless stream: epoch e uses permutation e (on the
        training device, or as collated on the CPU with ``to_device=False``)."""
        epoch, i = divmod(pos, self.micro_per_epoch)
        if self._perm[0] != epoch:  # the order depends only on (seed, epoch): resumable
            self._perm = (epoch, dist.shard(epoch_order(len(self.data.train), self.t.seed, epoch)))
        idx = self._perm[1][i * self.t.batch_size:(i + 1) * self.t.batch_size]
        batch = self.collate([self.data.train[j] for j in idx])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()} if to_device else batch

    # ---------------------------------------------------------------- freezing
    def _maybe_unfreeze(self) -> None:
        k = self.cfg.finetune.unfreeze_after_steps
        if self.unfrozen or k <= 0 or self.is_lora or self.step < k:
            return
        have = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        apply_freezing(self.model, self.cfg.finetune, unfrozen=True)
        for g in param_groups(self.model, self.cfg.finetune, self.t.lr, self.t.weight_decay):
            params = [p for p in g["params"] if id(p) not in have]
            if params:
                self.optimizer.add_param_group({"params": params, "lr": g["lr"], "base_lr": g["lr"],
                                                "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"]})
        self.unfrozen = True
        self.log(f"step {self.step}: progressive unfreezing, every parameter now trains")

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the metrics line."""
        t0 = time.perf_counter()
        n_micro = self.t.grad_accum
        batches = [self._micro_batch(self.micro_pos + j, to_device=False) for j in range(n_micro)]
        # counted on the CPU copies: on a GPU each count would be a host sync per micro-batch
        counts = torch.tensor([float(_n_targets(b)) for b in batches] +
                              [float(sum(_n_tokens(b) for b in batches))], dtype=torch.float64)
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
        dist.global_count(counts)  # normalise by the global batch's targets, never a rank's
        n_target, n_tokens = counts[:-1].sum().item(), counts[-1].item()
        denom = max(n_target, 1.0) / dist.world_size()  # DDP averages grads over ranks
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read once per step
        self.model.train()
        for j, b in enumerate(batches):
            with dist.grad_sync(self.ddp, sync=j == n_micro - 1):
                ls, _ = self.ddp(**b)
                (ls * (self.loss_scale / denom)).backward()
            loss_sum += ls.detach().double()
        self.micro_pos += n_micro
        set_lr(self.optimizer, self.schedule.factor(self.step))
        lr = self.optimizer.param_groups[0]["lr"]
        dist.all_reduce_sum(loss_sum)  # every rank takes the same skip decision
        loss_bad = ~torch.isfinite(loss_sum)
        skipped = self._unscale_and_check() if self.fp16 else False
        if not skipped:
            # GradScaler's protocol: a non-zero found_inf skips the step inside the fused update
            self.optimizer.found_inf = loss_bad.float()
            self.optimizer.step()
            self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        check_labels()  # GPU: out-of-range labels raise here, where the loss is read anyway
        gn = getattr(self.optimizer, "last_grad_norm", None)
        gn = torch.full((), float("nan")) if gn is None or skipped else gn
        bad = loss_bad | ~torch.isfinite(gn.to(loss_sum.device))
        loss, gn, bad = torch.stack([loss_sum, gn.to(loss_sum.device).double(), bad.double()]).tolist()  # 1 sync
        if self.fp16:  # overflow skips are loss scaling's normal work until the scale is down to 1
            bad = bad and (not skipped or self.loss_scale <= 1.0)
        dt = time.perf_counter() - t0
        return {"event": "train", "step": self.step, "loss": loss / max(n_target, 1.0), "lr": lr,
                "grad_norm": gn, "tokens": int(n_tokens), "bad": bool(bad),
                "target_tokens": int(n_target), "step_time": dt, "tokens_per_s": n_tokens / dt,
                **({"loss_scale": self.loss_scale, "skipped": skipped} if self.fp16 else {})}

    def _unscale_and_check(self) -> bool:
        """fp16 dynamic loss scaling: unscale grads; on inf/nan skip the step and halve the scale,
        after 2000 good steps double it."""
        grads = [dist.to_local(p.grad) for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.loss_scale)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        finite = dist.all_reduce_sum(finite.float().reshape(1)).item() == dist.world_size()
        if not finite:
            self.loss_scale, self.good_steps = max(self.loss_scale / 2, 1.0), 0
            return True
        self.good_steps += 1
        if self.good_steps % 2000 == 0:
            self.loss_scale *= 2
        return False

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, examples: list[dict] | None = None, hook: bool = True) -> dict:
        """Token-weighted loss and perplexity over ``examples`` (default: validation split), plus
        the metrics hook's results when ``hook``."""
        examples = self.data.validation if examples is None else examples
        if not examples:
            return {}
        self.model.eval()
        out = lm_eval(self.loss_mod, examples, self.collate, self.device, self.t.batch_size,
                      self.t.eval_batches, shard=True,  # fastft/train/evaluation.py: the one loop
                      per_example=bool(getattr(self.data, "label_names", None)))
        if hook and self.metrics_hook is not None:
            out.update(self.metrics_hook(self.model, self.tokenizer, self.data, self.step))
        self.model.train()
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self, rng: dict) -> dict:
        return {"step": self.step, "micro_pos": self.micro_pos, "optimizer": self.optimizer.state_dict(),
                "rng": rng, "best": self.best, "bad_evals": self.bad_evals, "loss_scale": self.loss_scale,
                "good_steps": self.good_steps, "unfrozen": self.unfrozen, "total_steps": self.total_steps,
                "schedule": self.schedule.state_dict(), "best_step": self.best_step,
                "best_metrics": self.best_metrics, "bad_steps_total": self.bad_steps_total,
                "batch_size": self.t.batch_size, "micro_per_epoch": self.micro_per_epoch}

    def resume_from(self, ckpt: Path) -> None:
        """Restore weights, optimizer, counters and RNG from a checkpoint directory."""
        if dist.world_size() > 1 or dcp_ck.is_dcp(ckpt):  # DCP, resharded to this world size
            st = dcp_ck.load(ckpt, self.model, self.optimizer, self.is_lora)
            self.step = st["step"]
            self.micro_pos = dcp_ck.micro_pos_for(st, self.micro_per_epoch, self.t.batch_size)
        else:
            st = ck.load_state(ckpt)
            ck.load_model_files(self.model, ckpt, self.is_lora)
            self.step, self.micro_pos = st["step"], st["micro_pos"]
            if st.get("unfrozen"):
                self._maybe_unfreeze()
            self.optimizer.load_state_dict(st["optimizer"])
        self.best, self.bad_evals = st["best"], st["bad_evals"]
        self.best_step, self.best_metrics = st.get("best_step"), st.get("best_metrics") or {}
        self.bad_steps_total = st.get("bad_steps_total", 0)
        self.loss_scale, self.good_steps = st["loss_scale"], st["good_steps"]
        self._resume_schedule(st)
        if st["rng"] is not None:
            ck.set_rng_state(st["rng"])
        else:  # this rank did not exist in the run that saved: a fresh, rank- and step-specific seed
            torch.manual_seed(self.t.seed + 1_000_003 * dist.rank() + self.step)
        if dist.is_main():
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.log(f"resumed from {ckpt} at step {self.step}")

    def _resume_schedule(self, st: dict) -> None:
        """Keep the saved lr schedule; a new total continues it by ``LrSchedule.extend``'s rule."""
        if "schedule" in st:
            self.schedule.load_state_dict(st["schedule"])
        else:  # checkpoints written before the schedule was saved
            self.schedule.total = st.get("total_steps", self.total_steps)
        self.warmup = self.schedule.warmup
        if self.total_steps <= self.step:
            raise ConfigError(f"train.max_steps: the run is already at step {self.step}; resuming needs more "
                              f"steps (now {self.total_steps})")
        if self.total_steps != self.schedule.total:
            self.log(self.schedule.extend(self.step, self.total_steps))

    def _save(self, rng: dict, best: bool = False) -> None:
        root = self.run_dir / "checkpoints"
        if dist.world_size() > 1:  # collective: every rank writes its DCP shards and its RNG
            st = {k: v for k, v in self.state_dict(rng).items() if k != "optimizer"}
            path = dcp_ck.save(root, self.step, self.model, self.optimizer, self.tokenizer, self.is_lora, st)
        elif dist.is_main():
            path = ck.save_checkpoint(root, self.step, self.model, self.tokenizer, self.is_lora,
                                      self.state_dict(rng))
        if not dist.is_main():
            return
        if best:
            ck.mark_best(root, path)
        ck.prune(root, self.t.keep_last)

    # ---------------------------------------------------------------- logging
    def _write(self, rec: dict) -> None:
        if not dist.is_main():
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "event"):
                    self.tb.add_scalar(f"{rec['event']}/{k}", v, rec.get("step", self.step))

    def _open_tensorboard(self) -> None:
        if not (self.cfg.output.tensorboard and dist.is_main()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _improved(self, metrics: dict) -> bool | None:
        """True/False when the early-stopping metric improved (None when it is absent)."""
        key = self.t.early_stopping_metric
        if key not in metrics:
            return None
        v = metrics[key]
        sign = 1.0 if self.t.early_stopping_mode == "min" else -1.0
        if self.best is None or sign * (self.best - v) > self.t.early_stopping_min_delta:
            self.best, self.bad_evals = v, 0
            self.best_step, self.best_metrics = self.step, dict(metrics)
            return True
        self.bad_evals += 1
        return False

    # ---------------------------------------------------------------- main loop
    def train(self) -> dict:
        """Run to ``total_steps`` (or early stop / Ctrl-C). Returns a summary dict."""
        from fastft.train.progress import Progress

        self._open_tensorboard()
        if self.step == 0 and not self.optimizer.state:
            # Adam's moments before the first forward (the eval's included), not amid the first
            # step's freed activations: less heap fragmentation (FusedAdamW.init_moments)
            self.optimizer.init_moments()
        eval_before = self.evaluate() if self.step == 0 else {}
        key = self.t.early_stopping_metric
        if self.t.early_stopping_patience and self.step == 0 and key not in eval_before:
            raise ConfigError(f"train.early_stopping_metric={key!r}: the evaluation reports "
                              f"{', '.join(eval_before) or 'nothing (no validation data)'}")
        if eval_before:
            self._write({"event": "eval", "step": 0, **eval_before})
        # Ctrl-C and SIGTERM (e.g. a scheduler preempting the job): finish the step, save, exit
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self._on_sigint) for s in sigs} if _main_thread() else {}
        bar = Progress(self.total_steps, self.step, enabled=self.t.progress and dist.is_main())
        stopped, interrupted, last_eval = False, False, None
        try:
            while self.step < self.total_steps:
                self._maybe_unfreeze()
                rec = self.train_step()
                bar.update(rec)
                self._judge(rec)
                if rec["bad"] or self.step % self.t.log_every == 0 or self.step == self.total_steps:
                    self._write({**rec, "bad_steps_total": self.bad_steps_total})
                if self.bad_steps >= self.t.max_bad_steps:
                    raise TrainingDiverged(
                        f"training diverged: {self.bad_steps} steps in a row (to step {self.step}) had a non-finite, "
                        f"exploding or vanished gradient norm or loss; the last good checkpoint is kept (lower "
                        f"train.lr, now {self.t.lr:g}, or check the data)")
                is_best = False
                if self.t.eval_every and self.step % self.t.eval_every == 0 and self.step < self.total_steps:
                    last_eval = self.evaluate()
                    self._write({"event": "eval", "step": self.step, **last_eval})
                    bar.note(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
                    improved = self._improved(last_eval)
                    is_best = bool(improved) and (self.t.early_stopping_patience > 0 or self.t.save_every > 0)
                    if self.t.early_stopping_patience and self.bad_evals >= self.t.early_stopping_patience:
                        stopped = True
                self._stop_requested = dist.any_rank(self._stop_requested)  # every rank stops together
                # a step judged bad is never checkpointed: the newest checkpoint stays a good one
                periodic = self.t.save_every and self.step % self.t.save_every == 0 and not self.bad_steps
                if periodic or is_best or self._stop_requested or stopped:
                    # RNG as of this step boundary: a resumed run draws the same dropout masks
                    self._save(ck.rng_state(), best=is_best)
                if self._stop_requested:
                    interrupted = True
                    break
                if stopped:
                    self.log(f"early stopping at step {self.step}: {self.t.early_stopping_metric} did not "
                             f"improve for {self.t.early_stopping_patience} evaluations (best {self.best:.4g})")
                    break
        finally:
            bar.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        summary = {"steps": self.step, "stopped_early": stopped, "interrupted": interrupted,
                   "eval_before": eval_before}
        if not interrupted:
            after = self.evaluate()
            if after:
                self._write({"event": "eval", "step": self.step, **after})
                # the last evaluation can be the best (after an early stop it re-scores the step just judged)
                if not stopped and self._improved(after) and self._tracks_best():
                    self._save(ck.rng_state(), best=True)
            summary["eval_after"] = summary["eval_last"] = after
            if self._load_best():
                summary["eval_after"] = self.best_metrics
            if self.data.test:
                test = self.evaluate(self.data.test, hook=False)
                summary["test"] = {k.replace("eval_", "test_"): v for k, v in test.items()}
                self._write({"event": "test", "step": self.step, **summary["test"]})
            self._final_save()
        summary["best"], summary["best_step"] = self.best, self.best_step
        self._write({"event": "end", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "steps": self.step, "stopped_early": stopped, "interrupted": interrupted})
        if self.tb is not None:
            self.tb.close()
        return summary

    def _judge(self, rec: dict) -> None:
        """Mark a step bad (``rec["bad"]``, ``rec["bad_reason"]``) and count bad steps in a row.

        Non-finite loss/norm: the step was skipped inside the optimizer (nothing changed). Two
        more signs of divergence count too, though their update was applied (clipped, so at most
        one lr-sized step): a grad norm above ``train.grad_norm_spike`` x the median of the last
        20 good steps' norms, and an exactly zero norm with target tokens (every gradient
        saturated: lr 1e8 on the tiny test Llama went 1.3 -> 93 -> 1.6e12 -> 0.0 with a finite,
        flat loss that a NaN check alone never caught)."""
        gn, reason = rec["grad_norm"], "non-finite loss or grad norm (step skipped)" if rec["bad"] else ""
        if not reason and gn == 0.0 and rec["target_tokens"] > 0:
            reason = "zero grad norm"
        spike = self.t.grad_norm_spike
        if not reason and spike and self._good_norms:
            med = sorted(self._good_norms)[len(self._good_norms) // 2]
            if gn > spike * med:
                reason = f"grad norm {gn:.3g} > {spike:g} x the recent median {med:.3g}"
        rec["bad"] = bool(reason)
        if reason:
            rec["bad_reason"] = reason
            self.bad_steps += 1
            self.bad_steps_total += 1
        else:
            self.bad_steps = 0
            self._good_norms = (self._good_norms + [gn])[-20:]

    def _tracks_best(self) -> bool:
        return self.t.early_stopping_patience > 0 or self.t.save_every > 0

    def _load_best(self) -> bool:
        """With early stopping and ``load_best_at_end``: put the best checkpoint's weights into the
        model (for final/ and the test split). True when that changed the model."""
        if not (self.t.early_stopping_patience and self.t.load_best_at_end) or self.best_step in (None, self.step):
            return False
        path = ck.best_checkpoint(self.run_dir / "checkpoints") if dist.is_main() else None
        if dist.world_size() > 1:  # every rank loads the same folder
            import torch.distributed as tdist

            box = [str(path) if path else None]
            tdist.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] else None
        if path is None or path.name != f"step-{self.best_step:06d}":
            self.log(f"train.load_best_at_end: the best checkpoint (step {self.best_step}) is missing; "
                     "final/ keeps the last weights")
            return False
        if dcp_ck.is_dcp(path):  # every rank reads its part (FSDP2 shards have no plain files)
            dcp_ck.load_weights(path, self.model)
        else:
            ck.load_model_files(self.model, path, self.is_lora)
        self.log(f"final weights: the best evaluation's, step {self.best_step} "
                 f"({self.t.early_stopping_metric} {self.best:.4g}; train.load_best_at_end)")
        return True

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"\n{name}: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

    def _final_save(self) -> None:
        """``<run>/final``: adapter (PEFT) or HF model + tokenizer; ``<run>/merged`` on request.
        Under FSDP every rank first sends its shards to rank 0 (the same plain HF files as one
        process writes)."""
        full = dcp_ck.full_state_dict(self.model, trainable_only=self.is_lora) if self.strategy == "fsdp" else None
        if not dist.is_main():
            dist.barrier()
            return
        import tempfile

        out = self.run_dir / "final"
        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=self.run_dir))
        ck.save_model_files(self.model, self.tokenizer, tmp, self.is_lora, state_dict=full)
        replace_dir(tmp, out)
        if self.is_lora and self.cfg.output.save_merged:
            from fastft.models.merge import save_merged

            save_merged(self.model, self.tokenizer, self.run_dir / "merged")
        dist.barrier()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Order of the ``n`` training examples in ``epoch`` (before sharding across ranks). Depends
    only on (seed, epoch), so a resumed run and ``fastft bench``'s Hugging Face side see the same
    batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _n_targets(batch: dict) -> int:
    """Tokens (or, for classification, examples) that carry loss in a batch."""
    labels = batch["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


def _n_tokens(batch: dict) -> int:
    """Non-padding tokens of a batch (packed rows too: their collator hands the 2-D padding mask).
    A 4-D mask given by a custom collator does not say which positions are padding: every
    position counts then."""
    m = batch["attention_mask"]
    return int(m.sum()) if m.dim() == 2 else m.shape[0] * m.shape[-1]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed, so the file reads as one run."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("event") != "end" and json.loads(ln).get("step", 0) <= step]
    ck.atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
