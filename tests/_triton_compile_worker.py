"""Compile every fastctx Triton kernel spec for one GPU architecture (no GPU needed).

    python tests/_triton_compile_worker.py --arch 90 --out DIR [--filter SUBSTRING]

Runs without TRITON_INTERPRET (the jit decorator reads it at import, and the
test session runs with it set), writes one cubin per spec to DIR and prints
one JSON line per spec: name, arch, cubin path, dynamic shared memory (bytes),
num_warps, or the compile error.
"""
import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastctx.kernels import _launch  # noqa: E402


def main() -> int:
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
