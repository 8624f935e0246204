"""What every Triton launcher in fastctx.kernels shares: run mode, configs, autotuning, limits, compile specs.

A kernel module (`kernels/<op>.py`) holds its `@triton.jit` kernels, wraps each
in a `Kernel` with its autotune configs, and defines the launchers `<op>_fwd`
/ `<op>_bwd` (allocate outputs, pick grids, call the `Kernel`), `limits`
(the calls its launchers accept) and `compile_cases` (calls at realistic
shapes, for the compile tests).

Run modes, fixed when the kernels are imported:

* GPU: each `Kernel` is autotuned over its configs (the first entry is the
  default; FASTCTX_TRITON_AUTOTUNE=0 pins it, for bitwise run-to-run
  reproducibility across processes and no tuning runs).
* Interpreter (TRITON_INTERPRET=1, CPU tensors): one small config, chosen so
  the tests' shapes cover several tiles; the interpreter would run every
  autotune config.
* Capture (`capture_specs()`): nothing runs. The launchers are called with
  meta tensors as if on a GPU and every launch is recorded as compile specs
  (one per config), with the signature, constexprs and divisibility hints the
  JIT would derive from the very arguments. No hand-kept argument tables.

Dot precision. 16-bit data use their native MMA with fp32 accumulation. Plain
tf32 would cost fp32 data ~1e-3 relative error, so fp32 uses "tf32x3" (~fp32
accuracy on tensor cores; `FASTCTX_TRITON_FP32_DOT=tf32` trades it for
speed). fp64 (interpreter only) uses "ieee". FMA-based "ieee" fp32 dots would
spill at these tile sizes and run on CUDA cores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction

# Every op with Triton kernels: kernels/<name>.py.
OPS = ("pyramid_pool", "gla_context", "residual_relu", "encoding", "class_gather", "class_attention",
       "window_attention", "window_pool", "upsample_add")


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, 0)


# The jit decorator chose interpreter or compiler when this module was imported.
INTERPRET = isinstance(_probe, InterpretedFunction)
AUTOTUNE = os.environ.get("FASTCTX_TRITON_AUTOTUNE", "1") != "0"
FP32_DOT_PRECISION = os.environ.get("FASTCTX_TRITON_FP32_DOT", "tf32x3")

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Grid limits of a CUDA launch: axis 0, axes 1 and 2.
MAX_GRID_X, MAX_GRID_YZ = 2**31 - 1, 65535
# SMs assumed when specs are captured without a GPU (an H100 SXM).
CAPTURE_SMS = 132


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial sums for data of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee"
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"  # ignored for 16-bit


def dtype_class(dtype: torch.dtype) -> str:
    """Config family of a data dtype: "32" (fp32, fp64 in the interpreter) or "16" (fp16, bf16)."""
    return "32" if dtype in (torch.float32, torch.float64) else "16"


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------- capture state

@dataclasses.dataclass
class _Capture:
    specs: list[dict]
    all_configs: bool = True


_capture: _Capture | None = None


def capturing() -> bool:
    return _capture is not None


def on_gpu_path() -> bool:
    """Launchers size their work as on a GPU (a real one, or capture), not for the interpreter."""
    return capturing() or not INTERPRET


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the machine (a few waves)."""
    if capturing():
        return 4 * CAPTURE_SMS
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 4  # interpreter: small, but enough to exercise the split/partial paths


def split(n: int, parts: int, align: int) -> tuple[int, int]:
    """Cut range(n) into at most `parts` chunks whose length is a multiple of `align`: (chunks, length)."""
    parts = max(1, min(parts, triton.cdiv(n, align)))
    per = triton.cdiv(triton.cdiv(n, parts), align) * align
    return triton.cdiv(n, per), per


def grid_reason(grid: Sequence[int], axes: Sequence[str]) -> str | None:
    """None if a launch grid fits CUDA's limits, else which axis (named by `axes`) overflows."""
    for i, (size, what) in enumerate(zip(grid, axes)):
        limit = MAX_GRID_X if i == 0 else MAX_GRID_YZ
        if size > limit:
            return f"{what} = {size} exceeds the Triton kernel's grid limit {limit}; split the call"
    return None


# ----------------------------------------------------------------------------- kernels and configs

@dataclasses.dataclass(frozen=True)
class Config:
    blocks: Mapping[str, int]
    num_warps: int
    num_stages: int


def configs(*rows: tuple[dict, int, int]) -> list[Config]:
    """Configs from (block sizes, num_warps, num_stages) rows; the first is the default."""
    return [Config(dict(blocks), warps, stages) for blocks, warps, stages in rows]


