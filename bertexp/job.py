"""One Hydra job: name it, run it, record how it ended, and turn user errors into one line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from bertexp.errors import BertexpError, Interrupted
from bertexp.naming import run_info
from bertexp.rundir import logger_config

log = logging.getLogger("bertexp")


def _share_cores(hc) -> None:
    """Parallel local jobs (hydra/launcher=joblib) split the cores instead of each taking all of them."""
    target = str(hc.launcher.get("_target_", "")) if hc.launcher else ""
    if "Joblib" not in target:
        return
    import os

    import torch

    cores = os.cpu_count() or 1
    n_jobs = int(hc.launcher.get("n_jobs", -1) or -1)
    parallel = cores if n_jobs < 0 else max(1, n_jobs)
    torch.set_num_threads(max(1, cores // parallel))
    log.info("joblib launcher: %d parallel jobs share %d cores, %d torch threads each", parallel, cores, torch.get_num_threads())


def check_inputs(cfg: DictConfig) -> None:
    """The files a run reads, checked before the seconds of importing torch and transformers: a missing or
    unreadable corpus, or a missing model directory, is a one-line error at once. (The full checks run again
    where the files are used.)"""
    from bertexp.data.sources import PeoplesDaily, TextFiles

    data, target = cfg.data, str(cfg.data.get("_target_", ""))
    if target.endswith(".from_text_file"):
        source = TextFiles(data.get("path"), data.get("encoding", "utf-8"), data.get("segmenter", "rjieba"),
                           data.get("text_field", "text"), data.get("documents", "auto"))
        for f in source.files[:8]:  # a directory of thousands of shards: the first few now, all when fingerprinted
            source._check_head(f)
    elif target.endswith(".from_peoples_daily") and data.get("path"):
        PeoplesDaily(data.path).fingerprint()
    model_path = cfg.model.get("path")
    if model_path and (cfg.get("task") or str(cfg.model.get("_target_", "")).endswith("PretrainedBert")):
        from bertexp.hub import resolve

        resolve(model_path, cfg.model.get("revision"))  # a directory, or a Hub id (fetched or found in the HF cache)
    sweeps = Path(__file__).resolve().parents[1] / "multirun_sweeps"
    typed = [o.split("=", 1)[0] for o in HydraConfig.get().overrides.task]
    if "experiment" in typed and HydraConfig.get().mode != RunMode.MULTIRUN and (sweeps / f"{cfg.experiment}.yaml").is_file():
        raise BertexpError(f"experiment={cfg.experiment} only names a run's W&B group; the ready sweep of that name runs "
                           f"with: python run.py -cd multirun_sweeps -cn {cfg.experiment}")


def run_job(cfg: DictConfig) -> float | None:
    """Entry point called by run.py's @hydra.main; returns eval/mlm_acc for sweepers to optimise."""
    import os

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # (bertexp.distributed.is_main_process, without importing torch)
        try:
            check_inputs(cfg)
        except BertexpError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    from bertexp.distributed import is_main_process
    from bertexp.train import run_training  # heavy imports after the command line and its files are checked

    info = run_info(cfg)
    _share_cores(hc)
    if not is_main_process():  # under torchrun: rank 0 speaks and writes for all
        logging.getLogger().setLevel(logging.WARNING)
        return _run_quiet_rank(cfg, run_dir, info, run_training)
    if not cfg.get("task") and cfg.trainer.get("downstream"):
        try:
            from bertexp.finetune import check_downstream

            check_downstream(cfg)  # now, not after an hour of pretraining
        except BertexpError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    from bertexp.lifecycle import claim

    try:
        claimed = claim(cfg, run_dir, sweep_job=hc.job.num if info["multirun"] else None)
    except BertexpError as e:  # a sweep stops whole: going on would mix two experiments' results
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        return _run_claimed(cfg, run_dir, info, hc, claimed, run_training)
    finally:
        claimed.release()


