"""The install layout: kernels/ ships as zeromask.kernels, never as a top-level `kernels`."""
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
