"""The training run, top to bottom: `build` data, model, objective and optimizer from the config; `restore`
the run state of the last checkpoint if there is one; `prepare_exam`; then loop — one `Stepper` call (mask,
forward, backward, clip, update), log every `log_every`, score the exam every `eval_every`, checkpoint every
`save_every`; on a signal, checkpoint and stop. What the loop carries lives in one `RunState`.

Every random draw of step `s` is seeded from (seed, s): masking has its own generator, dropout the global
one. So a resumed run sees exactly the batches, masks and dropout it would have seen uninterrupted.

A step's global batch is `grad_accum` x ranks micro-batches of `data.batch_size` pairs; under `torchrun` each
rank collates and masks only its own micro-batches (bertexp.data.loader), the ranks exchange their counts,
and losses are normalised by the global batch's, so N ranks compute the same update as one process
accumulating N times as many micro-batches. Rank 0 alone writes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from bertexp import distributed
from bertexp.budget import Budget
from bertexp.checkpoint import STATE_FILE, latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from bertexp.compare import standing
from bertexp.data.cache import key_of, write_atomically
from bertexp.data.loader import batch_stream, chunks_of, mask_step, step_seed
from bertexp.data.tokenizer import load_tokenizer
from bertexp.device import (PRECISIONS, apply_matmul_precision, matmul_flops, resolve_device, resolve_precision,
                            spec_peak, use_device)
from bertexp.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from bertexp.exam import BASELINES_VERSION, BLANK_SHARE, SHORT_SEQ_PROB, CountingBaselines, build_exam
from bertexp.exam import evaluate as evaluate_exam
from bertexp.masking import Vocab
from bertexp.modeling import (ModelFlops, PretrainingObjective, check_attention_fits, check_objective, encoder_params,
                              family_of_dir, feed, fit_attention_to_precision, load_pretrained)
from bertexp.lifecycle import Claim, StopFlag, resume_hint, resume_target
from bertexp.optim import build_optimizer, build_scheduler, check_optim
from bertexp.resolvers import process_start
from bertexp.run_state import RunState
from bertexp.continued import before_after, exam_at_start
from bertexp.hub import model_source
from bertexp.rundir import (LINEAGE, RUN_CONFIG, RUN_INFO, effective_config, lineage_for, logger_config, provenance,
                            record_provenance)
from bertexp.tracking import NullTracker, Tracker, read_metrics, recorded_vocab

log = logging.getLogger(__name__)


def process_age() -> float:
    """Seconds since this process started, for the start-to-first-step figure."""
    started = process_start()
    return time.time() - started if started is not None else float("nan")




def check_trainer(tc) -> None:
    """Range checks of trainer.* (types were checked when the config was composed)."""
    for name, low in (("log_every", 1), ("eval_every", 1), ("save_every", 1), ("grad_accum", 1),
                      ("keep_checkpoints", 0), ("max_bad_steps", 0)):
        if int(tc[name]) < low:
            raise ConfigError(f"trainer.{name}={tc[name]} must be >= {low}")
    if tc.exam_pairs is not None and int(tc.exam_pairs) < 1:
        raise ConfigError(f"trainer.exam_pairs={tc.exam_pairs} must be >= 1 (or null for every held-out pair)")
    if int(tc.exam_length) < 8:
        raise ConfigError(f"trainer.exam_length={tc.exam_length} must be >= 8 (room for [CLS] A [SEP] B [SEP])")
    if tc.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={tc.precision!r} must be one of {', '.join(PRECISIONS)}")


def run_training(cfg: DictConfig, run_dir: Path, run_info: dict) -> dict:
    check_trainer(cfg.trainer)
    device = resolve_device(str(cfg.trainer.device))
    # what the device cannot run is said now, not after the data is prepared
    check_attention_fits(str(cfg.model.get("attn_implementation") or "sdpa"), device.type,
                         resolve_precision(str(cfg.trainer.precision), device))
    use_device(device)
    dist = distributed.setup(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        return _train(cfg, Path(run_dir), run_info, device, dist)
    finally:
        distributed.teardown(dist)


@dataclass
class Parts:
    """What a run is built from: data, tokenizer, masking, model, objective, optimizer and precision."""

    data: object
    tokenizer: object
    masker: object
    model: torch.nn.Module  # a transformers model of a bertexp.modeling family
    objective: PretrainingObjective
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: str
    amp: object
    resume_from: Path | None
    spec: object  # the model config's object (bertexp.modeling): a scratch shape, or a pretrained directory


def build(cfg: DictConfig, run_dir: Path, device: torch.device, dist: distributed.Dist, resume_from: Path | None) -> Parts:
    tc = cfg.trainer
    log.info("Instantiating data <%s>", cfg.data._target_)
    data = instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    spec = instantiate(cfg.model)
    for name, length in (("data.max_length", data.max_length), ("trainer.exam_length", int(tc.exam_length))):
        if length > spec.max_positions:
            raise ConfigError(
                f"{name}={length} exceeds the model's position limit ({spec.max_positions}); "
                f"use {name} between 8 and {spec.max_positions}"
            )
    masker = instantiate(cfg.masking)  # validates masking.* before any slow work
    check_objective(spec.family, cfg.objective.nsp_weight, cfg.objective.mlm_bias_init)  # likewise objective.*
    make_objective = instantiate(cfg.objective)
    check_optim(cfg.optim)  # and optim.*: all before the vocabulary is trained and the corpus tokenised
    if resume_from and family_of_dir(resume_from) is not spec.family:
        raise CheckpointError(f"checkpoint {resume_from} is not a {spec.family.name}, which this config builds")
    tokenizer = prepare_data(spec, data, masker, resume_from, int(cfg.seed), dist)
    if resume_from:
        model = load_pretrained(resume_from, getattr(spec, "attn_implementation", "sdpa"))
    else:
        model = spec.build(tokenizer)
    objective = make_objective(model)
    if spec.fresh and not resume_from:
        objective.init_heads(data.train_token_ids())
    model.to(device)
    precision = resolve_precision(str(tc.precision), device)
    apply_matmul_precision(precision, device)
    fit_attention_to_precision(model, device.type, precision)
    ddp = wrap(objective, dist, bool(tc.compile))
    log.info("Model: %.2fM parameters (%.2fM in the encoder layers), vocab %d, device %s, %s%s",
             sum(p.numel() for p in model.parameters()) / 1e6, encoder_params(model) / 1e6, len(tokenizer), device,
             precision, f", {dist.world} ranks" if dist.enabled else "")
    log.info("Instantiating optimizer <%s>", cfg.optim.optimizer._target_)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    return Parts(data, tokenizer, masker, model, objective, ddp, optimizer, scheduler, precision, amp, resume_from, spec)


def prepare_data(spec, data, masker, resume_from: Path | None, seed: int, dist: distributed.Dist):
    """The tokenizer, the tokens and the masking's tables, from the caches; on a first run, built by each
    node's rank 0 while its other ranks wait, then read by them."""
    with distributed.local_main_first(dist):
        tokenizer = load_tokenizer(resume_from) if resume_from else spec.tokenizer(data)
        tokenizer.model_max_length = spec.max_positions  # what its checkpoints say (not 1e30, "no limit")
        data.prepare(tokenizer, seed)
        masker.bind(Vocab.from_tokenizer(tokenizer))
        masker.prepare(data, tokenizer)  # PMI masking: its collocations (cached with the tokens)
    return tokenizer


