"""Benchmarks of the heads: the four ACMs of APCHead, APCHead, EncModule, EncHead."""
BENCH_OPS = ("acm", "apc_head", "enc_module", "enc_head")


def test_head(bench_case, run_case):
    run_case(bench_case)
