"""csrc/cuda builds: nvcc compiles every device source for sm_80 and sm_90, the torch binding
compiles with the host compiler, and (on a machine with a GPU and the built extension) the
``cuda`` backend matches the float64 reference like the CPU kernels do.

The device code must not include ATen / c10 / torch headers (the CPU torch wheel lacks the
CUDA ones), so nvcc compiles it on a machine without a GPU.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
CPP_SOURCES = sorted(CUDA_DIR.glob("*.cpp"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


NVCC = _nvcc()


def test_sources_exist():
    assert CU_SOURCES, "no csrc/cuda/*.cu sources"
    assert CPP_SOURCES, "no csrc/cuda/*.cpp binding"


@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_device_code_has_no_torch_headers(src):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', src.read_text(), re.M)
    bad = [h for h in includes if h.split("/")[0] in ("ATen", "c10", "torch", "caffe2")]
    assert not bad, f"{src.name} includes torch headers {bad}; take raw pointers instead"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, arch, tmp_path):
    obj = tmp_path / (src.stem + f"_sm{arch}.o")
    cmd = [NVCC, "-c", str(src), "-o", str(obj), "-std=c++20", "-O3",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", str(CUDA_DIR),
           "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed for sm_{arch}:\n{res.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    # every kernel fits the 48 KiB of static shared memory a launch gets without opt-in
    smem = [int(n) for n in re.findall(r"(\d+) bytes smem", res.stderr)]
    assert smem and max(smem) <= 48 * 1024, f"static shared memory {max(smem)} bytes"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
@pytest.mark.parametrize("src", CPP_SOURCES, ids=lambda p: p.name)
def test_binding_compiles_with_host_compiler(src):
    from torch.utils import cpp_extension
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-w", *incs,
           f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_DIR}",
           f"-I{ROOT / 'csrc' / 'include'}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"host compile failed:\n{res.stderr[-4000:]}"


# --------------------------------------------------------------------------------------
# on a GPU with the extension built: the correctness suite with the cuda backend
# --------------------------------------------------------------------------------------
def _cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from zeromask.backends import cuda as cuda_backend
    return cuda_backend.available()


_GPU_REASON = _cuda_reason()
gpu = pytest.mark.skipif(_GPU_REASON is not None, reason=f"cuda backend: {_GPU_REASON}")


@gpu
def test_cuda_rotary_op_matches_reference():
    import zeromask
    from cases import f0_theta
    from tolerance import assert_grad_close, assert_output_close
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 41, 40
    x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    theta = f0_theta(B, L, g)
    rad = 0.5 + torch.rand(12, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)

    def run(dt, dev, backend):
        xx = x.to(dev, dt).requires_grad_()
        th = theta.to(dev).requires_grad_()
        rr = rad.to(dev).requires_grad_()
        y = zeromask.f0_rotary(xx, th, rotary_dim=24, interleaved=True, radius=rr,
                               backend=backend)
        grads = torch.autograd.grad(y, [xx, th, rr], dy.to(dev, dt))
        return y.detach().cpu(), [t.cpu() for t in grads]

    y0, g0 = run(torch.float64, "cpu", "reference")
    y1, g1 = run(torch.float32, "cpu", "reference")
    y2, g2 = run(torch.float32, "cuda", "cuda")
    assert_output_close("y", y2, y0, y1, torch.float32)
    for name, a, o, s in zip(("dx", "dtheta", "dradius"), g2, g0, g1):
        assert_grad_close(name, a, o, s, torch.float32)
