"""The precision a run trains at: "auto" resolved for the hardware the workers run on.

Torch is imported only to ask a GPU: the sweep's probe task on a CPU cluster
(resolve_on_cluster) reads /proc/cpuinfo alone, in a worker that never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

# A probe task that gets no worker slot in this long means the workers cannot start either.
PROBE_TIMEOUT_S = 120.0


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (AMX tiles or AVX512-BF16), judged from
    the `flags` lines of /proc/cpuinfo (or of `cpuinfo`, its text).

    There bf16 autocast measured over 2x the fp32 step with the same loss (BENCHMARKS.md);
    elsewhere bf16 is emulated and slower, so fp32 stays the default.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(requested: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """"fp32", "bf16" or "fp16" (a plain string: it travels in every report).

    "auto" is bf16 on a GPU that supports it (else fp16, with a grad scaler), bf16 on a
    CPU with native bf16 (`cpuinfo`: /proc/cpuinfo's text, read when not given), else fp32.
    """
    if requested != "auto":
        return str(requested)
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return _cpu_precision(cpuinfo)


def _cpu_precision(cpuinfo: str | None = None) -> str:
    return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"


def _probe_precision(requested: str, use_gpu: bool) -> str:
    """resolve_precision on the worker the probe landed on."""
    if not use_gpu:
        return str(requested) if requested != "auto" else _cpu_precision()
    import torch

    return resolve_precision(requested, torch.device("cuda"))


def resolve_on_cluster(requested: str, cpus_per_worker: float, gpus_per_worker: float) -> str:
    """"auto" resolved once, on the driver, by a task shaped like one Train worker.

    Ray places the task where such a worker can run, so it sees that hardware (a GPU's
    bf16 support, a worker node's CPU flags), not the driver's. The result goes into the
    config every worker and trial gets: a sweep on a mixed cluster compares like with
    like instead of some trials in bf16 and others in fp32.
    """
    if requested != "auto":
        return str(requested)
    import ray

    probe = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_probe_precision)
    ref = probe.remote(requested, gpus_per_worker > 0)
    try:
        return ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise RuntimeError(f"no worker slot ({cpus_per_worker:g} CPUs, {gpus_per_worker:g} GPUs) "
                           f"came free in {PROBE_TIMEOUT_S:g} s to resolve train.precision=auto") from None
