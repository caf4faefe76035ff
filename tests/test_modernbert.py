"""ModernBERT (model=modernbert_*, objective=mlm) through the same run as BERT: it trains and logs without NSP
records, takes BERT's exam, refuses NSP in one line, resumes exactly, saves checkpoints that transformers' Auto
classes and fill-mask pipeline load, fine-tunes on both downstream tasks, and counts its FLOPs as its modules
compute them."""
import fcntl
import json
import os
import shutil

import pytest
import torch
from hydra.utils import instantiate

from bertexp.tracking import read_metrics
from conftest import compose, run_in_process, run_main

MODERN = ["model=modernbert_tiny", "objective=mlm"]
# Checkpoints at 2, 4 and 6 fall inside logging windows of 3 steps: the resume test restarts from 4.
RUN = [*MODERN, "trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_every=2", "trainer.save_every=2",
       "trainer.keep_checkpoints=0", "trainer.precision=fp32", "optim.lr=5e-3"]


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory):
    """One ModernBERT run (W&B offline) that most tests here read, and none writes to. Under xdist the workers
    share it (the first one to get here trains it, the others wait for it): it is the slowest part of this file."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    d, done = root / "modernbert" / "run", root / "modernbert" / "final.json"
    done.parent.mkdir(exist_ok=True)
    with open(root / "modernbert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(d, ignore_errors=True)
            done.write_text(json.dumps(run_in_process(d, RUN, name="modernbert")))
    return d, json.loads(done.read_text())


def test_trains_logs_and_takes_the_same_exam_as_bert(modern_run, pd_data, tmp_path):
    from bertexp import compare
    from bertexp.train import prepare_exam
    from wandb_reader import inspect, wandb_files

    d, final = modern_run
    records = read_metrics(d / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/mlm_acc" in r]
    assert [r["step"] for r in train] == [3, 6] and [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["train/loss"] == r["train/mlm_loss"] and 0 < r["train/loss"] < 20 for r in train)
    # no NSP head: nothing NSP-shaped is logged, rather than a 0 that reads as a score
    assert not any(k.startswith(("eval/nsp", "train/nsp")) for r in records for k in r)
    assert not any("nsp_acc" in k for k in final)
    assert final["final/eval/mlm_acc"] == evals[-1]["eval/mlm_acc"] and final["best/eval/mlm_loss"] > 0
    first, last = _weights(d, 2), _weights(d, 6)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained

    # BERT's exam on the same data: the same questions, blanks and counting baselines
    data, _ = pd_data
    exam, _, baselines = prepare_exam(compose(["trainer=smoke"]), data, data.batch_size)
    for r in evals:
        assert r["eval/exam_id"] == exam.exam_id and r["eval/blanks"] == exam.num_blanks
        assert {k: r[k] for k in baselines} == baselines

    # W&B holds the same history (and no NSP series)
    history = inspect(wandb_files(d)[0])["history"]
    assert [h["step"] for h in history if "eval/mlm_acc" in h] == [2, 4, 6]
    assert not any("nsp_acc" in k for h in history for k in h)

    # the comparison (and so the sweep summary) ranks it on that exam, with no NSP value
    from omegaconf import OmegaConf

    c = tmp_path / "run"
    shutil.copytree(d, c, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    (c / ".hydra").mkdir()
    OmegaConf.save(compose(["trainer=smoke", *RUN]), c / ".hydra" / "config.yaml")
    (c / "status.json").write_text(json.dumps({"status": "completed"}))
    md, runs = compare.compare([c], out=tmp_path, with_plot=False)
    (run,) = runs
    assert run["exam_id"] == exam.exam_id and run["rank"] == 1 and run["final/eval/nsp_acc"] is None
    assert exam.exam_id in md


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def test_nsp_is_refused_in_one_line_before_any_slow_work(monkeypatch, tmp_path, capsys, modern_run):
    """`python run.py model=modernbert_tiny` (objective mlm_nsp by default): exit 2, one line that names
    objective=mlm, before the corpus is prepared; a ModernBERT directory loaded with model=pretrained too."""
    from bertexp.data.dataset import PretrainingData
    from bertexp.errors import ConfigError

    def too_late(*args, **kw):
        raise AssertionError("the corpus was prepared before the objective was checked")

    monkeypatch.setattr(PretrainingData, "prepare", too_late)
    code = run_main(monkeypatch, ["model=modernbert_tiny", "trainer=smoke", "logger=none", f"hydra.run.dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == ["error: objective.nsp_weight=0.1: ModernBERT has no next-sentence head; use objective=mlm (MLM only)"]
    last = modern_run[0] / "checkpoints" / "last"
    with pytest.raises(ConfigError, match=r"^objective.nsp_weight=0.5: ModernBERT .* use objective=mlm \(MLM only\)$"):
        run_in_process(tmp_path / "pre", ["model=pretrained", f"model.path={last}", "objective.nsp_weight=0.5", "logger=none"])


def test_resume_continues_exactly(modern_run, tmp_path):
    """The run above, cut after its checkpoint at step 4 (inside a logging window) and resumed: every record
    and the best-so-far values equal the uninterrupted run's."""
    a, final_a = modern_run
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True, ignore=shutil.ignore_patterns("wandb", ".hydra", "status.json"))
    shutil.rmtree(b / "checkpoints" / "step_0000006")
    state_file = b / "checkpoints" / "step_0000004" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["run"]["best"]["eval/mlm_top5_acc"] = 1.0  # a best value the resumed run cannot reach again
    torch.save(state, state_file)
    final_b = run_in_process(b, [*RUN, "logger=none"])
    assert final_b["best/eval/mlm_top5_acc"] == 1.0
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rb if "train/loss" in r] == [3, 6]  # nothing missing, nothing twice
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys() and x["step"] == y["step"]
        for k in x:
            if k.startswith(("train/", "eval/", "masking/")) or k in ("tokens", "flops", "predicted_tokens"):
                assert y[k] == (x[k] if isinstance(x[k], str) else pytest.approx(x[k], abs=1e-6)), (x["step"], k)
    best = {k: v for k, v in final_a.items() if k.startswith("best/") and k != "best/eval/mlm_top5_acc"}
    assert best and {k: final_b[k] for k in best} == pytest.approx(best)
    for k, v in _weights(a, 6).items():
        assert torch.equal(v, _weights(b, 6)[k]), k


