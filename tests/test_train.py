"""Fast in-process runs on both data sources: metrics, checkpoints, W&B offline files, pretrained round
trip, exact resume, and the non-finite loss stop."""
import json
import shutil

import pytest
import torch

from bertexp.checkpoint import checkpoint_dirs
from bertexp.errors import TrainingError
from bertexp.tracking import read_metrics
from conftest import ESSAY, compose, run_in_process, signal_at_training_call
from wandb_reader import inspect, wandb_files

REQUIRED_TRAIN = {"step", "train/loss", "train/mlm_loss", "train/nsp_loss", "train/lr", "throughput/window_tokens_per_s", "throughput/mean_tokens_per_s", "masking/realized_ratio"}
REQUIRED_EVAL = {"step", "eval/mlm_loss", "eval/mlm_acc", "eval/perplexity", "eval/nsp_acc"}


def test_peoples_daily_smoke_run_writes_everything(tmp_path):
    final = run_in_process(tmp_path, ["trainer.max_steps=4"], name="smoke-pd")
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/mlm_acc" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert REQUIRED_TRAIN <= set(train[0]) and REQUIRED_EVAL <= set(evals[0])
    assert final["final/step"] == 4
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 4]
    last = tmp_path / "checkpoints" / "last"
    assert last.resolve().name == "step_0000004"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (last / f).is_file(), f
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "run"} <= set(state)
    assert {"step", "epoch", "index", "window", "best", "bad_steps"} <= set(state["run"])


def test_wandb_offline_runs_read_back(tmp_path):
    """Two tiny offline runs, read back with wandb's own reader: identity, nested config and history."""
    for ratio in (0.2, 0.4):
        d = tmp_path / str(ratio)
        run_in_process(d, ["trainer.max_steps=4", f"masking.ratio={ratio}"], name=f"masking.ratio={ratio}")
        files = wandb_files(d)
        assert len(files) == 1
        got = inspect(files[0])
        run = got["run"]
        assert run["display_name"] == f"masking.ratio={ratio}" and run["run_group"] == "tests"
        assert run["tags"] == ["test"]
        cfg = run["config"]["update"]
        assert cfg["masking"]["ratio"] == ratio and cfg["optim"]["lr"] == compose().optim.lr and cfg["trainer"]["max_steps"] == 4
        assert cfg["model"]["hidden_size"] == 128
        # history equals metrics.jsonl, record for record
        records = read_metrics(d / "metrics.jsonl")
        assert len(got["history"]) == len(records)
        for h, r in zip(got["history"], records):
            for k, v in r.items():
                assert h[k] == (v if isinstance(v, str) else pytest.approx(v)), k


def test_essay_run(tmp_path):
    # acceptance 3 of issue 2, in process
    final = run_in_process(tmp_path, [
        "data=text_file", f"data.path={ESSAY}", "data.max_length=25", "data.batch_size=16", "optim.lr=1e-3",
        "trainer.max_steps=20", "trainer.eval_every=10", "trainer.save_every=10", "logger=none",
    ])
    assert final["final/step"] == 20
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 20 and train[-1]["train/loss"] < train[0]["train/loss"]


def test_pretrained_round_trip_uses_its_weights_and_heads(tmp_path, pd_data):
    """A BertForPreTraining directory: our first-step loss equals what BertForPreTraining computes."""
    from hydra.utils import instantiate
    from transformers import BertConfig, BertForPreTraining

    from bertexp.data.dataset import Position
    from bertexp.masking import Vocab
    from bertexp.train import step_seed

    _, tok = pd_data
    model_dir = tmp_path / "bert"
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(123)
    ref = BertForPreTraining(cfg)
    with torch.no_grad():  # heads that are clearly not a fresh initialisation
        ref.cls.seq_relationship.bias.copy_(torch.tensor([2.0, -2.0]))
    ref.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    overrides = ["model=pretrained", f"model.path={model_dir}", "trainer.max_steps=1", "trainer.precision=fp32",
                 "objective.nsp_weight=1.0", "logger=none"]  # BertForPreTraining's loss: MLM + NSP
    run_in_process(tmp_path / "run", overrides)
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]

    # the same batch and mask, through BertForPreTraining itself
    c = compose(["trainer=smoke", *overrides])
    data = instantiate(c.data)
    data.prepare(tok, seed=int(c.seed))
    masker = instantiate(c.masking).bind(Vocab.from_tokenizer(tok))
    batch, _ = next(data.train_batches(Position()))
    ids, labels, *_ = masker(batch, torch.Generator().manual_seed(step_seed(int(c.seed), 0, 1)))
    ref.eval()
    out = ref(input_ids=ids, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
              labels=labels, next_sentence_label=batch["next_sentence_label"])
    assert first["train/loss"] == pytest.approx(float(out.loss.detach()), rel=1e-5)


