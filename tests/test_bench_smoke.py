"""Smoke test of the benchmark command (``benchmarks/bench.py``) on the smallest shapes.

It runs the real command in a subprocess into a temporary folder and checks that the
markdown table, the JSON and the PNG plots are written, that every provider has a row for
every shape and mode (measured, or marked unavailable with a reason), and that every
provider that ran agrees with the float64 reference; the same for the ``model`` suite (the
speech model's shapes) at one or two calls per provider. Timings are never asserted. The
benchmarks are not part of the package: they are imported from the checkout's
``benchmarks/`` folder.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeromask.backends import cpp as cpp_backend

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import report as zr  # noqa: E402
import runner as zb  # noqa: E402

ARGS = ["--suite", "cpu-quick", "--lengths", "64", "--head-dims", "32", "--heads", "2",
        "--min-reps", "1", "--max-reps", "2", "--time-budget", "0", "--no-progress"]
MODEL_ARGS = ["--suite", "model", "--min-reps", "1", "--max-reps", "2", "--time-budget", "0",
              "--no-progress"]


def run_bench(args, out, timeout=600):
    res = subprocess.run([sys.executable, str(BENCH / "bench.py"), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (f"benchmarks/bench.py failed:\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("# results\n\n<!-- benchmarks:x/cpu-quick -->\nstale\n"
                      "<!-- /benchmarks:x/cpu-quick -->\n")
    res = run_bench([*ARGS, "--update-readme", str(readme)], out)
    return out, res.stdout


@pytest.fixture(scope="module")
def model_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-model")
    res = run_bench(MODEL_ARGS, out)
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
                   "docs/design.md section 6", "fwd+bwd = 3.5x forward"):
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
    start, end = f"<!-- benchmarks:{slug}/cpu-quick -->", f"<!-- /benchmarks:{slug}/cpu-quick -->"
    assert text.count(start) == 1 and text.count(end) == 1
    block = text.split(start)[1].split(end)[0]
    assert "docs/design.md section 6" in block and "(cpu-quick_attention_time.png)" in block
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
    """Where the package's C++ extension was built, a compiler is here, and the FMA probe
    (benchmarks/fma_peak.cpp, built by the command on first use) measures the ceiling."""
    out, _ = report
    meta = json.loads((out / "cpu-quick.json").read_text())["meta"]
    ceiling = meta["compute_ceiling"]
    if cpp_backend.available() is not None:
        pytest.skip(f"no C++ extension, so maybe no compiler: {cpp_backend.available()}")
    assert meta["compute_ceiling_unavailable"] is None
    assert ceiling["what"].startswith("fp32 FMA peak (") and ceiling["threads"] >= 1
    assert 1e8 < ceiling["flop_per_s"] < 1e14  # a real measurement, not a placeholder
    assert "| compute ceiling | fp32 FMA peak (" in (out / "cpu-quick.md").read_text()


def test_fma_peak_does_the_work():
    """The ceiling is a measured rate of a plausible CPU: a loop the compiler had optimised
    away would report an absurd rate (no timing is compared here)."""
    if cpp_backend.available() is not None:
        pytest.skip(cpp_backend.available())
    probe = zb.fma_probe()
    assert probe.vector_bits() in (128, 256, 512)
    rate = probe.fma_peak(2_000_000)
    assert 1e9 < rate < 1e13 * torch.get_num_threads()
    with pytest.raises(RuntimeError, match="iters > 0"):
        probe.fma_peak(0)


def test_no_ceiling_row_when_the_probe_does_not_build(report, monkeypatch, capsys):
    """A failed build of the FMA probe (no compiler, no ninja) leaves no ceiling row and
    says why, on stderr and in the table; the rest of the report stands."""
    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(zb, "fma_probe", broken)
    why: list = []
    assert zb.compute_ceiling("cpu", why_not=why) is None
    assert why == ["benchmarks/fma_peak.cpp did not build: RuntimeError: Ninja is required to "
                   "load C++ extensions"]
    assert "compute ceiling: not measured (benchmarks/fma_peak.cpp did not build" in \
        capsys.readouterr().err
    out, _ = report
    data = json.loads((out / "cpu-quick.json").read_text())
    meta = dict(data["meta"], compute_ceiling=None, compute_ceiling_unavailable=why[0])
    rows = [zb.Row(**r) for r in data["rows"]]
    text = zr.markdown(meta, rows, data["providers"])
    assert f"| compute ceiling | not measured: {why[0]} |" in text
    assert "fp32 FMA peak" not in text and "Compute ceiling:" not in text


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
    text = "\n".join(zr.section6(rows, "cpu", ceiling))
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
    line = next(ln for ln in zr.section6(rows, "cpu", ceiling) if ln.startswith("| fwd |"))
    assert "| meets |" in line
    # a miss that the ceiling allows says how close it is
    ceiling["flop_per_s"] = 400e9
    rows[-1] = _row("flex+rope", "fwd", 0.080, flops)
    line = next(ln for ln in zr.section6(rows, "cpu", ceiling) if ln.startswith("| fwd |"))
    assert "(needs 322 GFLOP/s, 81% of the compute ceiling)" in line
    # without a ceiling the table still renders, with no rate claims
    line = next(ln for ln in zr.section6(rows, "cpu", None) if ln.startswith("| fwd |"))
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


def test_cpu_named_in_every_run(report):
    """Each run says which CPU it ran on (model name, CPUID family and model, threads),
    on stdout at the start and in the table's header and JSON."""
    out, stdout = report
    meta = json.loads((out / "cpu-quick.json").read_text())["meta"]
    cpu = meta["cpu"]
    assert cpu["model_name"] and meta["cpu_description"].startswith(cpu["model_name"])
    if cpu.get("family") is not None:
        assert f"family {cpu['family']} model {cpu['model']}" in meta["cpu_description"]
    assert meta["cpu_description"].endswith(f"{meta['threads']} thread"
                                            + ("s" if meta["threads"] != 1 else ""))
    assert stdout.startswith(f"benchmark suite 'cpu-quick' on {meta['cpu_description']}")
    assert f"| cpu | {meta['cpu_description']} |" in (out / "cpu-quick.md").read_text()


