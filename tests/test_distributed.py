"""Data-parallel training with torchrun on CPU (gloo): two ranks compute the same update as one process
with the same global batch (each rank collating and masking only its own micro-batches), and only rank 0
writes."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bertexp.tracking import read_metrics
from conftest import ROOT, run_in_process

pytestmark = pytest.mark.slow

NO_DROPOUT = ["model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]
# fp32: the comparisons are between different partitions of the same arithmetic
COMMON = ["trainer=smoke", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=3", "trainer.precision=fp32", *NO_DROPOUT]


def test_two_ranks_match_one_process_and_write_once(tmp_path):
    # no hydra.run.dir: both ranks must still agree on the timestamped outputs/DATE/TIME dir
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", str(ROOT / "run.py"),
         *COMMON, "data.batch_size=8", "logger.mode=offline"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    ddp_dir = run_dirs[0]
    assert (ddp_dir / ".hydra" / "config.yaml").is_file()
    single = tmp_path / "single"
    # the same global batch: 2 micro-batches of 8, here accumulated in one process
    run_in_process(single, [*COMMON, "data.batch_size=8", "trainer.grad_accum=2", "logger=none"])
    a = load_file(ddp_dir / "checkpoints" / "last" / "model.safetensors")
    b = load_file(single / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    init = torch.load(single / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert init["run"]["step"] == 3
    # rank 0 alone wrote: one metrics record per step, one W&B run, one run dir
    steps = [m["step"] for m in read_metrics(ddp_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == [1, 2, 3]
    assert len(list((ddp_dir / "wandb").glob("offline-run-*"))) == 1
    ddp_loss = [m["train/loss"] for m in read_metrics(ddp_dir / "metrics.jsonl") if "train/loss" in m]
    one_loss = [m["train/loss"] for m in read_metrics(single / "metrics.jsonl") if "train/loss" in m]
    assert ddp_loss == pytest.approx(one_loss, abs=1e-5)


def test_each_rank_builds_only_its_micro_batches_of_the_same_global_batch(pd_data):
    """Rank r of 2 collates and masks only micro-batch r of each step (8 rows), and the two together are
    exactly what one process accumulating both micro-batches trains on: rows, padding and masks."""
    from bertexp.data.dataset import Position
    from bertexp.data.loader import batch_stream, chunks_of
    from bertexp.masking import TokenMasking, Vocab

    data, tok = pd_data
    masker = TokenMasking(0.15).bind(Vocab.from_tokenizer(tok))
    collated = []
    real = data.collate

    def collate(ex):
        collated.append(len(ex))
        return real(ex)

    def steps(rank, world, accum, n=3):
        stream = batch_stream(data, masker, Position(), 8, accum * world, chunks_of(rank, accum), seed=0,
                              first_step=5, progress_at=lambda step: 0.0, num_workers=0, pin_memory=False)
        out = [next(stream) for _ in range(n)]
        stream.close()
        return out

    data.collate = collate
    try:
        one = steps(0, 1, 2)
        assert collated == [8] * 6
        collated.clear()
        ranks = [steps(r, 2, 1) for r in range(2)]
        assert collated == [8] * 6  # 3 steps x 1 micro-batch per rank: never the other rank's rows
    finally:
        data.collate = real
    for s, (batches, maskings, after) in enumerate(one):
        assert after == ranks[0][s][2] == ranks[1][s][2]  # the same position after each global batch
        for r in range(2):
            (theirs,), (their_mask,), _ = ranks[r][s]
            assert set(theirs) == set(batches[r])
            for key in theirs:
                assert torch.equal(theirs[key], batches[r][key]), key
            for a, b in zip(their_mask, maskings[r]):
                assert torch.equal(a, b)
    # the two micro-batches are different rows, masked with different draws
    assert not torch.equal(one[0][0][0]["input_ids"][:, :8], one[0][0][1]["input_ids"][:, :8])


def test_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    d = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(ROOT / "run.py"),
         *COMMON, "data.batch_size=8", "logger=none", f"hydra.run.dir={d}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_in_process(d, [*COMMON, "trainer.max_steps=5", "data.batch_size=16", "logger=none"])
    steps = [m["step"] for m in read_metrics(d / "metrics.jsonl") if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5]


def _prepare_as_rank(rank: int, port: int, cache: str, log: str, outcome) -> None:
    """One rank of 2 (gloo, as torchrun would set it up): the data preparation of a run, with each cache
    entry this process builds recorded in `log`."""
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        from hydra.utils import instantiate

        import bertexp.data.collocations as collocations
        import bertexp.data.dataset as dataset
        from bertexp import distributed
        from bertexp.train import prepare_data
        from conftest import ESSAY, compose

        def recording(real):
            def cached_dir(root, name, build):
                def build_and_record(tmp):
                    with open(log, "a") as f:
                        f.write(f"{rank} {name.split('-')[0]}\n")
                    build(tmp)
                return real(root, name, build_and_record)
            return cached_dir

        dataset.cached_dir = recording(dataset.cached_dir)
        collocations.cached_dir = recording(collocations.cached_dir)
        cfg = compose(["data=text_file", f"data.path={ESSAY}", f"data.cache_dir={cache}", "masking=pmi",
                       "model=bert_tiny", "model.vocab_size=300"])
        d = distributed.setup(torch.device("cpu"))
        data, spec, masker = instantiate(cfg.data), instantiate(cfg.model), instantiate(cfg.masking)
        prepare_data(spec, data, masker, None, 0, d)
        outcome.put((rank, data.tokens_dir, len(data.tokens.ids)))
        distributed.teardown(d)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        outcome.put((rank, repr(e), -1))


def test_two_ranks_on_an_empty_cache_build_it_once(tmp_path):
    """Rank 0 trains the vocabulary, tokenises and builds the PMI tables; rank 1 waits and reads them."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    outcome = ctx.Queue()
    log = tmp_path / "built.txt"
    procs = [ctx.Process(target=_prepare_as_rank, args=(r, port, str(tmp_path / "cache"), str(log), outcome))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(outcome.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [n > 0 for _, _, n in results] == [True, True], results
    assert results[0][1] == results[1][1]  # the same cached tokens
    assert log.read_text().splitlines() == ["0 vocab", "0 tokens", "0 pmi"]