@pytest.mark.parametrize("masking", [[], ["masking=pmi", "masking.schedule=linear", "masking.ratio=0.4",
                                     "masking.final_ratio=0.15", "masking.prediction_ratio=0.1"]],
                         ids=["token", "pmi-linear-schedule-prediction-subset"])
def test_resume_continues_exactly(tmp_path, masking):
    """Checkpoints at steps that are not multiples of log_every: the logging window, best-so-far values and
    every record after the resume equal an uninterrupted run's (with a masking schedule too: the ratio is a
    function of the step)."""
    overrides = ["trainer.max_steps=10", "trainer.log_every=3", "trainer.save_every=4", "trainer.eval_every=2",
                 "trainer.keep_checkpoints=0", "trainer.precision=fp32", "optim.lr=5e-3", "logger=none", *masking]
    final_a = run_in_process(tmp_path / "a", overrides)
    run_in_process(tmp_path / "b", overrides)
    # interrupt b after step 4: its later checkpoints and records never happened
    for step in (8, 10):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / f"step_{step:07d}")
    # a best value from before the resume that training cannot reach again: the resumed run must report it
    state_file = tmp_path / "b" / "checkpoints" / "step_0000004" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["run"]["best"]["eval/nsp_acc"] = 1.0
    torch.save(state, state_file)
    final_b = run_in_process(tmp_path / "b", overrides)
    assert final_b["best/eval/nsp_acc"] == 1.0
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    train_b = [r for r in b if "train/loss" in r]
    assert [r["step"] for r in train_b] == [3, 6, 9, 10]  # nothing missing, nothing twice
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys() and ra["step"] == rb["step"]
        for k in ra:
            if k.startswith(("train/", "eval/", "masking/")) and isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    best = {k: v for k, v in final_a.items() if k.startswith("best/") and k != "best/eval/nsp_acc"}
    assert best and {k: final_b[k] for k in best} == pytest.approx(best)


def test_run_state_round_trips_whole():
    from bertexp.data.dataset import Position
    from bertexp.run_state import RunState

    s = RunState()
    s.advance(Position(1, 64), 0.5, mlm=6.0, nsp=0.7, tokens=4000, selected=600, maskable=4000, seq=4096, rows=32, width=128)
    s.note_eval({"eval/mlm_acc": 0.2, "eval/mlm_loss": 5.0, "eval/nsp_acc": float("nan")})
    s.note_eval({"eval/mlm_acc": 0.1, "eval/mlm_loss": 6.0})
    t = RunState.from_dict(s.to_dict())
    assert t == s and t.best == {"eval/mlm_acc": 0.2, "eval/mlm_loss": 5.0} and t.window["mlm"] == 6.0
    assert t.position == Position(1, 64) and t.step == 1


def test_a_fresh_start_never_keeps_old_records(tmp_path):
    """A run dir reused without a checkpoint to resume (a kill before the first save, or resume=never)
    starts metrics.jsonl afresh instead of appending a second run's steps to the first's."""
    ov = ["trainer.max_steps=4", "trainer.log_every=1", "trainer.save_every=100", "logger=none"]
    run_in_process(tmp_path, ov)  # saves only at the end (step 4)...
    shutil.rmtree(tmp_path / "checkpoints")  # ...as if killed before any checkpoint
    run_in_process(tmp_path, ov)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]
    run_in_process(tmp_path, [*ov, "trainer.resume=never"])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]


def test_grad_clip_zero_or_null_means_no_clipping(tmp_path):
    """grad_clip=0 used to scale every gradient by 0: no learning at all."""
    losses = {}
    for clip in ("null", "0", "-1"):
        run_in_process(tmp_path / clip, ["trainer.max_steps=4", "trainer.log_every=1", "trainer.precision=fp32",
                                         "model.initializer_range=0.02", "objective.mlm_bias_init=zero",  # HF's init
                                         "optim.warmup_steps=0", "optim.lr=1e-2", f"optim.grad_clip={clip}", "logger=none"])
        losses[clip] = [r["train/loss"] for r in read_metrics(tmp_path / clip / "metrics.jsonl") if "train/loss" in r]
    assert losses["null"][-1] < losses["null"][0] - 0.1  # it learns
    for clip in ("0", "-1"):
        assert losses[clip] == pytest.approx(losses["null"], abs=1e-5), clip


