"""pytest-benchmark suite: the f0 rotary op alone.

    pytest benchmarks/test_bench_rotary.py -rs --benchmark-group-by=group

Providers (``bench_rotary.py``): ``zeromask[<backend>]`` for every backend, ``rope-table``
(standard RoPE from a cos/sin table built outside the timing: the speed of light) and
``naive`` (``zeromask.reference.f0_rotary``). ``extra_info`` holds the nominal bytes/s.
"""
import pytest
from harness import cases, run_benchmark


@pytest.mark.parametrize("w,provider", cases("rotary"))
def test_rotary(benchmark, w, provider):
    run_benchmark(benchmark, w, provider)