def test_amd_core_names():
    assert zb.amd_core(0x17, 0x01) == "Zen / Zen+" and zb.amd_core(0x17, 0x31) == "Zen 2"
    assert zb.amd_core(0x19, 0x01) == "Zen 3" and zb.amd_core(0x19, 0x11) == "Zen 4"
    assert zb.amd_core(0x1A, 0x02) == "Zen 5" and zb.amd_core(0x15, 0x01) is None


def test_comparison_with_committed_results(report, tmp_path):
    """A committed run of the same suite is found and compared row by row: this run's
    median ÷ the committed one, summarised per provider; other suites are ignored."""
    out, _ = report
    data = json.loads((out / "cpu-quick.json").read_text())
    rows = [zb.Row(**r) for r in data["rows"]]
    committed = json.loads(json.dumps(data))
    for r in committed["rows"]:
        if r["median_s"]:
            r["median_s"] *= 2  # the committed machine took twice as long
    committed["meta"]["cpu_description"] = "Some CPU (family 1 model 2), 2 threads"
    (tmp_path / "results" / "some-cpu-2t").mkdir(parents=True)
    (tmp_path / "results" / "some-cpu-2t" / "cpu-quick.json").write_text(json.dumps(committed))
    other = dict(committed, meta=dict(committed["meta"], suite="cpu"))
    (tmp_path / "results" / "other").mkdir()
    (tmp_path / "results" / "other" / "cpu-quick.json").write_text(json.dumps(other))
    got = zr.compare_committed(rows, data["meta"], "cpu-quick", tmp_path / "results")
    assert len(got) == 1
    c = got[0]
    ok = [r for r in rows if r.status == "ok"]
    assert c["rows"] == len(ok) and c["geomean"] == pytest.approx(0.5)
    assert set(c["by_provider"]) == {r.provider for r in ok}
    line = zr.comparison_lines(got, data["meta"])[0]
    assert "some-cpu-2t/cpu-quick.json" in line and "geometric mean 0.50x" in line
    assert "Another CPU" in line  # a different machine is named as such
    # the command itself finds none for cpu-quick in the repository and says so
    assert "No committed result of suite 'cpu-quick'" in report[1] or "vs `" in report[1]