def test_checkpoint_state_cannot_run_code(tmp_path):
    """trainer.resume=PATH of a checkpoint from elsewhere: trainer_state.pt is read with weights_only, so a
    pickle that would run code is refused with a one-line error, and the code never runs."""
    import os
    import pickle

    from bertexp.errors import CheckpointError

    run_in_process(tmp_path / "a", ["trainer.max_steps=2", "logger=none"])
    ck = tmp_path / "a" / "checkpoints" / "last"
    state = torch.load(ck / "trainer_state.pt", weights_only=True)  # our own checkpoints load safely
    assert state["run"]["step"] == 2
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ck / "trainer_state.pt", "wb") as f:
        pickle.dump({"run": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"cannot read trainer_state.pt safely"):
        run_in_process(tmp_path / "b", ["trainer.max_steps=4", f"trainer.resume={ck.resolve()}", "logger=none"])
    assert not marker.exists()


def test_interrupted_run_has_its_summary_in_wandb(tmp_path, monkeypatch):
    """On SIGTERM the last and best values reach the W&B run before it is finished, each metric once per
    meaning: its last value under its own name, the best under best/ (no final/ copies, no {last, max})."""
    import signal

    from bertexp.errors import Interrupted
    from wandb_reader import summary

    signal_at_training_call(monkeypatch, signal.SIGTERM, 3)
    with pytest.raises(Interrupted):
        run_in_process(tmp_path, ["trainer.max_steps=8", "trainer.eval_every=2", "trainer.save_every=100"])
    got = summary(wandb_files(tmp_path)[0])
    summary = got["summary"]
    assert summary["step"] == 3, sorted(summary)
    assert "best/eval/mlm_acc" in summary and "eval/exam_id" in summary
    assert not [k for k in summary if k.startswith("final/")]
    assert not [k for k, v in summary.items() if k.startswith("eval/") and isinstance(v, dict)]
    assert got["exit_code"] == 143


def _nan_loss_on(monkeypatch, is_bad) -> None:
    """Make the training forward return a NaN MLM loss on the calls (numbered from 1) where is_bad(n)."""
    from bertexp.modeling import PretrainingObjective

    real = PretrainingObjective.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        out = real(self, *args)
        if self.training:
            calls["n"] += 1
            if is_bad(calls["n"]):
                return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(PretrainingObjective, "forward", poisoned)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, lambda n: n >= 3)  # 2 good steps, then NaN
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 3; last good checkpoint: .*step_0000002"):
        run_in_process(tmp_path, ["trainer.max_steps=6", "logger=none"])
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2]


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    """A kill during a checkpoint write leaves a .tmp-* folder (or a step folder without its state file):
    resume ignores both and continues from the last complete checkpoint."""
    overrides = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_checkpoints=0", "logger=none"]
    run_in_process(tmp_path, overrides)
    ck = tmp_path / "checkpoints"
    shutil.rmtree(ck / "step_0000006")
    shutil.rmtree(ck / "step_0000004")
    (ck / ".tmp-step_0000004-999").mkdir()
    (ck / ".tmp-step_0000004-999" / "model.safetensors").write_bytes(b"half")
    (ck / "step_0000005").mkdir()  # no trainer_state.pt: incomplete
    from bertexp.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path).name == "step_0000002"
    run_in_process(tmp_path, overrides)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (ck / ".tmp-step_0000004-999").exists()


def test_preemption_signal_checkpoints_then_calls_the_requeue_hook(tmp_path, monkeypatch):
    """Under submitit (hydra/launcher=submitit_slurm) SIGUSR2 means "requeue": bertexp checkpoints the current step
    first, then hands over to submitit's handler, and the requeued job resumes from that checkpoint."""
    import signal

    from bertexp.modeling import PretrainingObjective

    requeued = []

    def fake_submitit_handler(signum, frame):
        requeued.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")))
        raise SystemExit(-1)  # submitit exits after requeueing

    real = PretrainingObjective.forward
    signal_at_training_call(monkeypatch, signal.SIGUSR2, 3)
    old = signal.signal(signal.SIGUSR2, fake_submitit_handler)
    overrides = ["trainer.max_steps=8", "trainer.save_every=5", "logger=none"]
    try:
        with pytest.raises(SystemExit):
            run_in_process(tmp_path, overrides)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert requeued == [["step_0000003"]]  # the checkpoint was written before the requeue
    monkeypatch.setattr(PretrainingObjective, "forward", real)
    run_in_process(tmp_path, overrides)  # the requeued job
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))


