"""`python -m fastctx.info`: what is built and which backends can run here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import torch

from . import _backend


def _cuda_tool(name: str) -> str | None:
    """A CUDA binary utility: on PATH, in CUDA_HOME, or the copy triton ships."""
    candidates = [shutil.which(name)]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def cuda_binary() -> str | None:
    """The file holding fastctx's CUDA kernels, or None."""
    return _backend._C_CUDA.__file__ if _backend._C_CUDA is not None and _backend.HAS_CUDA_KERNELS else None


def _cuda_archs() -> list[str]:
    """Architectures compiled into the CUDA kernels (read from the binary's fatbin)."""
    binary = cuda_binary()
    if binary is None:
        return []
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return ["unknown (cuobjdump not found)"]
    out = subprocess.run([tool, "--list-elf", binary], capture_output=True, text=True)
    return sorted(set(re.findall(r"sm_\d+", out.stdout)))


def report() -> str:
    lines = [
        f"fastctx        {__import__('fastctx').__version__}",
        f"torch          {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        f"CUDA device    {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"cpu kernels    {_backend._C.__file__ if _backend.HAS_CPU_KERNELS else 'no: ' + str(_backend._C_ERROR)}",
        f"cuda kernels   {'yes, archs ' + ', '.join(_cuda_archs()) if _backend.HAS_CUDA_KERNELS else 'no: ' + str(_backend._C_CUDA_ERROR)}",
        f"triton         {_backend.TRITON_VERSION or 'not installed'}"
        f" (interpreter {'on' if _backend.TRITON_INTERPRET else 'off'})",
        f"override       {_backend.current_override() or 'none (automatic)'}",
        "backends that run here:",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            runs = _backend.available_backends(dev, dtype)
            chosen = _backend.select_backend(torch.device(dev), dtype) if _backend.current_override() is None else None
            auto = f"  (automatic: {chosen})" if chosen else ""
            lines.append(f"  {dev:4s} {str(dtype).replace('torch.', ''):8s} {', '.join(runs)}{auto}")
    lines.append("what each op's fused backends accept (automatic choice: the first that accepts a call, "
                 "else the next, else reference):")
    from .ops import OPS

    for dev in ("cpu", "cuda"):
        device = torch.device(dev)
        for name, op in OPS.items():
            for backend, dtypes, limits in op.table(device):
                lines.append(f"  {dev:4s} {name:14s} {backend:9s} {dtypes:33s} {limits}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
