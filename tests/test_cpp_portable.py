"""The C++ CPU kernels built without ``-march=native`` (``ZEROMASK_PORTABLE=1``).

The installed extension is built for the machine it runs on (``-march=native``), so the
default test run exercises that ISA's paths of ``csrc/cpu`` only: AVX-512 (vscalefps in the
exp, 6x4 zmm blocking) on the machines that have it, 32- or 16-byte vectors elsewhere. A
portable build takes the baseline x86-64 (SSE2, 16-byte) paths instead. This module compiles ``csrc/cpu`` the way
``ZEROMASK_PORTABLE=1`` does (baseline x86-64) into a temporary folder and runs the
correctness checks of the ``cpp`` backend on it, against the float64 reference.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from zeromask.backends import cpp as cpp_backend

from cases import attention_case, check_attention

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(str(p) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
# the venv's bin holds the pip-installed ninja even when the venv is not activated
BIN_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="no C++ compiler"),
    pytest.mark.skipif(shutil.which("ninja", path=BIN_PATH) is None, reason="torch's cpp_extension.load needs "
                       "ninja (the [test] extra installs it)"),
]


@pytest.fixture(scope="module")
def portable_ext(tmp_path_factory):
    from torch.utils import cpp_extension
    build = tmp_path_factory.mktemp("portable_build")
    # setup.py's flags for the CPU extension, less -march=native
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c++20", "-fopenmp"]
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = BIN_PATH
    try:
        return cpp_extension.load(name="zeromask_cpu_portable", sources=SOURCES,
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  extra_include_paths=[str(ROOT / "csrc" / "include")],
                                  build_directory=str(build), verbose=False)
    finally:
        os.environ["PATH"] = old_path


@pytest.fixture
def portable(portable_ext, monkeypatch):
    """The cpp backend, running the portable build."""
    monkeypatch.setattr(cpp_backend, "_C", portable_ext)
    return portable_ext


def test_portable_build_has_no_avx512(portable_ext):
    import subprocess
    so = Path(portable_ext.__file__)
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                         text=True, check=True).stdout
    assert "%zmm" not in asm  # the generic paths, not the AVX-512 ones


@pytest.mark.parametrize("kw", [dict(), dict(zero_mode="score", causal=True),
                                dict(seqlens=True, zero_scale=1e-6),
                                dict(Hq=4, Hkv=1, Lq=131, Lk=70, interleaved=True, radius=True),
                                dict(D=40, rotary_dim=16, causal=True, Lq=40, Lk=17)])
def test_portable_attention_matches_reference(portable, kw):
    check_attention(attention_case(**kw, seed=3), torch.float32, "cpp")


def test_portable_exp_extremes(portable):
    """Logits far below the row max (exp underflows to exactly 0) and a row of equal
    logits (exp(0) = 1 for every key) through the generic exp."""
    import zeromask
    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 1, 9, 16)
    k[..., 3, :] = q[0, 0, 0] * 1e3  # one key dominates row 0 by ~1e4 logits
    v = torch.randn(1, 1, 9, 16)
    out = zeromask.zero_soft_attention(q, k, v, backend="cpp")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    same = zeromask.zero_soft_attention(torch.zeros(1, 1, 2, 16), k, v, backend="cpp")
    torch.testing.assert_close(same[0, 0, 0], v[0, 0].mean(0), rtol=1e-6, atol=1e-6)
