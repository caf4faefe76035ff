"""Where a run computes and in what precision: the device (`trainer.device`), made current so that every bare
`torch.cuda.*` call (synchronize, pinned memory, bf16 detection) is about it; the precision
(`trainer.precision`), chosen from what the hardware multiplies natively; and the two MFU denominators, the
matrix-multiply throughput measured on the device and, on a GPU whose dense peak is known, that spec peak.

A CUDA path cannot be run on the CPU machines this project is developed on: each function here keeps its CUDA
branch small enough to be exercised with `torch.cuda` mocked (tests/test_device.py).
"""
from __future__ import annotations

import logging
import time

import torch

from bertexp.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "tf32", "bf16")

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s, from the vendors' data sheets, SXM parts unless the name
# says otherwise: the denominator of MFU as MosaicBERT, ModernBERT and the PaLM paper report it. Matched
# against torch.cuda.get_device_name by the first key it contains (longer, more specific keys first).
SPEC_PEAKS: dict[str, dict[str, float]] = {
    "GH200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {},  # AWS's variant of the A10, clocked lower; its peaks are not published
    "A10": {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "V100": {"fp32": 15.7e12},  # no bf16 tensor cores: precision=auto trains it in fp32
    "T4": {"fp32": 8.1e12},
}


def resolve_device(name: str) -> torch.device:
    """trainer.device as a torch.device; a CUDA device always with its index (the current one for `cuda`), so
    that every later call names it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name!r} but no CUDA device is available")
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise ConfigError(f"trainer.device={name!r} but only {count} CUDA device(s) are visible "
                              f"(cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ConfigError(f"trainer.device={name!r}: bertexp trains on cpu or cuda")
    return device


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device: torch.cuda.synchronize(), pin_memory, is_bf16_supported and NCCL
    all act on the current device, which is cuda:0 unless set (trainer.device=cuda:1 would otherwise time
    and pin for GPU 0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU); named, never the bare current device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware. On CUDA that is compute capability 8.0 (Ampere) and up:
    torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (V100, T4), slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def has_tf32(device: torch.device) -> bool:
    """TF32 tensor cores: CUDA compute capability 8.0 and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> str:
    """trainer.precision as the run computes: bf16 (autocast), tf32 (fp32 weights and activations, matmuls on
    TF32 tensor cores) or fp32 (full fp32 matmuls). auto: bf16 where the hardware multiplies bf16 natively (an
    Ampere or later GPU, a CPU with AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 is slower than
    fp32."""
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={name!r} must be one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "tf32" and not has_tf32(device):
        raise ConfigError(f"trainer.precision=tf32 needs a CUDA GPU of compute capability 8.0 or later (Ampere); "
                          f"{device} has none: use fp32")
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        log.warning("trainer.precision=bf16 on %s, which emulates bf16: slower than fp32", device)
    return name


def apply_matmul_precision(precision: str, device: torch.device) -> None:
    """Set fp32 matmuls to what `precision` says, explicitly: PyTorch's default (full fp32) is a silent 2-8x on
    an Ampere+ GPU, and a library imported earlier may have switched TF32 on. Logged, so the run says which."""
    tf32 = precision == "tf32"
    # The API every reader agrees with: torch 2.9's per-backend `fp32_precision` set on cuda.matmul alone leaves
    # torch.get_float32_matmul_precision() (which inductor's cache key reads) raising on a "mix of APIs"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if precision == "fp32" and has_tf32(device):
        log.info("precision fp32 on %s: full fp32 matmuls, TF32 off (trainer.precision=tf32 runs them on the "
                 "TF32 tensor cores, several times faster)", torch.cuda.get_device_name(device))
    elif tf32:
        log.info("precision tf32: fp32 weights and activations, matmuls on TF32 tensor cores")


def matmul_flops(device: torch.device, dtype=torch.float32, n: int | None = None, reps: int | None = None) -> float:
    """This device's matrix-multiply throughput (FLOP/s), measured now in `dtype` (with the TF32 setting in
    force): the denominator of `throughput/mfu_measured`. Timed between syncs of this very device."""
    n = n or (2048 if device.type == "cpu" else 8192)
    reps = reps or (2 if device.type == "cpu" else 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def spec_peak(device: torch.device, precision: str) -> float | None:
    """The dense data-sheet peak (FLOP/s) of `device` in `precision`, or None (a CPU, a GPU not in SPEC_PEAKS):
    the denominator of `throughput/mfu_spec`, comparable with published MFU."""
    if device.type != "cuda":
        return None
    return spec_peak_of(torch.cuda.get_device_name(device), precision)


def spec_peak_of(gpu_name: str, precision: str) -> float | None:
    for key, peaks in SPEC_PEAKS.items():
        if key in gpu_name:
            return peaks.get(precision)
    return None
