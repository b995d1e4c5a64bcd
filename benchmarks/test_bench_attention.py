"""pytest-benchmark suite: zero-soft attention + f0 rotary against SDPA and alternatives.

    pytest benchmarks/test_bench_attention.py -rs --benchmark-group-by=group \
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name

Providers (``bench_attention.py``, the rows of ``bench.py``'s tables): ``zeromask[<backend>]``
for every backend dispatch knows, ``sdpa``, ``sdpa+bias+rope``, ``flex+rope``, ``naive``.
Each group is one shape and mode, so pytest-benchmark's relative column is the ratio between
them. ``extra_info`` holds the nominal FLOP/s (4*B*H*Lq*Lk*D forward; fwd+bwd = 3.5x
forward). ``ZEROMASK_BENCH_SUITE=model`` times the speech model's shapes.
"""
import pytest
from harness import cases, run_benchmark


@pytest.mark.parametrize("w,provider", cases("attention"))
def test_attention(benchmark, w, provider):
    run_benchmark(benchmark, w, provider)
