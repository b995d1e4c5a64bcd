"""The install layout: kernels/ ships as zeromask.kernels, never as a top-level `kernels`;
nothing that only the benchmarks use (benchmarks/: the command, the runner, the FMA-peak
probe) ships in the package."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_into_the_package():
    import zeromask.kernels

    assert Path(zeromask.kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_wheel_contains_zeromask_kernels_and_no_top_level_kernels(tmp_path):
    env = dict(os.environ, ZEROMASK_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, env=env, cwd=tmp_path)
    (wheel,) = tmp_path.glob("zeromask-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zeromask/kernels/__init__.py" in names
    assert "zeromask/backends/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    # no benchmark code: no bench module, no runner or report, no console script for them
    assert not any("bench" in n.lower() or n.startswith("benchmarks/") for n in names), [
        n for n in names if "bench" in n.lower()]
    assert not any(n.rsplit("/", 1)[-1] in ("runner.py", "report.py", "fma_peak.cpp")
                   for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bench" not in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_no_benchmark_code_in_the_package():
    """The benchmarks run from the checkout (python benchmarks/bench.py): the package has
    no bench module, no console script for it, and its C++ extension no FMA-peak probe
    (that is benchmarks/fma_peak.cpp, built at benchmark time)."""
    assert importlib.util.find_spec("zeromask.cli.bench") is None
    for top in ("zeromask", "kernels"):
        found = [p for p in (ROOT / top).rglob("*") if "bench" in p.name.lower()
                 and "__pycache__" not in p.parts]
        assert not found, found
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("zeromask")}
    assert scripts and not any("bench" in n for n in scripts), scripts
    setup_py = (ROOT / "setup.py").read_text()
    assert "zeromask-bench" not in setup_py and "cli.bench" not in setup_py
    for src in (ROOT / "csrc").rglob("*"):
        if src.is_file():
            text = src.read_text(errors="replace")
            assert "fma_peak" not in text and "vector_bits" not in text, src
    try:
        from zeromask import _C_cpu
    except ImportError:
        return  # no extension built here: nothing more to look at
    assert not hasattr(_C_cpu, "fma_peak") and not hasattr(_C_cpu, "vector_bits")
    assert b"fma_peak" not in Path(_C_cpu.__file__).read_bytes()


def test_fma_probe_is_built_with_the_cpu_extension_flags():
    """benchmarks/fma_peak.cpp measures the vectors the CPU kernels use: it is compiled
    with the flags setup.py gives csrc/cpu (runner.cpu_extension_flags mirrors them)."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import runner
    setup_py = (ROOT / "setup.py").read_text()
    for flag in runner.cpu_extension_flags():
        assert f'"{flag}"' in setup_py, flag
    assert "ZEROMASK_PORTABLE" in setup_py


def _zeromask_imports(path: Path) -> set:
    """The zeromask modules a source file imports, at module level or inside functions."""
    import ast
    tree = ast.parse(path.read_text())
    pkg = "zeromask.kernels" if path.parent.name == "kernels" else ".".join(
        path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
            out.update(n for n in names if n.startswith("zeromask"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("zeromask"))
    return out


def test_no_import_loop_between_kernels_and_backends():
    """The Triton launchers (zeromask.kernels) take their output allocator from the leaf
    module zeromask.outputs, which imports nothing of zeromask; nothing in kernels/ reaches
    back into the backends, the dispatch or the ops that import it."""
    assert _zeromask_imports(ROOT / "zeromask" / "outputs.py") == set()
    for path in (ROOT / "kernels").glob("*.py"):
        back = {m for m in _zeromask_imports(path)
                if m.startswith(("zeromask.backends", "zeromask.dispatch", "zeromask.ops",
                                 "zeromask.modules"))}
        assert not back, (path.name, back)
    assert "zeromask.outputs.new_output" in _zeromask_imports(ROOT / "kernels" / "common.py")