def wrap(objective: PretrainingObjective, dist: distributed.Dist, compile: bool) -> torch.nn.Module:
    """What the training step calls: the objective, in DDP under torchrun, compiled if asked.

    Compiled outside DDP: dynamo then splits the graph at DDP's gradient buckets, so each bucket's all-reduce
    overlaps the rest of the backward (a module compiled inside DDP yields all its gradients at the end of
    one backward graph). Gradients are views into the buckets: no copy in and out of them per step. The
    sequence width and the count of predicted positions are marked dynamic on the step's tensors (`feed`);
    the batch dimension stays static, so evaluation's batch shape compiles once, not a symbolic graph for both.
    Single process: compiled in place, so the exam runs compiled too."""
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(objective, gradient_as_bucket_view=True)
        if compile:
            ddp.compile(dynamic=None)
        return ddp
    if compile:
        objective.compile(dynamic=None)
    return objective


def restore(parts: Parts, budget: Budget) -> RunState:
    """The run state of the checkpoint to resume from (optimizer, scheduler and RNG restored in place), or a
    fresh one."""
    parts.scheduler.fit(budget)
    if not parts.resume_from:
        return RunState()
    saved = load_trainer_state(parts.resume_from)
    if "run" not in saved or "rng" not in saved:
        raise CheckpointError(f"checkpoint {parts.resume_from}: {STATE_FILE} has no run state (written by an older "
                              "bertexp?); start afresh with trainer.resume=never")
    try:
        parts.optimizer.load_state_dict(saved["optimizer"])
        schedule = saved["scheduler"]
        if "decay_from" not in schedule:  # written when the run state kept where warm-up ended
            schedule = {**schedule, "decay_from": saved["run"].get("decay_from")}
        parts.scheduler.load_state_dict(schedule)
        state = RunState.from_dict(saved["run"])
        set_rng_state(saved["rng"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {parts.resume_from}: its state does not fit this config ({e})") from None
    if "decay_from" not in saved["run"] and "decay_from" not in saved["scheduler"] and state.step > 0:
        if not budget.by_steps:  # a checkpoint of a bertexp before budgets
            raise CheckpointError(f"checkpoint {parts.resume_from} was written before compute budgets existed; "
                                  "resume it with trainer.max_steps, or start afresh with trainer.resume=never")
        log.warning("Checkpoint from an older bertexp: its compute totals (tokens, flops, elapsed_s) start at 0")
    if state.previous is not None:  # the previous step's share of the budget as it is now (it may have changed)
        state.last_increment = budget.progress(state) - budget.progress(SimpleNamespace(**state.previous))
    elif budget.by_steps:
        state.last_increment = 1.0 / budget.max_steps
    parts.scheduler.fit(budget)  # after its state is loaded: the decay's start for the budget as it is now
    log.info("Checkpoint found: resuming from step %d (%s)", state.step, parts.resume_from)
    return state


def _baseline_scores(data, exam, batches) -> dict[str, float]:
    """The counting baselines' scores on the exam, cached on disk beside the tokens: every run of a sweep
    takes the same exam on the same training split, and counting it costs about a second each time."""
    key = key_of(tokens=data.tokens_build_id, split_seed=data.split_seed, val_fraction=data.val_fraction,
                 exam=exam.exam_id, v=BASELINES_VERSION)
    path = data.cache / f"baselines-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    scores = CountingBaselines(data.train_token_ids(), data.vocab_size).score(batches)
    try:
        write_atomically(path, lambda f: f.write(json.dumps(scores).encode()))
    except OSError as e:  # a read-only cache costs a recount next time, nothing else
        log.debug("baseline scores not cached (%s)", e)
    return scores


def prepare_exam(cfg: DictConfig, data, batch_size: int):
    """The exam, its batches and the counting baselines' scores on it (logged once, and with every eval)."""
    tc = cfg.trainer
    length = int(tc.exam_length)
    examples, on_train = data.heldout_examples(length, SHORT_SEQ_PROB)
    exam = build_exam(examples, data.tokens.ids, length, int(data.split_seed), tc.exam_pairs)
    batches = exam.batches(data, batch_size)
    baselines = _baseline_scores(data, exam, batches)
    log.info(
        "Exam %s: %d %s pairs of up to %d tokens, %d blanks (%.0f%% of their tokens, every one [MASK]). Counting "
        "the training split scores: most frequent token %.4f, left-neighbour table %.4f, neighbours table %.4f; "
        "always guessing the more common NSP label %.4f",
        exam.exam_id, exam.num_pairs, "training" if on_train else "held-out", length, exam.num_blanks,
        100 * BLANK_SHARE, baselines["most_frequent"], baselines["left_neighbour"], baselines["neighbours"],
        baselines["nsp_majority"],
    )
    if data.max_length < length:
        log.warning("The exam has pairs of up to %d tokens, but this run trains on at most data.max_length=%d: "
                    "positions beyond that are never trained", length, data.max_length)
    return exam, batches, {f"eval/baseline/{k}_acc": v for k, v in baselines.items()}


def _train(cfg: DictConfig, run_dir: Path, run_info: dict, device: torch.device, dist: distributed.Dist) -> dict:
    """Start (or resume) the run, train until its budget is spent or a signal stops it, close its records."""
    attempt = Attempt.start(cfg, run_dir, run_info, device, dist)
    exit_code = 1
    try:
        with StopFlag() as stop:
            attempt.train(stop)
        exit_code = 0
    except Interrupted as e:
        exit_code = e.exit_code
        raise
    finally:
        attempt.close(exit_code)
    return attempt.report()


@dataclass
class Attempt:
    """One attempt at a run: what it was built from, where it stands, and where it reports."""

    cfg: DictConfig
    run_dir: Path
    info: dict
    device: torch.device
    dist: distributed.Dist
    budget: Budget
    parts: Parts
    state: RunState
    exam_batches: list
    baselines: dict
    exam_id: str
    config: dict  # the resolved config, with provenance and choices: W&B's config and every checkpoint's
    tracker: object
    peak: dict  # the FLOP/s MFU is measured against: {"measured": the matmul timed here, "spec": the data sheet's}
    effective: dict  # the effective values (bertexp.rundir): every checkpoint's run_config.json
    lineage: list  # the pretraining splits of this run and of the models it continues: every checkpoint's
    step_fn: "Stepper" = None
    batches: object = None
    pbar: object = None
    last_eval: dict = None
    first_step_s: float | None = None
    final: dict | None = None
    start_eval: dict | None = None  # the exam before the first step (trainer.eval_at_start)

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, info: dict, device: torch.device, dist: distributed.Dist) -> "Attempt":
        tc = cfg.trainer
        budget = Budget.from_config(tc)
        hf_logging.disable_progress_bar()  # one progress bar (ours), not one per checkpoint shard
        torch.manual_seed(int(cfg.seed))
        np.random.seed(int(cfg.seed) % 2**32)
        claim = info.get("claim") or Claim(run_dir, resume=str(tc.resume), resume_from=resume_target(run_dir, str(tc.resume)))
        parts = build(cfg, run_dir, device, dist, claim.resume_from)
        state = restore(parts, budget)
        exam, exam_batches, baselines = prepare_exam(cfg, parts.data, parts.data.batch_size)
        if state.exam_id not in (None, exam.exam_id):  # e.g. resumed with another trainer.exam_length
            log.warning("This run was scored on exam %s before the resume and on exam %s from now on: its best-so-far "
                        "values start afresh, and comparisons will not rank it", state.exam_id, exam.exam_id)
            state.best = {}
        state.exam_id = exam.exam_id
        config = _run_config(cfg, run_dir, info, claim, parts, state, exam.exam_id, dist)
        recorded = {**config, "model": recorded_vocab(config["model"], parts.model)}  # the vocabulary it has
        tracker = Tracker(run_dir, logger_config(cfg), info, recorded, claim.wandb_resume_id(state.wandb_id)) \
            if dist.main else NullTracker()
        tracker.truncate_after(state.step)  # a fresh start keeps nothing; a resume drops what came after its checkpoint
        state.wandb_id = tracker.run_id
        peak = mfu_peaks(device, parts.precision, bool(tc.measure_mfu))
        effective = claim.effective or effective_config(cfg)  # the claim's: the corpus is fingerprinted once
        lineage = lineage_for(effective, str(Path(run_dir).resolve()), parts.resume_from, getattr(parts.spec, "path", None))
        return cls(cfg, Path(run_dir), info, device, dist, budget, parts, state, exam_batches, baselines, exam.exam_id,
                   config, tracker, peak, effective, lineage, last_eval={})

    def evaluate(self) -> dict:
        record = {**self.state.axes(), **evaluate_exam(self.parts.objective, self.exam_batches, self.device,
                                                       self.parts.amp, self.dist),
                  **self.baselines, "eval/exam_id": self.exam_id}
        self.state.note_eval(record)
        return record

    def checkpoint(self) -> Path | None:
        if not self.dist.main:
            return None
        p, state, info = self.parts, self.state, self.info
        return save_checkpoint(
            self.run_dir, state.step, p.model, p.tokenizer,
            {"run": state.to_dict(), "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
             "config": self.config},
            keep=int(self.cfg.trainer.keep_checkpoints),
            files={RUN_CONFIG: self.effective, LINEAGE: self.lineage,
                   RUN_INFO: {**{k: info.get(k) for k in ("name", "group", "tags", "choices")}, "wandb_id": state.wandb_id}},
        )

    def train(self, stop: StopFlag) -> None:
        """The loop: step, then log, score the exam and checkpoint when it is time, until the budget is spent
        or a signal asks to stop (then checkpoint and raise Interrupted)."""
        cfg, state, budget = self.cfg, self.state, self.budget
        self.step_fn = Stepper(cfg, self.parts, self.run_dir, self.dist, self.device)
        self.batches = _batches(self.parts, budget, state, int(cfg.seed), int(cfg.trainer.grad_accum), self.dist,
                                self.device)
        if not budget.by_steps:
            log.info("The run ends on its budget: %s (trainer.max_steps does not apply)", budget.describe())
        job = self.info.get("job") if self.info.get("multirun") else None
        self.pbar = tqdm(total=budget.max_steps, initial=state.step, desc="train" if job is None else f"job {job} train",
                         dynamic_ncols=True, mininterval=1.0, disable=not self.dist.main)
        self.start_eval = exam_at_start(bool(cfg.trainer.get("eval_at_start")), state, self.evaluate, self.tracker,
                                        self.pbar.write if self.dist.main else None)
        if self.start_eval is None and cfg.trainer.get("eval_at_start"):  # a resume: the exam it began with
            self.start_eval = next((r for r in read_metrics(self.run_dir / "metrics.jsonl")
                                    if r.get("step") == 0 and "eval/mlm_acc" in r), None)
        while not budget.done(state):
            t0 = time.perf_counter()
            batch = masked = None  # the last step's batch is freed before the next is taken (batch_stream)
            batch, masked, next_position = next(self.batches)
            waited = time.perf_counter() - t0
            before = budget.progress(state)
            ends = min(1.0, before + state.last_increment)  # where this step ends: its lr is the schedule's there
            sums, stop_votes = self.step_fn(state, batch, masked, stop, before, ends)
            sums["data_wait"] = waited + self.step_fn.mask_seconds
            state.advance(next_position, time.perf_counter() - t0, **sums)
            if budget.by_time and self.dist.enabled:  # every rank must stop at the same step, with the same lr
                state.train_time = self.dist.sum([state.train_time])[0] / self.dist.world
            state.last_increment = budget.progress(state) - before
            finished = budget.done(state)
            saved = self._after_step(finished)
            if stop_votes and not finished:  # at the last step the run just finishes
                self._stop(stop, saved)
        if not self.last_eval:  # already finished earlier: report the last evaluation again
            self.last_eval = self.evaluate()

    def _after_step(self, finished: bool) -> bool:
        """Log, score and checkpoint as the cadence says; returns whether a checkpoint was written."""
        tc, state = self.cfg.trainer, self.state
        self.pbar.update(1)
        if self.first_step_s is None:
            self.first_step_s = process_age()
            log.info("First step done %.1f s after the process started", self.first_step_s)
        if state.step % int(tc.log_every) == 0 or finished:
            record = train_record(state, self.parts.objective, self.step_fn.lr, self.peak, self.step_fn.flops_per_token,
                                  self.dist)
            self.tracker.log(record)
            self.pbar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{self.step_fn.lr:.2e}",
                                  tok_s=f"{record['throughput/window_tokens_per_s']:.0f}",
                                  **({} if self.budget.by_steps else {"budget": f"{self.budget.progress(state):.0%}"}))
        if state.step % int(tc.eval_every) == 0 or finished:
            self.last_eval = self.evaluate()
            self.tracker.log(self.last_eval)
            if self.dist.main:
                prefix = f"[job {self.info.get('job')}: {self.info.get('name')}] " if self.info.get("multirun") else ""
                self.pbar.write(prefix + describe_eval(self.last_eval))
        saved = state.step % int(tc.save_every) == 0 or finished
        if saved:
            self.checkpoint()
        return saved

    def _stop(self, stop: StopFlag, saved: bool) -> None:
        """A signal asked to stop: checkpoint this step (if not yet), close the records, and raise."""
        if not saved:
            self.checkpoint()
        interrupted = Interrupted(f"stopped by {stop.name} at step {self.state.step}; checkpoint saved — "
                                  + resume_hint(self.cfg.trainer.resume, f"hydra.run.dir={self.run_dir}"), stop.exit_code)
        if stop.signum is not None:  # e.g. submitit: requeue this job; it resumes from the checkpoint
            self.close(interrupted.exit_code)  # W&B gets its summary first: the previous handler may exit the process
            stop.chain()
        raise interrupted

    def close(self, exit_code: int) -> None:
        """Stop the batch workers and the progress bar; write the summary and finish the tracker (once)."""
        if self.batches is not None:
            self.batches.close()
        if self.pbar is not None:
            self.pbar.close()
        if self.final is None:
            logger = self.cfg.get("logger")
            self.final = _close(self.tracker, self.state, self.last_eval, self.first_step_s, self.run_dir, exit_code,
                                log_checkpoint=exit_code == 0 and bool(logger) and bool(logger.get("log_checkpoints")))

    def report(self) -> dict:
        """The final log line and the last console line (where everything this run wrote is); the final dict."""
        final = self.final
        log.info(describe_final(final, self.baselines))
        if self.start_eval and self.dist.main:
            print(before_after(self.start_eval, final))
        if self.dist.main:
            last = self.run_dir / "checkpoints" / "last"
            acc = final.get("final/eval/mlm_acc")
            score = f"Exam mlm_acc {acc:.4f}: {standing(acc, self.baselines)} | " if acc is not None else ""
            print(f"{score}Run dir: {self.run_dir} | final checkpoint: {last if last.exists() else 'none'} | "
                  f"{self.tracker.last_where}", flush=True)
        return final


