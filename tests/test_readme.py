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
