"""Compile every fastctx Triton kernel spec for one GPU architecture (no GPU needed).

    python tests/_triton_compile_worker.py --arch 90 --out DIR [--filter SUBSTRING]

Runs without TRITON_INTERPRET (the jit decorator reads it at import, and the
test session runs with it set), writes one cubin per spec to DIR and prints
one JSON line per spec: name, arch, cubin path, dynamic shared memory (bytes),
num_warps, or the compile error.

`start` launches it from the test session (tests/conftest.py starts one per
arch as soon as the compile tests are collected, so that compiling runs
beside the other tests; tests/test_triton_compile.py collects the results).
"""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 90)


@dataclass
class Worker:
    """A running compile worker: its process, and its output directory, where it writes
    specs.jsonl (its stdout) and stderr.txt."""

    process: subprocess.Popen
    out: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start(arch: int, out: Path) -> Worker:
    """Starts compiling every spec for `arch` into `out`, at the lowest CPU priority: the worker is
    single-threaded and minutes long on a cold Triton cache, and it takes only the CPU time the
    tests running beside it leave idle."""
    # files, not pipes: nothing to drain while it runs; the child keeps its own handles
    with open(out / "specs.jsonl", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, __file__, "--arch", str(arch), "--out", str(out / "cubin")],
                                   stdout=stdout, stderr=stderr, env=dict(os.environ, TRITON_INTERPRET="0"),
                                   preexec_fn=lambda: os.nice(19))
    return Worker(process, out)


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # before triton's import: the jit decorator reads it
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastctx.kernels import _launch

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--filter", default="")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    target = GPUTarget("cuda", args.arch, 32)
    # every Triton kernel of the package, at every config its launchers can run (captured from the
    # launchers themselves at realistic shapes)
    for i, spec in enumerate(_launch.compile_specs()):
        if args.filter not in spec["name"]:
            continue
        record = dict(name=spec["name"], arch=args.arch, num_warps=spec["num_warps"])
        try:
            src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
            compiled = triton.compile(src, target=target,
                                      options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
            path = os.path.join(args.out, f"sm{args.arch}_{i:03d}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            record.update(cubin=path, dynamic_shared=int(compiled.metadata.shared))
        except Exception as exc:  # reported per spec; the test fails on it
            record.update(error=f"{type(exc).__name__}: {exc}"[:2000])
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
