"""GLA context, the ACMs and APCHead: fastctx vs eager PyTorch and torch.compile.

A thin wrapper of the benchmark suite (`fastctx bench`, fastctx/benchmark/):

    python bench/bench_acm.py                       # cpu shape set on CPU, realistic on CUDA
    python bench/bench_acm.py --shapes realistic --memory

is `fastctx bench --ops gla_context,acm,apc_head ...`; any other `fastctx bench` option
may follow (a later --ops replaces this one).
"""
import sys

from fastctx.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "gla_context,acm,apc_head", *sys.argv[1:]]))