def test_last_checkpoint_loads_as_a_pretrained_model(tmp_path):
    run_in_process(tmp_path / "a", ["trainer.max_steps=2", "logger=none"])
    last = tmp_path / "a" / "checkpoints" / "last"
    final = run_in_process(tmp_path / "b", ["model=pretrained", f"model.path={last}", "trainer.max_steps=2", "logger=none"])
    assert final["final/step"] == 2
    # as any Hugging Face model directory: Auto classes, a fill-mask pipeline, a vocab.txt, a real length limit
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(str(last))
    assert tok.model_max_length == 512
    vocab = (last / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(str(last)), tokenizer=tok)
    out = fill("我们的[MASK]家")
    assert len(out) == 5 and all(o["token_str"] in tok.get_vocab() for o in out)


def test_bad_steps_can_be_skipped_within_a_bound(tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, lambda n: n == 2)
    final = run_in_process(tmp_path, ["trainer.max_steps=4", "trainer.max_bad_steps=1", "logger=none"])
    assert final["final/step"] == 4
    state = torch.load(tmp_path / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["run"]["bad_steps"] == 1


def _what_ran(mode: str, run) -> object:
    """Run `run()` and return what shows `mode` in effect: for bf16, the dtypes every Linear layer's output had
    (a global forward hook); for compile, how many frames torch.compile (dynamo) compiled."""
    if mode == "bf16":
        dtypes = set()

        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear):
                dtypes.add(output.dtype)

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            run()
        finally:
            handle.remove()
        return dtypes
    from torch._dynamo.utils import counters

    counters.clear()
    run()
    return counters["frames"]["ok"]


@pytest.mark.parametrize("mode", ["bf16", "compile"])
def test_bf16_and_compile_match_fp32_eager(tmp_path, mode):
    """Same losses as fp32 eager, and in effect, not only accepted: under bf16 autocast every Linear computes in
    bfloat16 (in the fp32 run, float32), and trainer.compile=true has dynamo compile the model's frames (the
    eager run compiles none)."""
    base = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.precision=fp32", "logger=none"]
    ref_ran = _what_ran(mode, lambda: run_in_process(tmp_path / "ref", base))
    extra = ["trainer.precision=bf16"] if mode == "bf16" else ["trainer.compile=true"]
    got_ran = _what_ran(mode, lambda: run_in_process(tmp_path / mode, [*base, *extra]))
    if mode == "bf16":
        assert (ref_ran, got_ran) == ({torch.float32}, {torch.bfloat16})
    else:
        assert ref_ran == 0 and got_ran > 0
    ref = [r["train/loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "train/loss" in r]
    got = [r["train/loss"] for r in read_metrics(tmp_path / mode / "metrics.jsonl") if "train/loss" in r]
    tol = 2e-2 if mode == "bf16" else 1e-4  # bf16 keeps 8 bits of mantissa
    assert got == pytest.approx(ref, rel=tol)


def test_final_checkpoint_logged_as_wandb_artifact(tmp_path):
    run_in_process(tmp_path, ["trainer.max_steps=2", "logger.log_checkpoints=true"])
    import subprocess
    import sys
    from pathlib import Path as P

    f = wandb_files(tmp_path)[0]
    exe = shutil.which("wandb") or str(P(sys.executable).parent / "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", str(f)], capture_output=True, text=True, check=True).stdout
    arts = [json.loads(l) for l in out.splitlines() if '"artifact"' in l]
    assert any(a.get("type") == "artifact" and a["artifact"]["type"] == "model" for a in arts)


def test_checkpoint_of_an_older_bertexp_is_a_clear_error(tmp_path):
    """trainer_state.pt with numpy objects (as bertexp wrote it before weights_only): one line that says
    what it is and what to do."""
    import numpy as np

    from bertexp.errors import CheckpointError

    run_in_process(tmp_path, ["trainer.max_steps=2", "logger=none"])
    ck = tmp_path / "checkpoints" / "last"
    torch.save({"step": 2, "rng": {"numpy": np.random.get_state()}}, ck / "trainer_state.pt")
    with pytest.raises(CheckpointError) as e:
        run_in_process(tmp_path, ["trainer.max_steps=4", "logger=none"])
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert "older bertexp" in msg and "trainer.resume=never" in msg


def test_resume_on_another_exam_starts_best_afresh(tmp_path):
    run_in_process(tmp_path, ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=0", "logger=none"])
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    final = run_in_process(tmp_path, ["trainer.max_steps=4", "trainer.save_every=2", "trainer.exam_length=32", "logger=none"])
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/mlm_acc" in r]
    assert len({r["eval/exam_id"] for r in evals}) == 2
    assert final["best/eval/mlm_loss"] == evals[-1]["eval/mlm_loss"]  # only the new exam's evaluations count
