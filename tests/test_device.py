"""The CUDA paths, on a machine without CUDA: torch.cuda and torch.distributed mocked where the call made is
the point (which device is made current, synced, reduced on), real runs where the CPU can show it (a checkpoint
with eight GPUs' RNG states resumes here)."""
import pytest
import torch

from bertexp import checkpoint, device, distributed
from bertexp.errors import ConfigError
from conftest import run_in_process


class FakeCuda:
    """torch.cuda as a machine with `count` GPUs of compute capability `capability` shows it."""

    def __init__(self, monkeypatch, count=2, capability=(9, 0), name="NVIDIA H100 80GB HBM3"):
        self.calls = []
        self.capability = capability
        for attr, fn in {
            "is_available": lambda: True,
            "device_count": lambda: count,
            "current_device": lambda: 0,
            "set_device": lambda d: self.calls.append(("set_device", d)),
            "synchronize": lambda d=None: self.calls.append(("synchronize", d)),
            "get_device_capability": lambda d=None: self.capability,
            "get_device_name": lambda d=None: name,
            "is_bf16_supported": lambda including_emulation=True: self.capability >= (8, 0) or including_emulation,
        }.items():
            monkeypatch.setattr(torch.cuda, attr, fn)


def test_cuda_n_is_made_current_and_synced_by_name(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    d = device.resolve_device("cuda:1")
    assert d == torch.device("cuda", 1)
    device.use_device(d)
    device.synchronize(d)
    # the GPU asked for, never a bare call that would act on cuda:0
    assert cuda.calls == [("set_device", torch.device("cuda", 1)), ("synchronize", torch.device("cuda", 1))]
    assert device.resolve_device("cuda") == torch.device("cuda", 0)  # an index always, for the calls that name it
    with pytest.raises(ConfigError, match=r"trainer.device='cuda:2' but only 2 CUDA device"):
        device.resolve_device("cuda:2")


def test_auto_precision_never_picks_emulated_bf16(monkeypatch):
    cuda = FakeCuda(monkeypatch, capability=(7, 0), name="Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 0)
    assert torch.cuda.is_bf16_supported()  # what the old check asked: yes, by emulation
    assert device.resolve_precision("auto", gpu) == "fp32"
    with pytest.raises(ConfigError, match="trainer.precision=tf32 needs"):
        device.resolve_precision("tf32", gpu)
    cuda.capability = (8, 0)
    assert device.resolve_precision("auto", gpu) == "bf16"
    assert device.resolve_precision("tf32", gpu) == "tf32"
    with pytest.raises(ConfigError, match="trainer.precision=tf32 needs"):
        device.resolve_precision("tf32", torch.device("cpu"))
    with pytest.raises(ConfigError, match="trainer.precision='fp16' must be one of"):
        device.resolve_precision("fp16", gpu)


def test_tf32_is_set_explicitly_and_logged(monkeypatch, caplog):
    FakeCuda(monkeypatch, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
    gpu = torch.device("cuda", 0)
    before = torch.get_float32_matmul_precision()
    try:
        device.apply_matmul_precision("tf32", gpu)
        # every reader agrees: cuBLAS's flag, the per-backend setting, and the global one inductor reads
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch._C._get_cublas_allow_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        with caplog.at_level("INFO", logger="bertexp.device"):
            device.apply_matmul_precision("fp32", gpu)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not torch._C._get_cublas_allow_tf32()
        assert torch.get_float32_matmul_precision() == "highest"
        assert "full fp32 matmuls, TF32 off" in caplog.text and "A100" in caplog.text
    finally:
        torch.set_float32_matmul_precision(before)


def test_spec_peaks_by_gpu_name(monkeypatch):
    assert device.spec_peak_of("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert device.spec_peak_of("NVIDIA H100 PCIe", "bf16") == 756e12
    assert device.spec_peak_of("NVIDIA A100-SXM4-40GB", "tf32") == 156e12
    assert device.spec_peak_of("NVIDIA A10", "bf16") == 125e12
    assert device.spec_peak_of("NVIDIA A10G", "bf16") is None  # not the A10's peak
    assert device.spec_peak_of("Tesla V100-SXM2-16GB", "bf16") is None
    assert device.spec_peak(torch.device("cpu"), "fp32") is None
    FakeCuda(monkeypatch, name="NVIDIA H200")
    assert device.spec_peak(torch.device("cuda", 0), "bf16") == 989e12


def test_mfu_is_logged_against_both_peaks(monkeypatch):
    from bertexp.run_state import RunState
    from bertexp.train import mfu_peaks, train_record

    FakeCuda(monkeypatch, name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr("bertexp.train.matmul_flops", lambda d, dtype: 700e12)  # a timed matmul: below the sheet
    peaks = mfu_peaks(torch.device("cuda", 0), "bf16", measure=True)
    assert peaks == {"measured": 700e12, "spec": 989e12}
    state = RunState()
    from bertexp.data.dataset import Position

    state.advance(Position(), 1.0, mlm=1.0, nsp=0.0, tokens=1e6, selected=0, corrupted=0, predicted=0, maskable=1,
                  scheduled=0, seq=1e6, rows=1e4, width=100, nsp_random=0, flops=0, data_wait=0)
    objective = type("O", (), {"nsp_weight": 0.0, "has_nsp": False})()
    record = train_record(state, objective, 1e-4, peaks, lambda width: 1e8, distributed.Dist())
    # 1e8 FLOPs per token x 1e6 tokens/s = 1e14 FLOP/s
    assert record["throughput/mfu_measured"] == pytest.approx(1e14 / 700e12)
    assert record["throughput/mfu_spec"] == pytest.approx(1e14 / 989e12)
    assert "throughput/mfu" not in record  # one name per denominator


def test_nccl_reduces_on_the_training_gpu(monkeypatch):
    """Under NCCL, which reduces CUDA tensors only, the cross-rank sums are made on this rank's GPU."""
    FakeCuda(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    inits = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: inits.append(backend))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: inits[-1])
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend, timeout=None: f"{backend} group")
    d = distributed.setup(torch.device("cuda", 0))
    assert inits == ["nccl"] and d.device == torch.device("cuda", 1) and d.world == 2
    assert d.cpu_group == "gloo group"  # the CPU's counts are exchanged without reaching the GPU's queue

    # The reduction itself, with "meta" standing in for the GPU (no CUDA here): a device tensor is handed to
    # the default (NCCL) group on the Dist's device; numbers the CPU has go to the gloo group, on the CPU.
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(t, group=None):
        seen.append((t.device, t.dtype, group))
        if t.device.type == "meta":
            raise Reduced

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stand_in = distributed.Dist(0, 2, 0, torch.device("meta"), cpu_group="gloo group")
    with pytest.raises(Reduced):
        stand_in.sum(torch.ones(3))
    assert stand_in.sum([1.0, 2.0]) == [1.0, 2.0]  # (the mock sums nothing)
    assert seen == [(torch.device("meta"), torch.float64, None), (torch.device("cpu"), torch.float64, "gloo group")]
    # gloo: the CPU
    inits.append("gloo")
    assert distributed.reduce_device("gloo", torch.device("cpu"), 0) == torch.device("cpu")


def test_one_process_sums_device_tensor_without_a_group():
    assert distributed.Dist().sum(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    assert distributed.Dist().sum([1.0, 3.0]) == [1.0, 3.0]


def test_no_cuda_rng_state_saved_and_an_old_one_ignored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("get") or [])
    # one GPU visible: restoring eight states would raise, as torch does (IndexError)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: (_ for _ in ()).throw(IndexError("list index")))
    state = checkpoint.rng_state()
    assert "cuda" not in state and calls == []
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    checkpoint.set_rng_state(state)  # does not raise


def test_checkpoint_with_eight_gpus_rng_resumes_on_cpu(tmp_path):
    base = ["trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=2", "logger=none", "trainer.device=cpu"]
    run_in_process(tmp_path, base)
    path = tmp_path / "checkpoints" / "last" / checkpoint.STATE_FILE
    saved = torch.load(path, weights_only=True)
    saved["rng"]["cuda"] = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(8)]  # an 8-GPU run's
    torch.save(saved, path)
    final = run_in_process(tmp_path, [*base, "trainer.max_steps=3", "trainer.allow_changes=[trainer.max_steps]"])
    assert final["final/step"] == 3


def test_attention_implementation_is_an_option(pd_data):
    from hydra.utils import instantiate
    from hydra.errors import InstantiationException

    from bertexp.modeling import fit_attention_to_precision
    from conftest import compose

    data, tok = pd_data
    for model in ("bert_tiny", "modernbert_tiny"):
        spec = instantiate(compose([f"model={model}", "model.attn_implementation=eager"]).model)
        built = spec.build(tok)
        assert built.config._attn_implementation == "eager"
    with pytest.raises(InstantiationException, match=r"model.attn_implementation='magic' must be one of sdpa"):
        instantiate(compose(["model.attn_implementation=magic"]).model)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(InstantiationException, match="needs the flash_attn package"):
            instantiate(compose(["model.attn_implementation=flash_attention_2"]).model)
    built.config._attn_implementation = "flash_attention_2"  # as chosen where flash-attn is installed
    with pytest.raises(ConfigError, match="runs on a CUDA GPU in trainer.precision=bf16 only"):
        fit_attention_to_precision(built, "cpu", "bf16")


class _OnDevice(torch.Tensor):
    """A CPU tensor standing in for one on a GPU: every read of its values back to the host (what on a GPU
    waits for the device) is counted, boolean-mask indexing and nonzero among them."""

    reads: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name == "__getitem__" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
                    "masked_select") or boolean_index:
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("model", [["model=bert_tiny"], ["model=modernbert_tiny", "objective=mlm"]], ids=["bert", "modernbert"])
def test_a_training_step_reads_the_device_back_once(tmp_path, monkeypatch, model):
    """With the step's tensors standing in for a GPU's, a step (two accumulated micro-batches: forward,
    backward, loss sums, stop vote, clip, update) reads device values back once."""
    import bertexp.train as train

    real_feed, real_call = train.feed, train.Stepper.__call__
    per_step = []

    def feed(*args, **kwargs):
        return tuple(t.as_subclass(_OnDevice) for t in real_feed(*args, **kwargs))

    def call(self, *args, **kwargs):
        _OnDevice.reads = []
        out = real_call(self, *args, **kwargs)
        per_step.append(list(_OnDevice.reads))
        return out

    monkeypatch.setattr(train, "feed", feed)
    monkeypatch.setattr(train.Stepper, "__call__", call)
    run_in_process(tmp_path, [*model, "trainer.max_steps=1", "trainer.grad_accum=2", "data.batch_size=4", "logger=none",
                              "trainer.precision=fp32"])
    assert per_step == [["tolist"]]


def test_what_the_device_cannot_run_is_said_before_the_data_is_prepared(tmp_path, monkeypatch):
    """trainer.precision=tf32 or flash attention on this CPU: one-line ConfigError from run_training before
    anything is built (no vocabulary trained, no corpus tokenised)."""
    import bertexp.train
    from conftest import run_in_process

    def never(*a, **k):
        raise AssertionError("the run was built")

    monkeypatch.setattr(bertexp.train, "build", never)
    with pytest.raises(ConfigError, match="trainer.precision=tf32 needs"):
        run_in_process(tmp_path / "a", ["logger=none", "trainer.precision=tf32"])
    with pytest.raises(ConfigError, match="runs on a CUDA GPU in trainer.precision=bf16 only"):
        run_in_process(tmp_path / "b", ["logger=none", "model.attn_implementation=flash_attention_2"])