def _run_config(cfg: DictConfig, run_dir: Path, info: dict, claim: Claim, parts: Parts, state: RunState, exam_id: str,
                dist) -> dict:
    """W&B's config and every checkpoint's: the resolved config, this attempt's provenance (recorded in the run
    dir), the Hydra choices and the masking strategy by name."""
    config = OmegaConf.to_container(cfg, resolve=True)
    lineage = {"resumed_from": str(parts.resume_from) if parts.resume_from else None, "branch": claim.branch,
               "config_changes": {k: list(v) for k, v in claim.changes.items()}}
    attempt = provenance(step=state.step, tokens_build=parts.data.tokens_build_id, vocab=str(parts.tokenizer.name_or_path),
                         exam_id=exam_id, model=model_source(cfg.model), **lineage)
    if dist.main:
        record_provenance(run_dir, attempt)
    config["provenance"] = attempt
    config["choices"] = info.get("choices")  # the Hydra options composed: data, model, masking, ...
    config["masking"]["strategy"] = parts.masker.name  # a plain key to group and filter by in W&B
    return config


def _batches(parts: Parts, budget: Budget, state: RunState, seed: int, accum: int, dist: distributed.Dist,
             device: torch.device):
    """The training batches from the run's position, from `data.num_workers` background workers (null: 2 on a
    GPU, none on a CPU, whose cores the model already uses); masked there too when the masking ratio of a
    step is known in advance (bertexp.data.loader)."""
    data, masker = parts.data, parts.masker
    workers = data.num_workers if data.num_workers is not None else (2 if device.type == "cuda" else 0)
    if masker.schedule.kind == "constant":
        progress_at = lambda step: 0.0  # noqa: E731 - the ratio does not depend on it
    elif budget.by_steps:
        progress_at = lambda step: min(1.0, step / budget.max_steps)  # noqa: E731 - budget.progress, ahead of time
    else:
        progress_at = None
        if workers:
            log.info("The masking schedule runs on a %s budget: batches are masked on the training thread "
                     "(collated by the %d workers)", budget.describe(), workers)
    return batch_stream(data, masker, state.position, data.batch_size, accum * dist.world, chunks_of(dist.rank, accum),
                        seed, state.step, progress_at, workers, pin_memory=device.type == "cuda")