def _run_claimed(cfg: DictConfig, run_dir: Path, info: dict, hc, claimed, run_training) -> float | None:
    previous = claimed.previous_status
    if claimed.skip:
        log.info("Job %s (%s) already completed in %s: not run again, its files untouched", hc.job.num,
                 info["name"], run_dir)
        return previous.get("result")
    if info["multirun"] and previous:
        log.info("Job %s (%s) was %s: resuming it in %s", hc.job.num, info["name"], previous.get("status"), run_dir)
    info = {**info, "claim": claimed}
    claimed.status("running", name=info["name"])
    try:
        try:
            if cfg.get("task"):
                final = run_task(cfg, run_dir, info)
            else:
                final = run_training(cfg, run_dir, info)
                final.update(_downstream_kept_apart(cfg, run_dir, info))
        except InstantiationException as e:  # Hydra wraps what a _target_ raised: show the user's error
            raise _user_error(e) or e
    except Interrupted as e:
        claimed.status("interrupted", name=info["name"], error=str(e))
        if info["multirun"]:
            _stop_sweep(hc, e)
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except (BertexpError, OmegaConfBaseException) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        claimed.status("failed", name=info["name"], error=msg)
        if info["multirun"]:
            # Not raised: Hydra's sweeper would stop at the first failed result and never write the
            # sweep summary. The job is marked failed in status.json (and W&B); the sweep exits 1 at the end.
            log.error("job %s failed: %s", hc.job.num, msg)
            return float("nan")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:  # a launcher's pre-emption handler (submitit) requeues the job after our checkpoint
        claimed.status("interrupted", name=info["name"], error="requeued after a checkpoint")
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training (while tokenising): stop now
        from bertexp.lifecycle import resume_hint

        claimed.status("interrupted", name=info["name"], error="KeyboardInterrupt")
        stopped = Interrupted("stopped by Ctrl-C (no checkpoint of the current step); "
                              + resume_hint(cfg.trainer.resume, f"hydra.run.dir={run_dir}"), 130)
        if info["multirun"]:
            _stop_sweep(hc, stopped)
        print(str(stopped), file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        claimed.status("failed", name=info["name"], error=msg)
        if info["multirun"]:
            # A bug or the machine (out of memory, a dead GPU) failed this job: record it with its traceback
            # and go on, so the rest of the sweep runs and its summary is written.
            log.exception("job %s failed", hc.job.num)
            return float("nan")
        raise
    result = final.get("final/eval/mlm_acc")
    claimed.status("completed", name=info["name"], result=result, **final.get("status", {}))
    failed = final.get("status", {}).get("downstream_error")
    if failed and not info["multirun"]:
        print(f"error: {failed} (pretraining completed: its checkpoints and metrics are in {run_dir})", file=sys.stderr)
        sys.exit(2)
    return result


def _downstream_kept_apart(cfg: DictConfig, run_dir: Path, info: dict) -> dict:
    """trainer.downstream after a completed pretraining run. A failure there is the downstream's: the
    pretraining stays completed (its results count in comparisons and seed groups), with the error beside it."""
    try:
        return run_downstream(cfg, run_dir, info)
    except Interrupted:
        raise
    except Exception as e:  # noqa: BLE001 - reported in status.json and the sweep summary, not lost
        user = _user_error(e)
        msg = str(user or f"{type(e).__name__}: {e}").splitlines()[0]
        if user is None:
            log.exception("downstream evaluation failed")
        return {"status": {"downstream_error": f"downstream: {msg}", "error": f"downstream: {msg}"}}


def run_task(cfg: DictConfig, run_dir: Path, info: dict) -> dict:
    """`task=NAME model.path=CKPT`: fine-tune a checkpoint on a downstream task (bertexp.finetune)."""
    from bertexp.finetune import run_finetune
    from bertexp.hub import resolve

    if not cfg.model.get("path"):
        from bertexp.errors import ConfigError

        raise ConfigError(f"task={cfg.task.name} needs model.path=DIR (a pretraining run's checkpoints/last, or "
                          "a local pretrained BERT directory) or a Hugging Face Hub id")
    typed = {k[len("data."):]: cfg.data.get(k[len("data."):]) for k in _typed_keys() if k.startswith("data.")}
    summary = run_finetune(cfg.task, resolve(cfg.model.path, cfg.model.get("revision")).dir, cfg.data, cfg.optim,
                           cfg.trainer, run_dir, logger_config(cfg), int(cfg.seed), info, typed_data=typed)
    from bertexp.finetune import final_line

    print(final_line(summary, run_dir), flush=True)
    # what a sweeper optimises over fine-tuning settings: dev, never test
    out = {"final/eval/mlm_acc": summary["pretrained"]["dev"]["mean"]}
    if summary.get("pretrain_split"):
        out["status"] = {"pretrain_split": summary["pretrain_split"]}
    return out


def _typed_keys() -> list[str]:
    """The keys the user set on the command line (not Hydra's own)."""
    overrides = HydraConfig.get().overrides.task
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o and not o.startswith(("hydra.", "hydra/"))]


