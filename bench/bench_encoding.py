"""The Encoding layer, EncModule and EncHead: fastctx vs mmseg's form, the two-GEMM eager
rewrite and torch.compile, with each provider's peak memory.

A thin wrapper of the benchmark suite (`fastctx bench`, fastctx/benchmark/):

    python bench/bench_encoding.py                  # cpu shape set on CPU, realistic on CUDA
    python bench/bench_encoding.py --shapes realistic

is `fastctx bench --ops encoding,enc_module,enc_head --memory ...`; any other
`fastctx bench` option may follow (a later --ops replaces this one).
"""
import sys

from fastctx.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "encoding,enc_module,enc_head", "--memory", *sys.argv[1:]]))