class Kernel:
    """A @triton.jit kernel with its autotune configs, launched the same way in every run mode.

    configs: config family -> configs, the default first. The family is the
    data dtype class ("32" or "16"), plus the values of the constexprs named in
    `family_keys` (e.g. K_PAD), as a tuple: ("32",) or ("32", 64).
    interpret: the block sizes under the interpreter. tune_key: the scalar
    arguments autotuning results are cached by.
    """

    def __init__(self, fn, configs: Mapping[tuple, list[Config]], interpret: Mapping[str, int],
                 tune_key: Sequence[str], family_keys: Sequence[str] = ()):
        self.fn, self.name = fn, fn.__name__.removesuffix("_kernel")
        self._configs, self._interpret = dict(configs), dict(interpret)
        self._tune_key, self._family_keys = list(tune_key), tuple(family_keys)
        self._tuners: dict[tuple, object] = {}

    def _family(self, dtype: torch.dtype, constexprs: Mapping) -> tuple:
        return (dtype_class(dtype), *(constexprs[k] for k in self._family_keys))

    def configs(self, dtype: torch.dtype, **family) -> list[Config]:
        return self._configs[self._family(dtype, family)]

    def block_max(self, dtype: torch.dtype, key: str, **family) -> int:
        """Largest value of block size `key` over the configs that may run."""
        if not on_gpu_path():
            return self._interpret[key]
        return max(c.blocks[key] for c in self.configs(dtype, **family))

    def block_default(self, dtype: torch.dtype, key: str, **family) -> int:
        if not on_gpu_path():
            return self._interpret[key]
        return self.configs(dtype, **family)[0].blocks[key]

    def tuned_families(self) -> list[tuple]:
        """Config families this kernel has been autotuned for in this process."""
        return [family for family in self._configs if family in self._tuners]

    def autotuned(self, family: tuple):
        """The triton.autotune wrapper of one config family (its .cache holds the choices made)."""
        if family not in self._tuners:
            self._tuners[family] = self._make_autotuned(family)
        return self._tuners[family]

    def _make_autotuned(self, family: tuple):
        tuned = [triton.Config(dict(c.blocks), num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in self._configs[family]]
        # Launchers size grids and partial slots for every config and every launch
        # overwrites all outputs, so benchmarking needs no state restore.
        return triton.autotune(configs=tuned, key=self._tune_key)(self.fn)

    def __call__(self, dtype: torch.dtype, grid: Callable[[Mapping], tuple], *args, **constexprs) -> None:
        """Launch for data of `dtype`; `grid` maps the chosen block sizes (a dict) to the grid."""
        family = self._family(dtype, constexprs)
        if _capture is not None:
            configs = self._configs[family]
            for config in configs if _capture.all_configs else configs[:1]:
                _capture.specs.append(self._spec(dtype, config, args, constexprs))
        elif INTERPRET:
            meta = {**self._interpret, **constexprs}
            self.fn[grid(meta)](*args, **meta)
        elif AUTOTUNE:
            self.autotuned(family)[grid](*args, **constexprs)
        else:
            config = self._configs[family][0]
            meta = {**config.blocks, **constexprs}
            self.fn[grid(meta)](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

    def _spec(self, dtype: torch.dtype, config: Config, args: tuple, constexprs: Mapping) -> dict:
        """What the JIT would compile for these arguments: signature, constexprs, divisibility hints."""
        names = self.fn.arg_names
        signature, const, attrs = {}, {**config.blocks, **constexprs}, {}
        for i, (name, value) in enumerate(zip(names, args)):
            kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            if kind == "constexpr":  # the JIT folds integer arguments equal to 1
                const[name] = spec
                continue
            signature[name] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in const})
        tag = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in const.items()
                       if k != "DOT_PRECISION")
        return dict(name=f"{self.name}[{TORCH_TO_TRITON.get(dtype, dtype)},{tag},w{config.num_warps},"
                         f"s{config.num_stages}]",
                    fn=self.fn, signature=signature, constexprs=const, attrs=attrs,
                    num_warps=config.num_warps, num_stages=config.num_stages)


@contextlib.contextmanager
def capture_specs(all_configs: bool = True) -> Iterator[list[dict]]:
    """Record launches as compile specs instead of running them (call the launchers with meta tensors)."""
    global _capture
    previous, _capture = _capture, _Capture([], all_configs)
    try:
        yield _capture.specs
    finally:
        _capture = previous


def compile_specs(ops: Sequence[str] = OPS) -> list[dict]:
    """Every (kernel, config, dtype, shape-dependent constexprs) the launchers run on a GPU.

    Each op's `compile_cases()` yields (all_configs, thunk): thunks call the
    launchers on meta tensors at realistic shapes; the realistic cases record
    every config, the extra ones (small tiles, fallback paths) the default
    only. Duplicates are dropped. Feed a spec to
    ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
    options=dict(num_warps=..., num_stages=...))``.
    """
    specs, seen = [], set()
    for op in ops:
        module = importlib.import_module(f"fastctx.kernels.{op}")
        for all_configs, thunk in module.compile_cases():
            with capture_specs(all_configs) as captured:
                thunk()
            for spec in captured:
                key = (spec["name"], tuple(sorted(spec["signature"].items())), repr(sorted(spec["attrs"].items())))
                if key not in seen:
                    seen.add(key)
                    specs.append(spec)
    return specs


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A meta tensor: shape and dtype without storage, for compile cases."""
    return torch.empty(shape, dtype=dtype, device="meta")


GPU_DTYPES = tuple(TORCH_TO_TRITON)