def _close(tracker, state: RunState, last_eval: dict, first_step_s, run_dir: Path, exit_code: int,
           log_checkpoint: bool = False) -> dict:
    """Write the run's summary, then finish the tracker (metrics file and W&B). Called once per run. W&B's
    summary already holds every metric's last value (the final evaluation among them); it gets the best
    evaluation values (best/eval/*), the mean throughput and the time to the first step beside them, each
    once. The returned dict (final/* too) is what the job reports."""
    final = {
        "final/step": state.step,
        **{f"final/{k}": v for k, v in last_eval.items() if k != "step"},
        **{f"best/{k}": v for k, v in state.best.items()},
        "throughput/mean_tokens_per_s": state.tokens / state.train_time if state.train_time else None,
        "time/to_first_step_s": first_step_s,
        "run_dir": str(run_dir),
    }
    tracker.summary({k: v for k, v in final.items() if not k.startswith("final/")})
    if log_checkpoint:
        tracker.log_checkpoint(run_dir / "checkpoints" / "last")
    tracker.finish(exit_code)
    return final


class Stepper:
    """One optimizer step on a global batch: mask, forward and backward over micro-batches (and ranks),
    clip, update. Every draw is seeded from (seed, step), so a resumed run repeats it exactly."""

    def __init__(self, cfg: DictConfig, parts: Parts, run_dir: Path, dist: distributed.Dist, device: torch.device):
        self.p, self.run_dir, self.dist, self.device = parts, run_dir, dist, device
        self.seed, self.accum = int(cfg.seed), int(cfg.trainer.grad_accum)
        self.max_bad_steps = int(cfg.trainer.max_bad_steps)
        clip = cfg.optim.grad_clip
        self.clip = float(clip) if clip is not None and float(clip) > 0 else None  # <= 0 or null: no clipping
        self.compiled = bool(cfg.trainer.compile)
        self.chunks = chunks_of(dist.rank, self.accum)  # this rank's micro-batches of the global batch
        self.params = [q for q in parts.model.parameters() if q.requires_grad]
        self.gen = torch.Generator()
        self.lr = 0.0
        self.mask_seconds = 0.0  # time the last step spent masking on this thread
        # Model FLOPs (bertexp.modeling.ModelFlops): the encoder's per position (MFU), and a step's, whose MLM
        # head runs on the predicted positions only, so a higher prediction ratio costs more
        flops = ModelFlops(parts.model)
        self.flops_per_token, self.step_flops = flops.per_token, flops.step

    def __call__(self, state: RunState, batch: list[dict], masked: list, stop: StopFlag, progress: float,
                 ends: float) -> tuple[dict, bool]:
        """One step from `progress` (the fraction of the run done, which sets the masking ratio) to about `ends`
        (which sets the lr: a step's lr is the schedule's value where the step ends). `batch`: this rank's
        micro-batches; `masked`: their maskings where a batch worker already did them (the same draws:
        bertexp.data.loader), else None."""
        p, dist = self.p, self.dist
        self.lr = p.scheduler.apply(state.step, progress, ends, state.totals())
        self.mask_seconds = 0.0
        masked = list(masked)
        t0 = time.perf_counter()
        for k, (chunk, b) in enumerate(zip(self.chunks, batch)):
            if masked[k] is None:  # on the training thread: part of the time the step waits for its data
                masked[k] = mask_step(p.masker, b, self.seed, state.step, progress, self.gen, chunk=chunk)
        self.mask_seconds = time.perf_counter() - t0
        # The global batch's counts, from every rank's own micro-batches: exchanged on the CPU (no wait for the
        # device), before the forward, which needs the global number of predicted positions and pairs
        mine = [micro_counts(b, m, p.masker.schedule(progress), self.step_flops) for b, m in zip(batch, masked)]
        sums = combine(dist.gather(list(combine(mine).values())))
        n_masked, n_pairs = max(1, int(sums["predicted"])), int(sums["rows"])
        local = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sums stay on the device until the end
        for k, (chunk, b, (ids, labels, *_)) in enumerate(zip(self.chunks, batch, masked)):
            # dropout seeded per micro-batch of the global batch (as its masks are): the same draws for any split
            # of the global batch into ranks and accumulation
            torch.manual_seed(step_seed(self.seed, state.step, 2 + 7 * chunk))
            inputs = feed(b, ids, labels, slice(None), self.device, self.compiled)
            sync = p.ddp.no_sync() if dist.enabled and k < self.accum - 1 else nullcontext()
            with sync:
                with p.amp:
                    mlm_sum, nsp_sum, *_ = p.ddp(*inputs)
                # Global-batch normalisation; DDP averages over ranks, so scale back up by their number.
                loss = p.objective.loss(mlm_sum / n_masked, nsp_sum / n_pairs) * dist.world
                loss.backward()
            local += torch.stack([mlm_sum.detach(), nsp_sum.detach()]).double()
        # a signal that came during this step is seen now, by every rank at once; reading the sums back is the
        # step's one wait for the device
        vote = torch.tensor([float(stop.signum is not None)], dtype=torch.float64).to(self.device, non_blocking=True)
        mlm_g, nsp_g, stop_votes = dist.sum(torch.cat([local, vote]))
        mlm, nsp = mlm_g / n_masked, nsp_g / n_pairs
        if math.isfinite(mlm + nsp):
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            p.optimizer.step()
        else:
            state.bad_steps += 1
            if state.bad_steps > self.max_bad_steps:
                raise TrainingError(
                    f"non-finite loss ({mlm + nsp}) at step {state.step + 1}; last good checkpoint: "
                    f"{latest_checkpoint(self.run_dir) or 'none'} (lower optim.lr, or allow trainer.max_bad_steps)"
                )
            log.warning("Non-finite loss at step %d: update skipped (%d/%d allowed)", state.step + 1, state.bad_steps, self.max_bad_steps)
        p.optimizer.zero_grad(set_to_none=True)
        sums["mlm"], sums["nsp"] = (mlm if math.isfinite(mlm) else 0.0), (nsp if math.isfinite(nsp) else 0.0)
        return sums, bool(stop_votes)