def test_checkpoint_loads_with_auto_classes_and_fill_mask(modern_run):
    """checkpoints/last is a plain transformers directory: AutoModelForMaskedLM, AutoTokenizer and the fill-mask
    pipeline load it, and the pipeline's best guess is the one the exam's objective scores."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertForMaskedLM, pipeline

    from bertexp.data.tokenizer import load_tokenizer
    from bertexp.modeling import PretrainingObjective

    last = modern_run[0] / "checkpoints" / "last"
    model = AutoModelForMaskedLM.from_pretrained(last).eval()
    assert isinstance(model, ModernBertForMaskedLM)
    text = "中国人民[MASK]放军在北京"
    ours, auto = load_tokenizer(last), AutoTokenizer.from_pretrained(last)
    assert auto(text)["input_ids"] == ours(text)["input_ids"]
    fill = pipeline("fill-mask", model=str(last), top_k=3)
    guesses = fill(text)
    assert len(guesses) == 3 and all(g["token_str"] in ours.get_vocab() for g in guesses)
    enc = ours(text, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    at = enc["input_ids"] == ours.mask_token_id
    labels[at] = 0
    with torch.no_grad():
        _, _, logits, _, nsp = PretrainingObjective(model, nsp_weight=0.0)(
            enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], labels, None)
    assert nsp is None
    assert guesses[0]["token"] == int(logits[0].argmax())
    assert guesses[0]["score"] == pytest.approx(float(logits[0].softmax(-1).max()), rel=1e-4)


def test_pretrained_modernbert_directory_trains_from_its_own_loss(modern_run, tmp_path):
    """model=pretrained model.path=<a ModernBERT checkpoint>: the first step's loss equals what
    ModernBertForMaskedLM itself computes on the same batch and mask (its dense MLM loss)."""
    from transformers import ModernBertForMaskedLM

    from bertexp.data.dataset import Position
    from bertexp.data.loader import mask_step

    last = modern_run[0] / "checkpoints" / "last"
    overrides = ["model=pretrained", f"model.path={last}", "objective=mlm", "trainer.max_steps=1",
                 "trainer.precision=fp32", "logger=none"]
    run_in_process(tmp_path, overrides)
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    c = compose(["trainer=smoke", *overrides])
    data, spec = instantiate(c.data), instantiate(c.model)
    tok = spec.tokenizer()
    data.prepare(tok, seed=int(c.seed))
    from bertexp.masking import Vocab

    masker = instantiate(c.masking).bind(Vocab.from_tokenizer(tok))
    batch, _ = next(data.train_batches(Position()))
    ids, labels, *_ = mask_step(masker, batch, int(c.seed), 0, 0.0)
    ref = ModernBertForMaskedLM.from_pretrained(last).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
    assert first["train/loss"] == pytest.approx(float(out.loss), rel=1e-5)


@pytest.mark.parametrize("task", ["sentiment", "ner"])
def test_finetunes_on_downstream_tasks(modern_run, tmp_path, monkeypatch, task):
    """task=sentiment / task=ner on a ModernBERT checkpoint: its own family's classification classes, from its
    weights and from a random initialisation of its config (test_finetune's tiny settings, one seed)."""
    import bertexp.finetune as ft
    from test_finetune import TINY_TASK

    monkeypatch.setattr(ft, "random_cache_dir", lambda data_cfg: tmp_path / "ftcache")
    built = []
    real = ft.build_model
    embeddings = _weights(modern_run[0], 6)["model.embeddings.tok_embeddings.weight"]

    def recorded(task_, path, init, seed):
        model = real(task_, path, init, seed)
        built.append((init, type(model).__name__, torch.equal(model.model.embeddings.tok_embeddings.weight, embeddings)))
        return model

    monkeypatch.setattr(ft, "build_model", recorded)
    last = modern_run[0] / "checkpoints" / "last"
    cfg = compose([f"task={task}", f"model.path={last}", *TINY_TASK, "task.seeds=1"])
    s = ft.run_finetune(cfg.task, last, cfg.data, cfg.optim, cfg.trainer, tmp_path / "ft", None, 0,
                        {"name": task, "group": "tests", "tags": []})
    kind = "SequenceClassification" if task == "sentiment" else "TokenClassification"
    # the checkpoint's weights, and a random initialisation of its architecture
    assert built == [("pretrained", f"ModernBertFor{kind}", True), ("random", f"ModernBertFor{kind}", False)]
    for init in ("pretrained", "random"):
        assert s[init]["test"]["n"] == 1 and 0.0 <= s[init]["test"]["mean"] <= 1.0
    assert s["sizes"] == {"train": 96, "dev": 64, "test": 64} and 0.0 < s["baseline"]["test"] < 1.0
    assert s["pretrain/step"] == 6


def _independent_flops(model, layers, batch, labels) -> int:
    """A training step's FLOPs counted from what runs: 2 per multiply-add of every nn.Linear on the rows it
    actually gets (hooks), 4 x head width x every (query, key) pair the attention kernel is handed unmasked,
    2 per position for the layers' other parameters (biases, norm weights: the 6N convention counts every
    parameter), all x 3 for forward and backward. Positions count as real however padded (the convention)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from bertexp.modeling import PretrainingObjective

    count = {"n": 0}

    def linear(mod, inp, out):
        count["n"] += 2 * (inp[0].numel() // mod.in_features) * mod.weight.numel()

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, q, k, v, mask, **kw):
        b, heads, t, dim = q.shape
        pairs = b * t * k.shape[2] if mask is None else int(
            (mask if mask.dtype == torch.bool else mask == 0).expand(b, 1, t, k.shape[2]).sum())
        count["n"] += 4 * heads * dim * pairs
        return real(module, q, k, v, mask, **kw)

    hooks = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        with torch.no_grad():
            PretrainingObjective(model, nsp_weight=0.0)(
                batch["input_ids"], torch.ones_like(batch["attention_mask"]), batch["token_type_ids"], labels,
                batch["next_sentence_label"])
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = real
        for h in hooks:
            h.remove()
    linear_weights = {id(m.weight) for m in layers.modules() if isinstance(m, torch.nn.Linear)}
    others = sum(p.numel() for p in layers.parameters() if id(p) not in linear_weights)
    return 3 * (count["n"] + 2 * others * batch["input_ids"].numel())


@pytest.mark.parametrize("model", ["modernbert_tiny", "bert_tiny"])
def test_flops_of_a_step_equal_an_independent_count(model, pd_data, request):
    """ModelFlops (what trainer.max_flops and MFU count) against the count above, on real batches: ModernBERT's
    local layers count only their window, its GLU its three matrices, and it has no pooler or NSP head.
    For ModernBERT the check is the run's own logged `flops` after its first two steps."""
    from bertexp.data.dataset import Position
    from bertexp.data.loader import mask_step
    from bertexp.masking import Vocab
    from bertexp.modeling import ModelFlops

    _, tok = pd_data
    cfg = compose(["trainer=smoke", f"model={model}", *(["objective=mlm"] if "modern" in model else [])])
    data = instantiate(cfg.data)
    data.prepare(tok, int(cfg.seed))  # the run's batches
    net = instantiate(cfg.model).build(tok)
    layers = net.model.layers if "modern" in model else net.bert.encoder
    masker = instantiate(cfg.masking).bind(Vocab.from_tokenizer(tok))
    flops = ModelFlops(net)
    batches = data.train_batches(Position())
    total = 0
    for step in range(2):
        batch, _ = next(batches)
        _, labels, *_ = mask_step(masker, batch, int(cfg.seed), step, 0.0)
        expected = _independent_flops(net, layers, batch, labels)
        width = labels.shape[1]
        if "modern" in model:  # its local layer sees less than the whole batch width: the window counts
            assert flops.attention_pairs(width) < net.config.num_hidden_layers * width * width
        assert flops.step(len(labels), labels.shape[1], int((labels != -100).sum())) == expected
        total += expected
    if "modern" in model:
        d, _ = request.getfixturevalue("modern_run")
        logged = next(r for r in read_metrics(d / "metrics.jsonl") if r["step"] == 2)
        assert logged["flops"] == total


def test_bf16_on_cpu_matches_fp32(pd_data):
    """trainer.precision=bf16 on a CPU: eager attention (fit_attention_to_precision) under bf16 autocast gives the
    fp32 loss within bf16's precision, and finite gradients. (trainer.compile=true is not run here: compiling
    takes minutes on 2 cores. By hand, 3 compiled steps gave the fp32 eager losses within 1e-6.)"""
    from bertexp.data.dataset import Position
    from bertexp.data.loader import mask_step
    from bertexp.masking import Vocab
    from bertexp.modeling import PretrainingObjective, fit_attention_to_precision

    data, tok = pd_data
    cfg = compose(["trainer=smoke", *MODERN])
    torch.manual_seed(0)
    net = instantiate(cfg.model).build(tok)
    masker = instantiate(cfg.masking).bind(Vocab.from_tokenizer(tok))
    batch, _ = next(data.train_batches(Position()))
    batch = {k: v[:4] for k, v in batch.items()}
    ids, labels, *_ = mask_step(masker, batch, 0, 0, 0.0)
    objective = PretrainingObjective(net, nsp_weight=0.0)
    args = (ids, batch["attention_mask"], batch["token_type_ids"], labels, batch["next_sentence_label"])
    with torch.no_grad():
        fp32 = float(objective(*args)[0])
    fit_attention_to_precision(net, "cpu", "bf16")
    assert net.config._attn_implementation == "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _, logits, _, nsp = objective(*args)
    assert logits.dtype == torch.bfloat16 and nsp is None
    bf16.backward()
    assert float(bf16.detach()) == pytest.approx(fp32, rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
