"""Run the benchmark report from a source checkout: the same as the ``zeromask-bench``
console command (``zeromask.cli.bench``), for a tree where the entry point is not installed.

    python benchmarks/report.py --suite cpu            # see --help for every option
"""
import sys

from zeromask.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
