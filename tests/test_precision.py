"""The precision "auto" picks, from fixed /proc/cpuinfo texts and devices rather than
from the machine the tests happen to run on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlbd_ray.config import Precision
from hlbd_ray.precision import cpu_has_fast_bf16, resolve_precision

AMX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n"
# The flag names appear, but not on a flags line: no native bf16.
NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nmodel name\t: amx_bf16 lookalike\n"


def test_native_bf16_is_read_from_the_flags_lines_only():
    assert cpu_has_fast_bf16(AMX) and cpu_has_fast_bf16(AVX512_BF16)
    assert not cpu_has_fast_bf16(NO_BF16) and not cpu_has_fast_bf16("")


@pytest.mark.parametrize("cpuinfo, expected", [(AMX, "bf16"), (AVX512_BF16, "bf16"), (NO_BF16, "fp32")])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(cpuinfo, expected):
    assert resolve_precision("auto", torch.device("cpu"), cpuinfo) == expected


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_follows_the_gpu_not_the_cpu(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert resolve_precision("auto", torch.device("cuda"), AMX) == expected
    assert resolve_precision(Precision.auto, torch.device("cuda"), NO_BF16) == expected


@pytest.mark.parametrize("requested", [Precision.fp32, Precision.bf16, "fp32"])
def test_an_explicit_precision_wins_and_is_a_plain_string(requested):
    for cpuinfo in (AMX, NO_BF16):
        resolved = resolve_precision(requested, torch.device("cpu"), cpuinfo)
        assert resolved == str(requested) and type(resolved) is str    # it travels in reports


def test_the_sweeps_probe_on_a_cpu_reads_cpuinfo_without_torch():
    # A fresh interpreter, as the probe task's Ray worker is: on a CPU cluster it answers
    # from /proc/cpuinfo, and importing torch there cost each sweep's start about 0.8 s.
    probe = ("import sys; from hlbd_ray.precision import _cpu_precision, _probe_precision; "
             "print(_probe_precision('auto', False) == _cpu_precision(), _probe_precision('fp32', False), "
             "'torch' in sys.modules)")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "fp32", "False"]
