"""One Hydra job: name it, run it, record how it ended, and turn user errors into one line."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from bertexp.errors import BertexpError, Interrupted

log = logging.getLogger("bertexp")
STATUS_FILE = "status.json"


# Overrides that say nothing about the experiment: left out of run names.
_NOT_IN_NAMES = ("hydra.", "hydra/", "+hydra", "logger", "trainer.resume", "trainer.allow_changes", "data.cache_dir",
                 "data.num_proc", "data.num_workers", "model.path", "trainer.log_every", "trainer.eval_every",
                 "trainer.save_every", "trainer.keep_checkpoints")
NAME_CHARS = 64


def _short(override: str) -> str:
    """`data.path=/long/dir/corpus.txt` -> `data.path=corpus.txt`: names show what differs, not where."""
    key, _, value = override.partition("=")
    return f"{key}={Path(value.rstrip('/')).name}" if "/" in value else override


def run_info(cfg: DictConfig) -> dict:
    """W&B name, group, tags and notes of this job, from what the user typed and which options composed."""
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "hydra/", "+hydra"))]
    multirun = hc.mode == RunMode.MULTIRUN
    default_name = f"{choices.get('model')}-{choices.get('masking')}-{cfg.masking.ratio:g}"
    named = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAMES)]
    if multirun:  # a sweep's runs are named by their swept values alone, e.g. masking=span,masking.ratio=0.4
        swept = swept_keys(hc)
        named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or named
    name = ",".join(_short(o) for o in named) or default_name
    if len(name) > NAME_CHARS:
        name = name[: NAME_CHARS - 1] + "…"
    smoke = choices.get("trainer") == "smoke"
    tags = [str(choices.get(k)) for k in ("data", "model", "masking", "objective") if choices.get(k)]
    return {
        "name": name,
        "group": wandb_group(cfg, hc.sweep.dir if multirun else None, hc if multirun else None, smoke),
        "tags": tags + ["smoke"] * smoke + ["sweep"] * multirun,
        "notes": "python run.py " + " ".join(sys.argv[1:]),
        "overrides": overrides,
        "multirun": multirun,
        "job": hc.job.num if multirun else None,
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None},
    }


def wandb_group(cfg: DictConfig, sweep_dir=None, hydra_cfg=None, smoke: bool = False) -> str:
    """The W&B group of a run: logger.group if set; for every job of a sweep and its summary run, the sweep's
    `experiment` (or `sweep` and the swept keys) with the date and time it started; else `experiment`
    (`smoke` for smoke runs, so they never sit among real ones)."""
    group = cfg.logger.get("group") if cfg.get("logger") else None
    if group:
        return str(group)
    if sweep_dir is not None:
        what = str(cfg.experiment)
        if what == "default":
            keys = sorted(swept_keys(hydra_cfg)) if hydra_cfg is not None else []
            what = "sweep " + ("+".join(keys) if keys else Path(sweep_dir).name)
        return f"{what} {_sweep_started(Path(sweep_dir))}"
    if smoke and cfg.experiment == "default":
        return "smoke"
    return str(cfg.experiment)


def _sweep_started(sweep_dir: Path) -> str:
    """`multirun/2026-11-30/07-39-48-478165` -> `2026-11-30 07:39:48`; any other dir: its name."""
    import re

    m = re.fullmatch(r"(\d{2})-(\d{2})-(\d{2})(?:-\d+)?", sweep_dir.name)
    if m and re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name} {':'.join(m.groups())}"
    return sweep_dir.name


_SWEEP_FUNCS = ("choice(", "range(", "interval(", "glob(", "tag(")


def swept_keys(hc) -> set[str]:
    """Keys a multirun varies: `hydra.sweeper.params` of a sweep file plus command-line overrides with
    several values (a,b or choice/range/interval/glob).

    The command line is read from the sweep's own record (`multirun.yaml`, written by Hydra's sweeper in the
    sweep dir before any job starts), not from this process's argv: under submitit a job runs in a worker
    whose argv is submitit's, not the user's."""
    keys = set()
    params = hc.sweeper.get("params") if hc.sweeper else None
    if params:
        keys.update(str(k) for k in params.keys())
    record = Path(hc.sweep.dir) / "multirun.yaml"
    if record.is_file():
        from omegaconf import OmegaConf

        args = list(OmegaConf.load(record).hydra.overrides.task)
    else:
        args = sys.argv[1:]
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        depth, has_comma = 0, False
        for ch in value:
            depth += ch in "[({"
            depth -= ch in "])}"
            has_comma |= ch == "," and depth == 0
        if has_comma or value.startswith(_SWEEP_FUNCS):
            keys.add(key.lstrip("+~"))
    return keys


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


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _claim(cfg: DictConfig, run_dir: Path, hc, multirun: bool):
    """Lock the run dir and check that this launch may train in it (bertexp.rundir). A sweep's record of its
    command line (multirun.yaml, rewritten by Hydra on every launch) is put back too when a job is refused."""
    import shutil

    from bertexp.rundir import claim

    sweep_record = Path(run_dir).parent / "multirun.yaml"
    sweep_first = Path(run_dir).parent / "multirun.first.yaml"
    if multirun and sweep_record.is_file() and not sweep_first.is_file():
        shutil.copy(sweep_record, sweep_first)
    try:
        return claim(cfg, run_dir, sweep_job=hc.job.num if multirun else None)
    except BertexpError:
        if multirun and sweep_first.is_file():
            shutil.copy(sweep_first, sweep_record)
        raise


def write_status(run_dir: Path, status: str, **extra) -> None:
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": status, **extra}, ensure_ascii=False))
    tmp.replace(path)


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
    try:
        claimed = _claim(cfg, run_dir, hc, info["multirun"])
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
    info = {**info, "branch": claimed.branch, "changes": claimed.changes}
    write_status(run_dir, "running", name=info["name"])
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
        write_status(run_dir, "interrupted", name=info["name"], error=str(e))
        if info["multirun"]:
            _stop_sweep(hc, e)
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except (BertexpError, OmegaConfBaseException) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_status(run_dir, "failed", name=info["name"], error=msg)
        if info["multirun"]:
            # Not raised: Hydra's sweeper would stop at the first failed result and never write the
            # sweep summary. The job is marked failed in status.json (and W&B); the sweep exits 1 at the end.
            log.error("job %s failed: %s", hc.job.num, msg)
            return float("nan")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:  # a launcher's pre-emption handler (submitit) requeues the job after our checkpoint
        write_status(run_dir, "interrupted", name=info["name"], error="requeued after a checkpoint")
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training (while tokenising): stop now
        from bertexp.rundir import resume_hint

        write_status(run_dir, "interrupted", name=info["name"], error="KeyboardInterrupt")
        stopped = Interrupted("stopped by Ctrl-C (no checkpoint of the current step); "
                              + resume_hint(cfg.trainer.resume, f"hydra.run.dir={run_dir}"), 130)
        if info["multirun"]:
            _stop_sweep(hc, stopped)
        print(str(stopped), file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        write_status(run_dir, "failed", name=info["name"], error=msg)
        if info["multirun"]:
            # A bug or the machine (out of memory, a dead GPU) failed this job: record it with its traceback
            # and go on, so the rest of the sweep runs and its summary is written.
            log.exception("job %s failed", hc.job.num)
            return float("nan")
        raise
    result = final.get("final/eval/mlm_acc")
    write_status(run_dir, "completed", name=info["name"], result=result, **final.get("status", {}))
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


def _logger(cfg: DictConfig) -> dict | None:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None


def run_task(cfg: DictConfig, run_dir: Path, info: dict) -> dict:
    """`task=NAME model.path=CKPT`: fine-tune a checkpoint on a downstream task (bertexp.finetune)."""
    from bertexp.finetune import run_finetune
    from bertexp.hub import resolve

    if not cfg.model.get("path"):
        from bertexp.errors import ConfigError

        raise ConfigError(f"task={cfg.task.name} needs model.path=DIR (a pretraining run's checkpoints/last, or "
                          "a local pretrained BERT directory) or a Hugging Face Hub id")
    typed = {k[len("data."):]: cfg.data.get(k[len("data."):]) for k in _typed_keys() if k.startswith("data.")}
    summary = run_finetune(cfg.task, resolve(cfg.model.path, cfg.model.get("revision")).dir, cfg.data, cfg.optim, cfg.trainer, run_dir,
                           _logger(cfg), int(cfg.seed), info, typed_data=typed)
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
            summary = run_finetune(tc, ckpt, cfg.data, cfg.optim, cfg.trainer, where, _logger(cfg), int(cfg.seed),
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
