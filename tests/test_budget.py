"""Compute budgets: wall clock, tokens and FLOPs end a run, and the schedules follow the budget."""
import pytest

from bertexp.budget import Budget
from bertexp.errors import ConfigError
from bertexp.run_state import RunState
from bertexp.tracking import read_metrics
from conftest import compose, run_in_process

# budgets and lr schedules need steps, not a model that learns: the smallest encoder makes them cheap
FAST = ["logger=none", "trainer.eval_every=100000", "trainer.save_every=100000", "trainer.log_every=1",
        "optim.warmup_steps=0", "trainer.exam_pairs=16", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_attention_heads=1", "model.num_hidden_layers=1"]
_OPTIM = compose().optim  # the default schedule's ends, as the runs below use them
PEAK, FINAL = float(_OPTIM.lr), float(_OPTIM.lr) * float(_OPTIM.min_lr_ratio)  # optim.lr, min_lr_ratio * optim.lr


def _lr_at(progress):
    """The lr with no warm-up: linear from PEAK at progress 0 to FINAL at progress 1."""
    return FINAL + (PEAK - FINAL) * (1 - progress)


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("batch", [16, 64])
def test_time_budget_ends_the_run_and_the_lr_schedule(tmp_path, batch):
    minutes = 0.12  # 7.2 s
    run_in_process(tmp_path, [*FAST, f"trainer.budget_minutes={minutes}", f"data.batch_size={batch}"])
    recs = _train_records(tmp_path)
    last, before = recs[-1], recs[-2]
    assert before["elapsed_s"] < minutes * 60 <= last["elapsed_s"]  # stopped at the first step past the budget
    assert last["elapsed_s"] - minutes * 60 < last["elapsed_s"] - before["elapsed_s"]  # less than one step over
    _check_lr_follows_budget(recs, "elapsed_s", minutes * 60, abs_tol=5e-6)
    assert all(r["step"] == i + 1 for i, r in enumerate(recs))
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/mlm_acc" in r]
    assert len(evals) == 1 and evals[0]["step"] == last["step"]  # scored once, at the end


@pytest.mark.parametrize("batch", [16, 64])
def test_token_budget_stops_within_one_batch(tmp_path, batch):
    budget = 40_000
    run_in_process(tmp_path, [*FAST, f"trainer.max_tokens={budget}", f"data.batch_size={batch}"])
    recs = _train_records(tmp_path)
    last, before = recs[-1], recs[-2]
    assert before["tokens"] < budget <= last["tokens"]
    assert last["tokens"] - budget < last["tokens"] - before["tokens"]  # less than the last batch over
    _check_lr_follows_budget(recs, "tokens", budget, abs_tol=1e-12)


def _check_lr_follows_budget(recs, key, budget, abs_tol):
    """Each step's lr is the schedule's value where the step is expected to end: the progress before it
    plus what the previous step did."""
    p = [0.0] + [r[key] / budget for r in recs]  # progress before step i+1 is p[i]
    for i, r in enumerate(recs):
        ends = min(1.0, p[i] + (p[i] - p[i - 1] if i >= 1 else 0.0))
        assert r["train/lr"] == pytest.approx(_lr_at(ends), abs=abs_tol), (r["step"], key)


def test_step_budget_ends_on_the_final_lr(tmp_path):
    run_in_process(tmp_path, [*FAST, "trainer.max_steps=6"])
    recs = _train_records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["train/lr"] == pytest.approx(FINAL, abs=1e-12)  # the last step ends the run: final lr
    assert [r["train/lr"] for r in recs[1:]] == pytest.approx([_lr_at(k / 6) for k in range(2, 7)], abs=1e-12)


def test_records_carry_compute_axes_and_flops_count_the_prediction_head(tmp_path):
    """Same batches, two prediction ratios: FLOPs differ by exactly the MLM head's cost of the extra
    predicted positions (6 x (H^2 + H V) each)."""
    finals = {}
    for pred in (0.15, 0.45):
        d = tmp_path / str(pred)
        run_in_process(d, [*FAST, "trainer.max_steps=3", f"masking.prediction_ratio={pred}"])
        recs = read_metrics(d / "metrics.jsonl")
        for r in recs:
            assert {"step", "tokens", "predicted_tokens", "flops", "elapsed_s"} <= r.keys()
        steps = [r for r in recs if "train/loss" in r]
        assert [r["tokens"] for r in steps] == sorted(r["tokens"] for r in steps) and steps[0]["flops"] > 0
        finals[pred] = steps[-1]
    a, b = finals[0.15], finals[0.45]
    assert a["tokens"] == b["tokens"] and b["predicted_tokens"] > 2 * a["predicted_tokens"]
    cfg = compose(FAST)
    h = cfg.model.hidden_size
    from bertexp.data.tokenizer import load_tokenizer  # the run's vocabulary size, from its checkpoint

    v = len(load_tokenizer(tmp_path / "0.15" / "checkpoints" / "last"))
    head = 6 * (h * h + h * v)
    assert b["flops"] - a["flops"] == pytest.approx(head * (b["predicted_tokens"] - a["predicted_tokens"]), rel=1e-9)


def test_budget_progress_is_the_furthest_budget():
    cfg = compose(["trainer.max_tokens=1000", "trainer.budget_minutes=1"])
    b = Budget.from_config(cfg.trainer)
    assert not b.by_steps and b.max_steps is None
    s = RunState(step=10_000, tokens=250, train_time=30.0)
    assert b.progress(s) == pytest.approx(0.5) and not b.done(s)  # max_steps does not apply
    s.tokens = 1000
    assert b.progress(s) == 1.0 and b.done(s)
    assert "trainer.max_tokens=1000" in b.describe() and "trainer.budget_minutes=1" in b.describe()
    steps = Budget.from_config(compose().trainer)
    half = int(compose().trainer.max_steps) // 2
    assert steps.by_steps and steps.progress(RunState(step=half)) == pytest.approx(half / int(compose().trainer.max_steps))


@pytest.mark.parametrize("override,match", [("trainer.max_steps=null", "trainer.max_steps is null and no budget"),
                                            ("trainer.max_tokens=0", "trainer.max_tokens=0 must be > 0"),
                                            ("trainer.budget_minutes=-1", "trainer.budget_minutes=-1")])
def test_bad_budgets_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        Budget.from_config(compose([override]).trainer)


def test_a_run_shorter_than_its_warmup_still_warms_up_and_ends_at_the_final_lr(tmp_path):
    """warmup_steps=100 with max_steps=40: warm-up ends at optim.warmup_fraction (0.04) of the run, so the lr
    reaches its peak at step 2 and decays to the final lr at step 40 (it used to end at 8e-4, still warming up)."""
    run_in_process(tmp_path, [*FAST, "trainer.max_steps=40", "optim.warmup_steps=100", "optim.warmup_fraction=0.04"])
    lrs = [r["train/lr"] for r in _train_records(tmp_path)]
    assert len(lrs) == 40
    assert lrs[-1] == pytest.approx(FINAL, abs=1e-12)
    assert max(lrs) == pytest.approx(PEAK, rel=0.05) and lrs.index(max(lrs)) <= 2
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # decaying after warm-up


def _schedule_lr(schedule: str, progress: float, decay_fraction: float = 0.2) -> float:
    """The schedules written out independently (no warm-up): PEAK at progress 0 to FINAL at progress 1."""
    import math

    if schedule == "cosine":
        return FINAL + (PEAK - FINAL) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        start = 1 - decay_fraction
        return PEAK if progress <= start else PEAK - (PEAK - FINAL) * (progress - start) / decay_fraction
    return _lr_at(progress)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules_follow_their_formula_over_steps_and_over_a_budget(tmp_path, schedule):
    """optim.schedule=cosine / wsd: each step's lr is the schedule's value where the step ends, over steps
    (exactly; the first step, which cannot know its share yet, at the start) and over a token budget (within
    one batch's share), ending at the final lr."""
    run_in_process(tmp_path / "steps", [*FAST, "trainer.max_steps=10", f"optim.schedule={schedule}",
                                        "optim.decay_fraction=0.3"])
    recs = _train_records(tmp_path / "steps")
    assert [r["train/lr"] for r in recs] == pytest.approx(
        [_schedule_lr(schedule, k / 10, 0.3) for k in (0, *range(2, 11))], abs=1e-12)
    if schedule == "wsd":
        assert [r["train/lr"] for r in recs[:7]] == pytest.approx([PEAK] * 7)  # stable until the last 30%
    run_in_process(tmp_path / "tokens", [*FAST, "trainer.max_tokens=40000", "data.batch_size=16",
                                         f"optim.schedule={schedule}"])
    recs = _train_records(tmp_path / "tokens")
    assert recs[-1]["train/lr"] == pytest.approx(FINAL, abs=1e-12)
    for r in recs[1:]:
        # the lr of a step is set where it is expected to end: the progress before it plus the previous step's
        ends = min(1.0, r["tokens"] / 40000)
        assert r["train/lr"] == pytest.approx(_schedule_lr(schedule, ends), abs=0.05 * PEAK), r["step"]


def test_a_resumed_run_follows_the_schedule_exactly(tmp_path, monkeypatch):
    """A wsd run stopped by SIGTERM during step 4 and resumed logs exactly the lrs and losses of an
    uninterrupted one."""
    import signal

    from bertexp.errors import Interrupted
    from conftest import signal_at_training_call

    args = [*FAST, "trainer.max_steps=8", "optim.schedule=wsd", "optim.decay_fraction=0.5"]
    run_in_process(tmp_path / "full", args)
    with monkeypatch.context() as m:
        signal_at_training_call(m, signal.SIGTERM, 4)
        with pytest.raises(Interrupted):
            run_in_process(tmp_path / "cut", args)
    assert [r["step"] for r in _train_records(tmp_path / "cut")] == [1, 2, 3, 4]
    run_in_process(tmp_path / "cut", args)
    full, cut = _train_records(tmp_path / "full"), _train_records(tmp_path / "cut")
    assert [r["train/lr"] for r in full] == pytest.approx([_schedule_lr("wsd", k / 8, 0.5) for k in (0, *range(2, 9))],
                                                          abs=1e-12)
    assert [r["step"] for r in cut] == list(range(1, 9))
    assert [(r["train/lr"], r["train/loss"]) for r in cut] == [(r["train/lr"], r["train/loss"]) for r in full]


def _step_flops_by_hand(cfg, tokenizer, steps):
    """The FLOPs of a run's first `steps` steps, from the README's formula, on batches rebuilt here from the data
    and the per-step masking seeds: 6 x (encoder parameters + 2 L H T attention) per padded position, the MLM
    head (H^2 + H V) per predicted position, pooler and NSP classifier (H^2 + 2 H) per pair. Also returns each
    step's (rows, width, predicted) and the encoder's parameter count."""
    from hydra.utils import instantiate

    from bertexp.data.dataset import Position
    from bertexp.data.loader import mask_step
    from bertexp.masking import Vocab

    m = cfg.model
    h, layers, inter, v = int(m.hidden_size), int(m.num_hidden_layers), int(m.intermediate_size), len(tokenizer)
    # one encoder layer: Q, K, V, O (weights and biases), two LayerNorms, the feed-forward in and out
    n_enc = layers * (4 * (h * h + h) + 2 * 2 * h + (h * inter + inter) + (inter * h + h))
    data = instantiate(cfg.data)
    data.prepare(tokenizer, int(cfg.seed))
    masker = instantiate(cfg.masking).bind(Vocab.from_tokenizer(tokenizer))
    per_step, shapes = [], []
    for s, (batch, _) in zip(range(steps), data.train_batches(Position())):
        rows, width = batch["input_ids"].shape
        predicted = int((mask_step(masker, batch, int(cfg.seed), s, 0.0).labels != -100).sum())
        per_step.append(6 * n_enc * rows * width + 12 * layers * h * width * rows * width
                        + 6 * (h * h + h * v) * predicted + 6 * (h * h + 2 * h) * rows)
        shapes.append((rows, width, predicted))
    return per_step, shapes, n_enc


def test_flop_budget_stops_on_its_step_ends_the_lr_schedule_and_counts_the_formula(tmp_path):
    """trainer.max_flops set to exactly what the first 4 steps cost (computed here): the run ends at step 4, not
    at 3 and not at 5 (nor at trainer.max_steps=2, which a budget overrides); every step's lr is the schedule's
    value at its FLOP fraction, the last one the final lr; each step's FLOPs are the formula's."""
    from hydra.utils import instantiate

    steps = 4
    overrides = [*FAST, "trainer.max_steps=2"]
    cfg = compose(["trainer=smoke", *overrides])
    tok = instantiate(cfg.model).tokenizer(instantiate(cfg.data))
    per_step, shapes, n_enc = _step_flops_by_hand(cfg, tok, steps)
    model = instantiate(cfg.model).build(tok)  # the parameter count, from the model's own modules
    assert n_enc == sum(p.numel() for name, p in model.named_parameters() if name.startswith("bert.encoder."))
    budget = sum(per_step)
    assert float(budget) == budget  # exact in floating point: the stop is tested on the boundary itself
    run_in_process(tmp_path, [*overrides, f"trainer.max_flops={budget}"])
    recs = _train_records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert recs[-2]["flops"] < budget <= recs[-1]["flops"]
    # (c) each step's FLOPs, and the batch it was computed on is the one rebuilt here
    flops = [0.0] + [r["flops"] for r in recs]
    predicted = [0] + [r["predicted_tokens"] for r in recs]
    for i, r in enumerate(recs):
        rows, width, pred = shapes[i]
        assert (r["train/max_seq_len"], predicted[i + 1] - predicted[i]) == (width, pred)
        assert flops[i + 1] - flops[i] == per_step[i], r["step"]
    # (b) the lr follows the FLOP fraction, and the last step trains at the final lr within its share of the run
    _check_lr_follows_budget(recs, "flops", budget, abs_tol=1e-12)
    share = per_step[-1] / budget
    assert abs(recs[-1]["train/lr"] - FINAL) <= (PEAK - FINAL) * share + 1e-12


def test_training_longer_stretches_the_schedule_from_the_resumed_step(tmp_path):
    """A finished 4-step run resumed with max_steps=8: steps 5-8 take the lr an 8-step run has where each of
    them ends (the schedule stretched over the new length), decaying to the final lr at step 8."""
    run_in_process(tmp_path, [*FAST, "trainer.max_steps=4"])
    run_in_process(tmp_path, [*FAST, "trainer.max_steps=8"])
    lrs = [r["train/lr"] for r in _train_records(tmp_path)]
    assert len(lrs) == 8 and lrs[3] == pytest.approx(FINAL, abs=1e-12)
    # no warm-up (FAST): the decay runs from the start, so step s of 8 ends at PEAK - (PEAK - FINAL) * s / 8
    expected = [PEAK - (PEAK - FINAL) * s / 8 for s in range(5, 9)]
    assert lrs[4:] == pytest.approx(expected, abs=1e-12)


def test_training_longer_with_warmup_is_a_run_of_the_new_length(tmp_path):
    """With a 3-step warm-up: a 6-step run resumed with max_steps=12 takes, at steps 7-12, exactly the lr of a
    fresh 12-step run (the decay starts where the new length puts it, not where the old one did)."""
    warm = [o for o in FAST if not o.startswith("optim.warmup_steps")] + ["optim.warmup_steps=3",
                                                                          "optim.warmup_fraction=null"]
    run_in_process(tmp_path / "a", [*warm, "trainer.max_steps=6"])
    run_in_process(tmp_path / "a", [*warm, "trainer.max_steps=12"])
    run_in_process(tmp_path / "b", [*warm, "trainer.max_steps=12"])
    longer = [r["train/lr"] for r in _train_records(tmp_path / "a")]
    fresh = [r["train/lr"] for r in _train_records(tmp_path / "b")]
    assert len(longer) == len(fresh) == 12
    assert longer[6:] == pytest.approx(fresh[6:], rel=1e-12, abs=0)
    # independently: warm-up ends at step 3 (index 2), so the decay starts at 2/12 of the run, linear to FINAL
    assert fresh[11] == pytest.approx(FINAL, rel=1e-12)
    assert fresh[6] == pytest.approx(PEAK - (PEAK - FINAL) * (7 / 12 - 2 / 12) / (1 - 2 / 12), rel=1e-12)


def test_a_token_budget_made_larger_is_a_run_of_the_new_size(tmp_path):
    """A run on 20,000 tokens with a 4-step warm-up (ended early by warmup_fraction), resumed with 60,000: every
    step after the resume takes exactly the lr of a fresh 60,000-token run at that step (its warm-up end, and
    the previous step's share of the budget, measured against the new budget)."""
    warm = [o for o in FAST if not o.startswith("optim.warmup_steps")] + ["optim.warmup_steps=4",
                                                                          "optim.warmup_fraction=0.1"]
    run_in_process(tmp_path / "a", [*warm, "trainer.max_tokens=20000"])
    first = len(_train_records(tmp_path / "a"))
    run_in_process(tmp_path / "a", [*warm, "trainer.max_tokens=60000"])
    run_in_process(tmp_path / "b", [*warm, "trainer.max_tokens=60000"])
    longer, fresh = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert [r["tokens"] for r in longer] == [r["tokens"] for r in fresh] and len(fresh) > first + 2
    assert [r["train/lr"] for r in longer[first:]] == pytest.approx([r["train/lr"] for r in fresh[first:]],
                                                                    rel=1e-12, abs=0)
    assert [r["train/lr"] for r in longer[:first]] != pytest.approx([r["train/lr"] for r in fresh[:first]], rel=1e-6)
