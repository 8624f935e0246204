"""Micro-benchmarks of the fused ops: pyramid pooling, GLA context, residual epilogue, Encoding."""
BENCH_OPS = ("pyramid_pool", "gla_context", "residual_relu", "encoding")


def test_op(bench_case, run_case):
    run_case(bench_case)
