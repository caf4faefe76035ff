"""The training run, top to bottom: build data, model and optimizer from the config; restore the last
checkpoint if there is one; then loop — mask, forward, backward, clip, step — logging every `log_every`,
evaluating every `eval_every`, checkpointing every `save_every`; on a signal, checkpoint and stop.

Every random draw of step `s` is seeded from (seed, s): masking has its own generator, dropout the global
one. So a resumed run sees exactly the batches, masks and dropout it would have seen uninterrupted.

Under `torchrun`, every rank builds and masks the same global batch (`data.batch_size` x `grad_accum` x
ranks pairs) and trains on its own rows; losses are normalised by the global batch's counts, so N ranks
compute the same update as one process with the same global batch. Rank 0 alone writes.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import BertForPreTraining
from transformers.utils import logging as hf_logging

from bertexp import distributed
from bertexp.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from bertexp.data.dataset import Position
from bertexp.data.tokenizer import load_tokenizer
from bertexp.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from bertexp.masking import TokenMasking, Vocab
from bertexp.modeling import PretrainingObjective, encoder_params, fit_attention_to_precision
from bertexp.optim import build_optimizer, build_scheduler
from bertexp.resolvers import process_start
from bertexp.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)
# Exit codes 128 + signal number. SIGUSR1 is SLURM's usual pre-emption warning; SIGUSR2 is submitit's.
_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGUSR2: 140}


def process_age() -> float:
    """Seconds since this process started, for the start-to-first-step figure."""
    started = process_start()
    return time.time() - started if started is not None else float("nan")


def step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + stream) % (2**63 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but no CUDA device is available")
    return device


def matmul_flops(device: torch.device, dtype=torch.float32, n: int | None = None, reps: int | None = None) -> float:
    """This machine's matrix-multiply throughput (FLOP/s), measured now: the MFU denominator."""
    n = n or (2048 if device.type == "cpu" else 8192)
    reps = reps or (2 if device.type == "cpu" else 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


class _StopFlag:
    """Turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a request the loop honours after the current step.

    A handler that was installed before ours (submitit's requeue on SIGUSR2 under
    hydra/launcher=submitit_slurm) is called after our checkpoint is written, so the requeued job
    resumes from it.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in _SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def chain(self) -> None:
        """Call the handler that was there before ours for the signal received, if it was a Python one."""
        previous = self._old.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_eval_set(data, vocab: Vocab, ratio: float, mask_token_prob: float, random_token_prob: float,
                   max_batches: int | None) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Held-out batches masked once, with token masking and a generator seeded by `data.split_seed`: the
    same positions for every run on the same data, whatever its training strategy, ratio or seed."""
    masker = TokenMasking(ratio, mask_token_prob, random_token_prob).bind(vocab)
    g = torch.Generator().manual_seed(int(data.split_seed) + 12345)
    return [(b, *masker(b, g)[:2]) for b in data.eval_batches(max_batches)]


def evaluate_mlm(objective: PretrainingObjective, eval_set, device, amp, dist: distributed.Dist) -> dict:
    """MLM loss/accuracy/perplexity and NSP accuracy on the held-out set (sharded over ranks, then summed)."""
    objective.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # mlm loss sum, masked tokens, correct, nsp correct, pairs
    with torch.no_grad(), amp:
        for i, (b, ids, labels) in enumerate(eval_set):
            if i % dist.world != dist.rank:
                continue
            b = {k: v.to(device) for k, v in b.items()}
            mlm_sum, _, logits, targets, nsp_logits = objective(
                ids.to(device), b["attention_mask"], b["token_type_ids"], labels.to(device), b["next_sentence_label"])
            sums[0] += float(mlm_sum)
            sums[1] += targets.numel()
            sums[2] += float((logits.argmax(-1) == targets).sum())
            sums[3] += float((nsp_logits.argmax(-1) == b["next_sentence_label"]).sum())
            sums[4] += len(nsp_logits)
    objective.train()
    loss_sum, n, correct, nsp_correct, pairs = dist.sum(sums)
    mlm_loss = loss_sum / max(n, 1)
    return {
        "eval/mlm_loss": mlm_loss,
        "eval/mlm_acc": correct / max(n, 1),
        "eval/perplexity": math.exp(min(mlm_loss, 50.0)),
        "eval/nsp_acc": nsp_correct / max(pairs, 1),
        "eval/masked_tokens": int(n),
    }


def check_trainer(tc) -> None:
    """Range checks of trainer.* (types were checked when the config was composed)."""
    for name, low in (("max_steps", 1), ("log_every", 1), ("eval_every", 1), ("save_every", 1), ("grad_accum", 1),
                      ("keep_checkpoints", 0), ("max_bad_steps", 0)):
        if int(tc[name]) < low:
            raise ConfigError(f"trainer.{name}={tc[name]} must be >= {low}")
    if tc.eval_batches is not None and int(tc.eval_batches) < 1:
        raise ConfigError(f"trainer.eval_batches={tc.eval_batches} must be >= 1 (or null for the whole held-out set)")
    if not 0.0 < float(tc.eval_mask_ratio) < 1.0:
        raise ConfigError(f"trainer.eval_mask_ratio={tc.eval_mask_ratio} must be in (0, 1)")
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"trainer.precision={tc.precision!r} must be auto, fp32 or bf16")


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 would be slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def run_training(cfg: DictConfig, run_dir: Path, run_info: dict) -> dict:
    check_trainer(cfg.trainer)
    device = resolve_device(str(cfg.trainer.device))
    dist = distributed.setup(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        return _train(cfg, Path(run_dir), run_info, device, dist)
    finally:
        distributed.teardown(dist)


def _train(cfg: DictConfig, run_dir: Path, run_info: dict, device: torch.device, dist: distributed.Dist) -> dict:
    tc = cfg.trainer
    seed, max_steps, accum = int(cfg.seed), int(tc.max_steps), int(tc.grad_accum)
    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per checkpoint shard
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)

    # ---- build ------------------------------------------------------------------------------------
    log.info("Instantiating data <%s>", cfg.data._target_)
    data = instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    spec = instantiate(cfg.model)
    if data.max_length > spec.max_positions:
        raise ConfigError(
            f"data.max_length={data.max_length} exceeds the model's position limit ({spec.max_positions}); "
            f"use data.max_length between 8 and {spec.max_positions}"
        )
    masker = instantiate(cfg.masking)  # validates masking.* before any slow work
    resume_from = _resume_checkpoint(run_dir, str(tc.resume))
    tokenizer = load_tokenizer(resume_from) if resume_from else spec.tokenizer(data)
    data.prepare(tokenizer, seed)
    vocab = Vocab.from_tokenizer(tokenizer)
    masker.bind(vocab)
    if resume_from:
        model = BertForPreTraining.from_pretrained(str(resume_from), local_files_only=True, attn_implementation="sdpa")
    else:
        model = spec.build(tokenizer)
    model.to(device)
    precision = resolve_precision(str(tc.precision), device)
    fit_attention_to_precision(model, device.type, precision)
    if tc.compile:
        model.bert.compile(dynamic=True)
    objective = PretrainingObjective(model)
    ddp = torch.nn.parallel.DistributedDataParallel(objective) if dist.enabled else objective
    n_enc = encoder_params(model)
    log.info("Model: %.2fM parameters (%.2fM in the encoder layers), vocab %d, device %s, %s%s",
             sum(p.numel() for p in model.parameters()) / 1e6, n_enc / 1e6, len(tokenizer), device, precision,
             f", {dist.world} ranks" if dist.enabled else "")
    log.info("Instantiating optimizer <%s>", cfg.optim.optimizer._target_)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, max_steps)

    step, position, bad_steps, wandb_id = 0, Position(), 0, None
    if resume_from:
        state = load_trainer_state(resume_from)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {resume_from}: optimizer state does not fit this config ({e})") from None
        step, position = int(state["step"]), Position(**state["position"])
        bad_steps, wandb_id = int(state.get("bad_steps", 0)), state.get("wandb_id")
        set_rng_state(state["rng"])
        log.info("Checkpoint found: resuming from step %d (%s)", step, resume_from)

    # Held-out set, masked once with a fixed generator: the same positions in every run on the same data
    # and split seed, whatever the training strategy, ratio or seed, so eval/mlm_acc compares across a sweep.
    eval_set = build_eval_set(data, vocab, float(tc.eval_mask_ratio), masker.mask_token_prob,
                              masker.random_token_prob, tc.eval_batches)
    eval_targets = torch.cat([lab[lab != -100] for _, _, lab in eval_set])
    baseline_acc = float(torch.bincount(eval_targets).max() / max(1, eval_targets.numel()))
    log.info("Held-out set: %d pairs, %d masked tokens; always predicting the most frequent token scores %.4f",
             sum(len(b["input_ids"]) for b, _, _ in eval_set), eval_targets.numel(), baseline_acc)

    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(run_dir, _logger_dict(cfg), run_info, config, wandb_id) if dist.main else NullTracker()
    if resume_from:
        tracker.truncate_after(step)
    # MFU against the matmul throughput of the precision the run computes in
    peak = matmul_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32) if tc.measure_mfu else float("nan")
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def evaluate() -> dict:
        return {**evaluate_mlm(objective, eval_set, device, amp, dist), "eval/baseline_acc": baseline_acc}

    def checkpoint() -> Path | None:
        if not dist.main:
            return None
        return save_checkpoint(
            run_dir, step, model, tokenizer,
            {"step": step, "position": vars(position), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "bad_steps": bad_steps, "wandb_id": tracker.run_id,
             "config": config},
            keep=int(tc.keep_checkpoints),
        )

    # ---- loop -------------------------------------------------------------------------------------
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    micro = data.batch_size
    mine = dist.rank * micro * accum  # first row of this rank's share of the global batch
    gen = torch.Generator()
    batches = data.train_batches(position, batch_size=micro * accum * dist.world)
    win = dict.fromkeys(("mlm", "nsp", "steps", "tokens", "selected", "maskable", "seq", "rows", "width"), 0.0)
    win_time, total_tokens, total_time = 0.0, 0, 0.0
    last_eval: dict = {}
    first_step_s = None
    exit_code = 1
    pbar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0, disable=not dist.main)
    try:
        with _StopFlag() as stop:
            while step < max_steps:
                t0 = time.perf_counter()
                batch, next_position = next(batches)
                gen.manual_seed(step_seed(seed, step, 1))
                torch.manual_seed(step_seed(seed, step, 2 + 7 * dist.rank))  # dropout
                ids, labels, selected = masker(batch, gen)
                n_masked = max(1, int((labels != -100).sum()))
                n_pairs = len(ids)
                lr_now = optimizer.param_groups[0]["lr"]
                local = torch.zeros(2, dtype=torch.float64)
                for k in range(accum):
                    rows = slice(mine + k * micro, mine + (k + 1) * micro)
                    b = {key: v[rows].to(device, non_blocking=True) for key, v in batch.items()}
                    sync = ddp.no_sync() if dist.enabled and k < accum - 1 else nullcontext()
                    with sync:
                        with amp:
                            mlm_sum, nsp_sum, *_ = ddp(ids[rows].to(device), b["attention_mask"], b["token_type_ids"],
                                                       labels[rows].to(device), b["next_sentence_label"])
                        # Global-batch normalisation; DDP averages over ranks, so scale back up by their number.
                        loss = (mlm_sum / n_masked + nsp_sum / n_pairs) * dist.world
                        loss.backward()
                    local += torch.stack([mlm_sum.detach().double().cpu(), nsp_sum.detach().double().cpu()])
                mlm_g, nsp_g, stop_votes = dist.sum([*local.tolist(), float(stop.signum is not None)])
                mlm, nsp = mlm_g / n_masked, nsp_g / n_pairs
                if not math.isfinite(mlm + nsp):
                    bad_steps += 1
                    if bad_steps > int(tc.max_bad_steps):
                        last = latest_checkpoint(run_dir)
                        raise TrainingError(
                            f"non-finite loss ({mlm + nsp}) at step {step + 1}; last good checkpoint: "
                            f"{last or 'none'} (lower optim.lr, or allow trainer.max_bad_steps)"
                        )
                    log.warning("Non-finite loss at step %d: update skipped (%d/%d allowed)", step + 1, bad_steps, tc.max_bad_steps)
                    optimizer.zero_grad(set_to_none=True)
                else:
                    torch.nn.utils.clip_grad_norm_(params, float(cfg.optim.grad_clip))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                position = next_position
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                n_tok = int(batch["attention_mask"].sum())  # the global batch: the same on every rank
                win_time += dt
                total_time += dt
                total_tokens += n_tok
                for key, v in (("steps", 1), ("tokens", n_tok), ("mlm", mlm if math.isfinite(mlm) else 0.0),
                               ("nsp", nsp if math.isfinite(nsp) else 0.0),
                               ("selected", int(selected.sum())), ("maskable", int((~batch["special_tokens_mask"]).sum())),
                               ("seq", batch["input_ids"].numel()), ("rows", n_pairs)):
                    win[key] += v
                win["width"] = max(win["width"], int(batch["input_ids"].shape[1]))
                pbar.update(1)
                if first_step_s is None:
                    first_step_s = process_age()
                    log.info("First step done %.1f s after the process started", first_step_s)

                if step % int(tc.log_every) == 0 or step == max_steps:
                    n = win["steps"]
                    tps = win["tokens"] / max(win_time, 1e-9)
                    seq_len = win["seq"] / max(win["rows"], 1)
                    record = {
                        "step": step,
                        "train/loss": (win["mlm"] + win["nsp"]) / n,
                        "train/mlm_loss": win["mlm"] / n,
                        "train/nsp_loss": win["nsp"] / n,
                        "train/lr": lr_now,
                        "train/epoch": position.epoch,
                        "train/max_seq_len": int(win["width"]),  # widest padded batch of the window
                        "masking/realized_ratio": win["selected"] / max(win["maskable"], 1),
                        "throughput/tokens_per_s": tps,
                    }
                    if tc.measure_mfu:  # model FLOPs per token: 6N (encoder layers) + attention's 12 L H T
                        record["throughput/mfu"] = (6 * n_enc + 12 * layers * hidden * seq_len) * tps / (peak * dist.world)
                    tracker.log(record)
                    pbar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{lr_now:.2e}", tok_s=f"{tps:.0f}")
                    win = dict.fromkeys(win, 0.0)
                    win_time = 0.0
                if step % int(tc.eval_every) == 0 or step == max_steps:
                    last_eval = {"step": step, **evaluate()}
                    tracker.log(last_eval)
                    if dist.main:
                        pbar.write(
                            f"step {step}: eval mlm_acc {last_eval['eval/mlm_acc']:.4f} (most-frequent-token baseline "
                            f"{baseline_acc:.4f}), mlm_loss {last_eval['eval/mlm_loss']:.3f}, nsp_acc {last_eval['eval/nsp_acc']:.3f}"
                        )
                saved = step % int(tc.save_every) == 0 or step == max_steps
                if saved:
                    checkpoint()
                if stop_votes:
                    if not saved:
                        checkpoint()
                    tracker.flush()
                    if stop.signum is not None:
                        stop.chain()  # e.g. submitit: requeue this job; it resumes from the checkpoint above
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(
                        f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved — resume with the "
                        f"same command and hydra.run.dir={run_dir}", _SIGNALS.get(signum, 143)
                    )
            if not last_eval:  # already finished earlier: report the last evaluation again
                last_eval = {"step": step, **evaluate()}
        exit_code = 0
    finally:
        pbar.close()
        final = {
            "final/step": step,
            **{f"final/{k}": v for k, v in last_eval.items() if k != "step"},
            **{f"best/{k}": v for k, v in tracker.best.items()},
            "throughput/mean_tokens_per_s": total_tokens / total_time if total_time else None,
            "time/to_first_step_s": first_step_s,
            "run_dir": str(run_dir),
        }
        tracker.summary(final)
        if exit_code == 0 and cfg.get("logger") and cfg.logger.get("log_checkpoints"):
            tracker.log_checkpoint(run_dir / "checkpoints" / "last")
        tracker.finish(exit_code)
    log.info(
        "Finished at step %d: eval/mlm_acc %.4f vs %.4f for always predicting the most frequent token; "
        "eval/nsp_acc %.3f; %s tokens/s",
        step, last_eval.get("eval/mlm_acc", float("nan")), baseline_acc, last_eval.get("eval/nsp_acc", float("nan")),
        f"{final['throughput/mean_tokens_per_s']:.0f}" if final["throughput/mean_tokens_per_s"] else "n/a",
    )
    return final


def _resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    if resume in ("never", "false", "False", "none", "None"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise CheckpointError(f"trainer.resume: {path} is not a checkpoint (no trainer_state.pt)")
    return path


def _logger_dict(cfg: DictConfig) -> dict | None:
    if cfg.get("logger") is None:
        return None
    return OmegaConf.to_container(cfg.logger, resolve=True)