# A micro-batch's counts, summed over the global batch (the widest padded row: its maximum)
COUNTS = ("tokens", "selected", "corrupted", "predicted", "maskable", "scheduled", "seq", "rows", "width",
          "nsp_random", "flops")


def micro_counts(batch: dict, masked, ratio: float, step_flops) -> list[float]:
    ids, labels, selected, corrupted = masked
    maskable = int((~batch["special_tokens_mask"]).sum())
    predicted = int((labels != -100).sum())
    rows, width = ids.shape
    return [int(batch["attention_mask"].sum()), int(selected.sum()), int(corrupted.sum()), predicted, maskable,
            ratio * maskable, rows * width, rows, width,
            int(batch["next_sentence_label"].sum()),  # label 1: B is not A's next sentence
            float(step_flops(rows, width, predicted))]


def combine(parts: list[list[float]]) -> dict[str, float]:
    """Counts of micro-batches (or of ranks) as one: sums, and the widest width."""
    return {name: (max if name == "width" else sum)(p[i] for p in parts) for i, name in enumerate(COUNTS)}


def mfu_peaks(device: torch.device, precision: str, measure: bool) -> dict[str, float]:
    """The MFU denominators: `measured`, the matmul throughput timed now on this device in the precision the
    run computes in (trainer.measure_mfu); `spec`, the device's dense data-sheet peak (bertexp.device.SPEC_PEAKS,
    a known GPU only), the denominator of published MFU (MosaicBERT, ModernBERT). A timed matmul falls short
    of the data sheet, so MFU against it reads higher than the published kind."""
    peaks = {}
    if measure:
        peaks["measured"] = matmul_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    spec = spec_peak(device, precision)
    if spec:
        peaks["spec"] = spec
    for name, value in peaks.items():
        log.info("MFU denominator (%s peak, %s): %.1f TFLOP/s", name, precision, value / 1e12)
    return peaks


