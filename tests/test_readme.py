"""The README's Python examples run as written, and its prob/score numbers are reproducible."""
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_prob_vs_score_numbers_in_readme(capsys):
    runpy.run_path(str(ROOT / "examples" / "prob_vs_score.py"), run_name="__main__")
    printed = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    assert "51.4%" in printed and "**51.4%**" in readme
    for prob, score in (("3.18e-07", "1.60e-01"), ("3.17e-03", "1.60e-01")):
        assert prob in printed and score in printed


def test_cpu_benchmark_numbers_in_readme_match_the_results():
    """The README's section-6 CPU table quotes the committed benchmark run, not stale
    numbers: its commit, the fused and SDPA times and the share of the compute ceiling."""
    import json
    data = json.loads((ROOT / "benchmarks/results/cpu-amd-epyc-2t/cpu.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert f"commit {data['meta']['commit'][:7]}" in readme
    ceiling = data["meta"]["compute_ceiling"]
    peak = ceiling["flop_per_s"]
    assert f"{peak / 1e9:.0f} GFLOP/s on {ceiling['threads']} threads here" in " ".join(
        readme.split())

    def row(provider, mode):
        return next(r for r in data["rows"] if r["provider"] == provider and r["mode"] == mode
                    and r["op"] == "attention" and r["length"] == 2048 and r["head_dim"] == 64)

    for mode in ("fwd", "fwd+bwd"):
        cpp, sdpa = row("zeromask[cpp]", mode), row("sdpa", mode)

        def ms(r):
            t = r["median_s"] * 1e3
            return f"{t:.1f}" if t < 100 else f"{t:.0f}"
        share = f"{cpp['flop_per_s'] / peak:.0%}"
        ratio = f"**{cpp['median_s'] / sdpa['median_s']:.2f}x**"
        line = next(ln for ln in readme.splitlines() if ln.startswith(f"| {mode} | {ms(cpp)} |"))
        assert f"| {ms(sdpa)} | {ratio} |" in line and line.rstrip().endswith(f"| {share} |")


def test_model_shape_numbers_in_readme_match_the_results():
    """The README's model-shape table quotes the committed `model` suite run: its commit,
    and for every call the fused (cpp) and SDPA medians and their ratio, both modes."""
    import json
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import runner
    data = json.loads((ROOT / "benchmarks/results/cpu-amd-epyc-avx2-1t/model.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert f"commit {data['meta']['commit'][:7]}" in " ".join(readme.split())
    assert data["meta"]["threads"] == 1 and data["meta"]["cpu"]["family"] == 23
    rows = [runner.Row(**r) for r in data["rows"]]

    def ms(s):
        t = s * 1e3
        return f"{t:.3g}" if t < 100 else f"{t:.0f}"

    shapes = list(dict.fromkeys((r.tag, r.shape()) for r in rows if r.tag != "head-dim"))
    assert len(shapes) == 10
    for tag, shape in shapes:
        line = next(ln for ln in readme.splitlines() if ln.startswith(f"| {tag} | {shape} |"))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")][2:]
        want = []
        for mode in ("fwd", "fwd+bwd"):
            cpp, sdpa = (next(r for r in rows if r.provider == p and r.tag == tag
                              and r.shape() == shape and r.mode == mode)
                         for p in ("zeromask[cpp]", "sdpa"))
            want += [ms(cpp.median_s), ms(sdpa.median_s), f"{cpp.median_s / sdpa.median_s:.2f}x"]
        assert cells == want, (tag, shape)
