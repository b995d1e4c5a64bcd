"""Build zeromask: the Python package, `kernels/` as `zeromask.kernels`, and the C++ extension.

The CPU extension (csrc/cpu) is built with torch's BuildExtension whenever torch is
importable at build time; the CUDA extension (csrc/cuda) only where torch has CUDA and a
CUDA toolkit is found. ZEROMASK_NO_EXT=1 skips both: the package then runs on the reference
(and Triton) backends and says so once when a kernel backend is asked for.
"""
import glob
import os

from setuptools import setup

PACKAGES = ["zeromask", "zeromask.backends", "zeromask.audio", "zeromask.models",
            "zeromask.data", "zeromask.cli", "zeromask.kernels", "zeromask.integrations"]


def extensions():
    if os.environ.get("ZEROMASK_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("zeromask: torch not importable at build time; skipping the C++ extension "
              "(install torch first and use pip install --no-build-isolation)")
        return [], {}
    exts = []
    include = [os.path.abspath("csrc/include")]  # zeromask_args.h: the bindings' contract
    headers = sorted(glob.glob("csrc/include/*.h"))
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        openmp = ["-fopenmp"]
        # No -ffast-math: the kernels rely on -inf for masked logits and empty rows
        # (-ffinite-math-only would let the compiler drop those paths). -march=native is
        # right for a package built on the machine that runs it; ZEROMASK_PORTABLE=1 drops
        # it for a wheel that must run elsewhere.
        arch = [] if os.environ.get("ZEROMASK_PORTABLE", "0") == "1" else ["-march=native"]
        exts.append(cpp_extension.CppExtension(
            "zeromask._C_cpu", cpu_sources, include_dirs=include,
            depends=sorted(glob.glob("csrc/cpu/*.h")) + headers,
            extra_compile_args={"cxx": ["-O3", "-fno-math-errno", "-fno-trapping-math",
                                        "-std=c++20"] + arch + openmp},
            extra_link_args=openmp))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if (cuda_sources and torch.version.cuda is not None and cpp_extension.CUDA_HOME
            and os.environ.get("ZEROMASK_NO_CUDA_EXT", "0") != "1"):
        # No --use_fast_math: it turns sinf/cosf into approximations that are poor for the
        # large rotary angles (pos * w reaches thousands of radians before reduction).
        exts.append(cpp_extension.CUDAExtension(
            "zeromask._C_cuda", cuda_sources, include_dirs=include,
            depends=sorted(glob.glob("csrc/cuda/*.h")) + headers,
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "-std=c++20"]}))
    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="zeromask",
    version="0.1.0",
    description="Fused f0-rotary + zero-soft attention kernels for speech models",
    packages=PACKAGES,
    package_dir={"zeromask.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "audio": ["librosa", "soundfile", "praat-parselmouth"],
        "train": ["tqdm", "jiwer", "librosa", "soundfile", "praat-parselmouth"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "hf": ["transformers>=5"],
        "test": ["pytest", "pytest-benchmark", "matplotlib", "tqdm", "ninja", "triton",
                 "librosa", "soundfile", "jiwer", "praat-parselmouth", "transformers>=5"],
    },
    entry_points={"console_scripts": [
        "zeromask-make-data = zeromask.cli.make_data:main",
        "zeromask-train = zeromask.cli.train:main",
        "zeromask-eval = zeromask.cli.eval:main",
        "zeromask-experiments = zeromask.cli.experiments:main",
        "zeromask-plots = zeromask.cli.plots:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
