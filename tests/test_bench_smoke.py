"""Smoke test of the benchmark report command (``zeromask-bench``) on the smallest shapes.

It runs the real command in a subprocess into a temporary folder and checks that the
markdown table, the JSON and the PNG plots are written, that every provider has a row for
every shape and mode (measured, or marked unavailable with a reason), and that every
provider that ran agrees with the float64 reference. Timings are never asserted.
"""
import json
import subprocess
import sys

import pytest
import torch

from zeromask.backends import cpp as cpp_backend
from zeromask.cli import bench as zb

ARGS = ["--suite", "cpu-quick", "--lengths", "64", "--head-dims", "32", "--heads", "2",
        "--min-reps", "1", "--max-reps", "2", "--time-budget", "0", "--no-progress"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("# results\n\n<!-- zeromask-bench:x/cpu-quick -->\nstale\n"
                      "<!-- /zeromask-bench:x/cpu-quick -->\n")
    res = subprocess.run([sys.executable, "-m", "zeromask.cli.bench", *ARGS, "--out", str(out),
                          "--update-readme", str(readme)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"zeromask-bench failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out, res.stdout


def test_files_written(report):
    out, stdout = report
    md = out / "cpu-quick.md"
    assert md.is_file() and md.stat().st_size > 0
    assert (out / "cpu-quick.json").is_file()
    for op in zb.OPS:
        for what in ("time", "memory"):
            png = out / f"cpu-quick_{op}_{what}.png"
            assert png.is_file(), png
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert png.name in md.read_text()  # the table links its plots
    text = md.read_text()
    for header in ("| device |", "| versions | torch", "| commit |", "| date |",
                   "DESIGN.md section 6", "fwd+bwd = 3.5x forward"):
        assert header in text, header
    # the command prints the table and names what it wrote
    assert "| L | provider | median ms | min ms | IQR |" in stdout
    assert "cpu-quick_attention_time.png" in stdout


def test_readme_block_written(report):
    out, _ = report
    text = (out / "README.md").read_text()
    assert text.startswith("# results")
    assert "stale" in text  # another device's block is left alone
    slug = json.loads((out / "cpu-quick.json").read_text())["meta"]["device_slug"]
    start, end = f"<!-- zeromask-bench:{slug}/cpu-quick -->", f"<!-- /zeromask-bench:{slug}/cpu-quick -->"
    assert text.count(start) == 1 and text.count(end) == 1
    block = text.split(start)[1].split(end)[0]
    assert "DESIGN.md section 6" in block and "(cpu-quick_attention_time.png)" in block
    assert "| sdpa | " in block and "(1.00x)" in block


def test_every_provider_row_present_or_unavailable(report):
    out, _ = report
    data = json.loads((out / "cpu-quick.json").read_text())
    md = (out / "cpu-quick.md").read_text()
    rows = data["rows"]
    meta = data["meta"]
    assert meta["commit"] and meta["versions"]["torch"] == torch.__version__
    assert meta["device"] == "cpu" and meta["date"]
    for op in zb.OPS:
        names = [p.name for p in zb.providers(op)]
        assert set(data["providers"][op]) == set(names)
        for mode in zb.MODES:
            got = {r["provider"]: r for r in rows if r["op"] == op and r["mode"] == mode}
            assert set(got) == set(names), (op, mode)
            section = md.split(f"### {op}, {mode}, D=32, fp32")[1].split("###")[0]
            for name, r in got.items():
                assert f"| 64 | {name} |" in section, (op, mode, name)
                if r["status"] == "ok":
                    assert r["median_s"] > 0 and len(r["times_s"]) >= 1
                    assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
                    assert r["ratio"] is not None and r["ratio"] > 0
                else:
                    assert r["status"] == "unavailable" and r["reason"], r
                    assert f"| 64 | {name} | unavailable [" in section
                    assert r["reason"] in md


def test_providers_agree_with_reference(report):
    out, _ = report
    rows = json.loads((out / "cpu-quick.json").read_text())["rows"]
    # the PyTorch baselines and the reference always run on a CPU
    must_run = {("attention", "sdpa"), ("attention", "sdpa+bias+rope"), ("attention", "naive"),
                ("attention", "zeromask[reference]"), ("rotary", "rope-table"),
                ("rotary", "naive"), ("rotary", "zeromask[reference]")}
    for r in rows:
        if (r["op"], r["provider"]) in must_run:
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            assert r["max_abs_err"] is not None, r
            assert r["max_abs_err"] <= r["err_tol"] and not r["mismatch"], r
        if r["op"] == "attention" and r["status"] == "ok":
            flops = 4 * 1 * 2 * 64 * 64 * 32 * (1 if r["mode"] == "fwd" else 3.5)
            assert r["flops"] == pytest.approx(flops)


def test_compute_ceiling_measured(report):
    out, _ = report
    meta = json.loads((out / "cpu-quick.json").read_text())["meta"]
    ceiling = meta["compute_ceiling"]
    if cpp_backend.available() is not None:
        assert ceiling is None  # nothing to measure it with: no claim is made
        return
    assert ceiling["what"].startswith("fp32 FMA peak (") and ceiling["threads"] >= 1
    assert 1e8 < ceiling["flop_per_s"] < 1e14  # a real measurement, not a placeholder
    assert "| compute ceiling | fp32 FMA peak (" in (out / "cpu-quick.md").read_text()


def test_fma_peak_does_the_work():
    """The ceiling is a measured rate of a plausible CPU: a loop the compiler had optimised
    away would report an absurd rate (no timing is compared here)."""
    if cpp_backend.available() is not None:
        pytest.skip(cpp_backend.available())
    from zeromask import _C_cpu
    assert _C_cpu.vector_bits() in (128, 256, 512)
    rate = _C_cpu.fma_peak(2_000_000)
    assert 1e9 < rate < 1e13 * torch.get_num_threads()
    with pytest.raises(RuntimeError, match="iters > 0"):
        _C_cpu.fma_peak(0)


def _row(provider, mode, median_s, flops):
    return zb.Row(provider=provider, op="attention", mode=mode, device="cpu", dtype="fp32",
                  batch=1, heads=8, length=2048, head_dim=64, causal=False,
                  median_s=median_s, min_s=median_s, flops=flops,
                  flop_per_s=flops / median_s)


def test_section6_verdicts_against_the_ceiling():
    """The CPU check's arithmetic on made-up times: which targets are met, what rate a
    missed speed-up needs, and whether that is beyond the measured compute ceiling."""
    flops = 4 * 8 * 2048 ** 2 * 64
    rows = [_row("zeromask[cpp]", "fwd", 0.040, flops), _row("sdpa", "fwd", 0.045, flops),
            _row("naive", "fwd", 0.300, flops), _row("flex+rope", "fwd", 0.080, flops)]
    ceiling = {"what": "fp32 FMA peak (512-bit vectors, 2 threads)", "reps": 3, "threads": 2,
               "flop_per_s": 250e9}
    text = "\n".join(zb.section6(rows, "cpu", ceiling))
    line = next(ln for ln in text.splitlines() if ln.startswith("| fwd | 2048 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == "0.89x" and cells[8] == "7.50x" and cells[9] == "2.00x"
    # flex+rope / fused = 2 < 3: the fused time would have to be 80/3 ms, i.e.
    # flops / 0.02667 s = 322 GFLOP/s, 1.29x the 250 GFLOP/s ceiling
    assert cells[10] == ("misses: flex+rope ÷ fused 2.00 not ≥ 3.00 (needs 322 GFLOP/s, "
                         "1.29x the compute ceiling: out of reach on this machine)")
    assert cells[12] == f"{flops / 0.040 / 250e9:.0%}"
    assert "Compute ceiling: fp32 FMA peak (512-bit vectors, 2 threads), 250 GFLOP/s" in text
    # a slower flex leaves the target reachable, and met
    rows[-1] = _row("flex+rope", "fwd", 0.130, flops)
    line = next(ln for ln in zb.section6(rows, "cpu", ceiling) if ln.startswith("| fwd |"))
    assert "| meets |" in line
    # a miss that the ceiling allows says how close it is
    ceiling["flop_per_s"] = 400e9
    rows[-1] = _row("flex+rope", "fwd", 0.080, flops)
    line = next(ln for ln in zb.section6(rows, "cpu", ceiling) if ln.startswith("| fwd |"))
    assert "(needs 322 GFLOP/s, 81% of the compute ceiling)" in line
    # without a ceiling the table still renders, with no rate claims
    line = next(ln for ln in zb.section6(rows, "cpu", None) if ln.startswith("| fwd |"))
    assert "needs" not in line and line.rstrip().endswith("| — |")


def test_speech_like_inputs():
    zero = zb.speech_like_zero(3, 1000, 0.2)
    assert zero.shape == (3, 1000)
    assert zero.sum(1).tolist() == [200, 200, 200]
    assert zero[:, 0].all() and zero[:, -1].all()  # leading and trailing silence
    w = zb.Workload("attention", "fwd", "cpu", torch.float32, 1, 2, 256, 32)
    x = zb.make_inputs(w)
    assert x.theta.shape == (1, 256) and bool((x.theta > 1).all())
    assert x.theta.unique().numel() > 50  # per-position, not a constant base


def test_provider_selection_keeps_baseline():
    ps = zb.providers("attention")
    names = [p.name for p in zb.select_providers(ps, ["zeromask", "naive"])]
    assert "sdpa" in names and "naive" in names and "flex+rope" not in names
    assert {n for n in names if n.startswith("zeromask[")} == {
        f"zeromask[{b}]" for b in zeromask_backends()}


def zeromask_backends():
    import zeromask
    return list(zeromask.available_backends())