def train_record(state: RunState, objective: PretrainingObjective, lr: float, peak: dict, flops_per_token,
                 dist) -> dict:
    """The `train/*` record of the logging window that ends at this step."""
    w = state.take_window()
    n = max(w["steps"], 1)
    tps = w["tokens"] / max(w["time"], 1e-9)
    record = {
        **state.axes(),
        "train/loss": (w["mlm"] + objective.nsp_weight * w["nsp"]) / n,  # what is minimised
        "train/mlm_loss": w["mlm"] / n,
        **({"train/nsp_loss": w["nsp"] / n} if objective.has_nsp else {}),  # a model without the head has no loss
        "train/lr": lr,
        "train/epoch": state.epoch,
        "train/max_seq_len": int(w["width"]),  # widest padded batch of the window
        # shares of the window's non-special tokens: scheduled (weighted by tokens), selected, corrupted, predicted
        "masking/ratio": w["scheduled"] / max(w["maskable"], 1),
        "masking/realized_ratio": w["selected"] / max(w["maskable"], 1),
        "masking/corrupted_ratio": w["corrupted"] / max(w["maskable"], 1),
        "masking/predicted_ratio": w["predicted"] / max(w["maskable"], 1),
        "data/nsp_random_share": w["nsp_random"] / max(w["rows"], 1),  # BERT's recipe: about 0.55
        # one statistic per name: this window's rate (the progress bar's), and the run's mean so far (its total
        # tokens over its total training seconds): the final line, the sweep table and W&B's summary show the mean
        "throughput/window_tokens_per_s": tps,
        "throughput/mean_tokens_per_s": state.tokens / max(state.train_time, 1e-9),
        "throughput/data_wait_s": w["data_wait"] / n,  # per step: how long the loop waited for its batch
    }
    model_flops = flops_per_token(w["seq"] / max(w["rows"], 1)) * tps
    for name, value in peak.items():  # mfu_measured: against the matmul timed here; mfu_spec: the data sheet's
        record[f"throughput/mfu_{name}"] = model_flops / (value * dist.world)
    return record


def describe_eval(e: dict) -> str:
    acc = e["eval/mlm_acc"]
    return (f"step {e['step']}: exam mlm_acc {acc:.4f} ({standing(acc, e)}), top-5 "
            f"{e['eval/mlm_top5_acc']:.4f}, mlm_loss {e['eval/mlm_loss']:.3f}"
            + (f", nsp_acc {e['eval/nsp_acc']:.3f}" if "eval/nsp_acc" in e else ""))


def describe_final(final: dict, baselines: dict) -> str:
    acc = final.get("final/eval/mlm_acc", float("nan"))
    mf = baselines["eval/baseline/most_frequent_acc"]
    tps = final["throughput/mean_tokens_per_s"]
    nsp = f"eval/nsp_acc {final['final/eval/nsp_acc']:.3f}; " if "final/eval/nsp_acc" in final else ""
    return (f"Finished at step {final['final/step']}: exam mlm_acc {acc:.4f} = {acc / max(mf, 1e-9):.2f}x the "
            f"most-frequent token; {standing(acc, baselines)}. {nsp}"
            f"mean {f'{tps:.0f}' if tps else 'n/a'} tokens/s")