def test_model_suite_files_and_rows(model_report):
    """The model suite: every call of the speech model (overhead, encoder, decoder, cross,
    decode steps, head dims) in both modes, every provider measured or unavailable with a
    reason, one thread by default, its tables, verdicts and plots written."""
    out, stdout = model_report
    data = json.loads((out / "model.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["suite"] == "model" and meta["threads"] == 1
    assert stdout.startswith("benchmark suite 'model' on ")
    names = [p.name for p in zb.select_providers(zb.providers("attention"),
                                                 zb.SUITES["model"]["providers"])]
    assert "flex+rope" not in names and "sdpa+bias+rope" in names and "naive" in names
    assert set(data["providers"]["attention"]) == set(names)
    want = {(s["tag"], s["length"], s.get("length_k") or s["length"], s["head_dim"],
             s.get("keys_rotated", False)) for s in zb.MODEL_SHAPES}
    assert any(w[-1] for w in want)  # decode steps against a cache of rotated keys too
    for mode in zb.MODES:
        got = {(r["tag"], r["length"], r["length_k"] or r["length"], r["head_dim"],
                r["keys_rotated"]) for r in rows if r["mode"] == mode}
        assert got == want, mode
    for r in rows:
        assert r["status"] in ("ok", "unavailable")
        if r["provider"] in ("sdpa", "sdpa+bias+rope", "naive", "zeromask[reference]"):
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["ratio"] > 0
            if r["max_abs_err"] is not None:
                assert r["max_abs_err"] <= r["err_tol"] and not r["mismatch"], r
        else:
            assert r["reason"]
    # a decode step's one query sees every key of the cache: no causal halving
    dec = next(r for r in rows if r["tag"] == "decode" and r["length_k"] == 64
               and r["mode"] == "fwd")
    assert dec["causal"] and dec["length"] == 1
    assert dec["flops"] == pytest.approx(4 * 16 * 4 * 1 * 64 * 24)
    cross = next(r for r in rows if r["tag"] == "cross")
    assert not cross["rotary"] and (cross["length"], cross["length_k"]) == (40, 200)
    md = (out / "model.md").read_text()
    assert "### The speech model's shapes (issue 15)" in md
    assert "| decode | B16 H4 Lq1 Lk64 D24 causal | fwd |" in md
    assert "| overhead | B1 H1 L1 D16 | fwd+bwd |" in md
    assert "≤ 25 us forward" in md and "Shapes meeting their target: fwd: " in md
    assert "Head dims at B16 H4 L128" in md and "| fwd | 40 |" in md
    for what in ("ratio", "time"):
        png = out / f"model_attention_{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in md


def test_model_verdicts():
    """Issue 15's arithmetic on made-up times: ratios to SDPA against 0.9 / 1.0, the
    per-call overhead against 25 / 120 us."""
    def row(provider, mode, median_s, tag="encoder"):
        return zb.Row(provider=provider, op="attention", mode=mode, device="cpu",
                      dtype="fp32", batch=16, heads=4, length=128, head_dim=24, causal=False,
                      median_s=median_s, tag=tag)
    assert zr.model_verdict(row("zeromask[cpp]", "fwd", 0.9), row("sdpa", "fwd", 1.0)) == \
        "meets: 0.90 ≤ 0.90"
    assert zr.model_verdict(row("zeromask[cpp]", "fwd", 0.95), row("sdpa", "fwd", 1.0)) == \
        "misses: 0.95 > 0.90"
    assert zr.model_verdict(row("zeromask[cpp]", "fwd+bwd", 1.0), row("sdpa", "fwd+bwd", 1.0)) \
        == "meets: 1.00 ≤ 1.00"
    assert zr.model_verdict(row("zeromask[cpp]", "fwd", 24e-6, "overhead"), None) == \
        "meets: 24 us ≤ 25 us"
    fast = row("zeromask[cpp]", "fwd", 30e-6, "overhead")
    fast.min_s = 21e-6
    assert zr.model_verdict(fast, None) == "misses: 30 us > 25 us (fastest call 21 us)"
    assert zr.model_verdict(row("zeromask[cpp]", "fwd+bwd", 130e-6, "overhead"), None) == \
        "misses: 130 us > 120 us"
    assert zr.model_verdict(None, row("sdpa", "fwd", 1.0)) == "no fused backend"


def test_model_suite_refuses_grid_options():
    with pytest.raises(SystemExit, match="fixed shapes"):
        zb.make_config("model", lengths=[64])
    with pytest.raises(SystemExit, match="unknown shape tag"):
        zb.make_config("model", shapes=["encoder,nope"])
    cfg = zb.make_config("model", shapes=["decode"])
    assert {w.tag for w in cfg.workloads()} == {"decode"}
    assert {w.lk for w in cfg.workloads()} == {16, 64, 128}


def test_causal_cross_shapes_agree_with_the_reference():
    """Lq != Lk causal (bottom-right aligned, queries at the last positions, their rotary
    positions from Lk - Lq): every PyTorch provider computes what zeromask.reference does."""
    w = zb.Workload("attention", "fwd", "cpu", torch.float32, 2, 2, 5, 16, causal=True,
                    length_k=12)
    x = zb.make_inputs(w)
    assert x.theta_q.shape == (2, 5) and torch.equal(x.theta_q, x.theta[:, 7:])
    cache: dict = {}
    for p in zb.providers("attention"):
        if p.name in ("sdpa", "sdpa+bias+rope", "naive", "zeromask[reference]",
                      "zeromask[cpp]") and not (p.name == "zeromask[cpp]"
                                                and cpp_backend.available() is not None):
            _, out, _ = zb.prepare(p, w, x, 2**30)
            err, tol = zb.check_output(p, w, x, out, cache)
            assert err <= tol, (p.name, err, tol)


def test_ab_builds_compares_two_builds_in_one_process():
    """benchmarks/ab_builds.py loads another build's extension beside this one's: this
    checkout's own .so as the base must run, print a row per mode and a ratio near 1."""
    ext = pytest.importorskip("zeromask._C_cpu")
    res = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), "--base", ext.__file__,
                          "--rounds", "3", "--shapes", "overhead"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| overhead |")]
    assert [r.split("|")[3].strip() for r in rows] == ["fwd", "fwd+bwd"], res.stdout
    for r in rows:
        ratio = float(r.split("|")[6])
        assert 0.2 < ratio < 5.0, r
    bad = subprocess.run([sys.executable, str(BENCH / "ab_builds.py"), "--base", "/nonexistent.so"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--base: no such file" in bad.stderr