def run_downstream(cfg: DictConfig, run_dir: Path, info: dict) -> dict:
    """`trainer.downstream=[...]`: fine-tune this run's final checkpoint on each task; results go to
    RUN/downstream/TASK/ and into the run's status (so sweep summaries and bertexp.compare show them).
    `trainer.downstream_every_checkpoint=true` also fine-tunes every earlier checkpoint still on disk (into
    RUN/downstream/TASK/steps/step_N/) and writes the downstream-vs-pretraining-step curve, curve.csv (random
    init is trained once: its results are reused for every checkpoint)."""
    from bertexp.checkpoint import checkpoint_dirs
    from bertexp.finetune import downstream_configs, run_finetune

    out = {}
    last = (run_dir / "checkpoints" / "last").resolve()
    every = bool(cfg.trainer.get("downstream_every_checkpoint", False))
    points = [p for _, p in checkpoint_dirs(run_dir) if p.resolve() != last] if every else []
    for name, tc in downstream_configs(cfg.trainer).items():
        curve = []
        for ckpt in [*points, run_dir / "checkpoints" / "last"]:
            final = ckpt not in points
            where = run_dir / "downstream" / name if final else run_dir / "downstream" / name / "steps" / ckpt.name
            summary = run_finetune(tc, ckpt, cfg.data, cfg.optim, cfg.trainer, where, logger_config(cfg), int(cfg.seed),
                                   {**info, "name": f"{info['name']} {name}" + ("" if final else f" {ckpt.name}")})
            curve.append(summary)
        out[f"downstream/{name}/test_mean"] = summary["pretrained"]["test"]["mean"]
        out[f"downstream/{name}/test_sd"] = summary["pretrained"]["test"]["sd"]
        if every:
            write_curve(run_dir / "downstream" / name / "curve.csv", curve)
    return out


def write_curve(path: Path, summaries: list[dict]) -> None:
    """The downstream-vs-pretraining-step curve of one task: a row per checkpoint, printed and written as CSV."""
    import csv
    import io

    header = ["pretrain_step", "pretrained test mean", "pretrained test sd", "random init test mean",
              "random init test sd", "baseline test", "n"]
    rows = [[s.get("pretrain/step"), s["pretrained"]["test"]["mean"], s["pretrained"]["test"]["sd"],
             s["random"]["test"]["mean"], s["random"]["test"]["sd"], s["baseline"]["test"], s["pretrained"]["test"]["n"]]
            for s in summaries]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")
    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    last = summaries[-1]
    lines = [(f"{last['task']} test {last['metric']} by pretraining step (mean ± sd over fine-tuning seeds; random "
              f"init {fmt(rows[-1][3])} ± {fmt(rows[-1][4])}, {last['baseline']['name']} {fmt(rows[-1][5])}):")]
    lines += [f"  step {r[0]:>7}: {fmt(r[1])} ± {fmt(r[2])}" for r in rows]
    print("\n".join(lines) + f"\nWritten: {path}")


def _stop_sweep(hc, e: Interrupted) -> None:
    """A signal stops the whole sweep, not just this job: summarise what ran, say how to go on, exit."""
    from bertexp.sweep import write_summary

    sweep_dir = Path(hc.sweep.dir)
    write_summary(sweep_dir)
    print(
        f"{e}\nSweep stopped at job {hc.job.num}. Resume it with the same command and hydra.sweep.dir={sweep_dir}: "
        "every job continues from its last checkpoint, and finished jobs only report their result again.",
        file=sys.stderr,
    )
    sys.exit(e.exit_code)


def _run_quiet_rank(cfg, run_dir, info, run_training):
    try:
        final = run_training(cfg, run_dir, info)
    except BertexpError as e:  # rank 0 reports the same error; exit quietly with the same status
        sys.exit(e.exit_code if isinstance(e, Interrupted) else 2)
    return final.get("final/eval/mlm_acc")


def _user_error(e: BaseException) -> BertexpError | None:
    while e is not None:
        if isinstance(e, BertexpError):
            return e
        e = e.__cause__ or e.__context__
    return None
