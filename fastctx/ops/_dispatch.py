"""How a public op picks its backend: per-op capability declarations, resolution, autocast, in-op reference.

Capabilities. Each op declares, per fused backend, what it accepts: data dtypes
per device type and shape limits (`Support`). A backend runs a call when it is
built here (`fastctx._backend.build_reason`) and its declaration accepts the
call's device, dtype and shape facts (a dict of sizes the op computes from its
arguments, e.g. {"B": 2, "K": 32}).

* Automatic choice: the first fused backend, in `_backend.automatic_order`,
  that accepts the call; when none does, the eager reference. A built backend
  that declines (a dtype or a shape limit) is reported once per reason with a
  `BackendFallbackWarning`.
* A forced backend (`use_backend` / FASTCTX_BACKEND) that cannot run the call
  raises `BackendUnavailableError` with the reason.

Resolution happens twice, on purpose:

* The Python wrapper (traced by torch.compile / torch.export) decides whether a
  custom op runs at all. It passes the op the forced backend, or "auto"; when
  no fused backend can run the call it runs the eager reference maths itself
  (plain PyTorch, which traces and exports anywhere).
* The op resolves "auto" again from its tensors when it runs. A compiled graph
  or an exported program therefore carries "auto", not the backend of the
  machine it was traced on: loaded elsewhere it picks that machine's backend.

Autocast. The fused ops have no autocast kernel, so autocast passes them by;
the wrappers apply the policy themselves (`amp_dtype`, `compute_dtype`): in a
CPU autocast region the fused CPU kernels run in float32 (they have no 16-bit
path; inputs are upcast, sums are fp32), in a CUDA region the CUDA/Triton
kernels run in the autocast dtype (they accumulate in fp32). Tensors of mixed
float dtypes are accepted inside autocast, as eager PyTorch accepts them there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from .. import _backend

AUTO = "auto"
_OP_BACKENDS = _backend.BACKENDS + (AUTO,)
# Device types that have an autocast state torch can be asked about.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

Facts = Mapping[str, int]
# Remembered resolutions per op (FusedOp._resolution): far more than the distinct shapes of a model.
_RESOLVED_MAX = 4096
Limits = Callable[[Facts], "str | None"]


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend of one op accepts, beyond being built.

    dtypes: device type -> data dtypes it computes in (None: the backend's
    defaults, `_backend.default_dtypes`). limits: shape facts -> None, or the
    reason the call is out of range (e.g. "K = 128 codewords > 64"); for the
    cuda backend the facts also hold "sm", the device's compute capability
    (80 for sm_80), as shared memory per block depends on it.
    """

    dtypes: Mapping[str, tuple[torch.dtype, ...]] | None = None
    limits: Limits | None = None
    note: str = ""  # one line for `python -m fastctx.info`, e.g. "K <= 64"


class FusedOp:
    """The backends of one public op and the rules for choosing among them."""

    def __init__(self, name: str, *, cpu: Support, cuda: Support, triton: Support, home: str | None = None):
        self.name = name
        # The op family whose files hold this op's kernels (kernels/<home>.py, csrc/*/<home>.*): an op that
        # is another op plus an epilogue (upsample_add_layer_norm) lives with it and shares its code.
        self.home = home or name
        self.support = {"cpu": cpu, "cuda": cuda, "triton": triton}
        self._warned: set[tuple[str, str]] = set()
        self._built: dict[tuple[str, str], str | None] = {}
        # (requested backend, device, dtype, facts) -> the backend that runs the call (see `_resolution`).
        self._resolved: dict[tuple, str] = {}
        for backend in _backend.BACKENDS:
            for device_type in ("cpu", "cuda"):
                self.built(backend, torch.device(device_type))

    # -------------------------------------------------------------- capability

    def dtypes(self, backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
        if backend == "reference":
            return _backend.FLOATS
        declared = self.support[backend].dtypes
        if declared is not None and device.type in declared:
            return declared[device.type]
        return _backend.default_dtypes(backend, device)

    def built(self, backend: str, device: torch.device) -> str | None:
        """None if `backend` is built here with kernels for this op and runs `device`'s tensors, else why not.

        Static for a process: computed once per device type (so torch.compile traces a dict lookup).
        """
        key = (backend, device.type)
        if key not in self._built:
            self._built[key] = self._build_reason(backend, device)
        return self._built[key]

    def _build_reason(self, backend: str, device: torch.device) -> str | None:
        reason = _backend.build_reason(backend, device)
        if reason is not None or backend == "reference":
            return reason
        if backend in ("cpu", "cuda"):
            if not _has_kernel(f"fastctx::{self.name}_fwd", "CPU" if backend == "cpu" else "CUDA"):
                return f"this build has no {backend} kernels for {self.name}"
        elif importlib.util.find_spec(f"fastctx.kernels.{self.home}") is None:
            return f"this build has no Triton kernels for {self.name}"
        return None

    def reason(self, backend: str, device: torch.device, dtype: torch.dtype, facts: Facts) -> str | None:
        """None if `backend` runs this call, else why not."""
        reason = self.built(backend, device)
        if reason is not None or backend == "reference":
            return reason
        dtypes = self.dtypes(backend, device)
        if dtype not in dtypes:
            return (f"{self.name} on backend {backend!r} supports {_backend.dtype_names(dtypes)} on {device.type}, "
                    f"got {_backend.dtype_names([dtype])}")
        limits = self.support[backend].limits
        if limits is None:
            return None
        if backend == "cuda":
            facts = {**facts, "sm": cuda_capability(device)}
        return limits(facts)

    def choose(self, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        """Automatic choice: the first fused backend that runs the call, else "reference"."""
        for backend in _backend.automatic_order(device):
            reason = self.reason(backend, device, dtype, facts)
            if reason is None:
                return backend
            if self.built(backend, device) is None:
                self._warn_once(backend, reason)
        return "reference"

    def _warn_once(self, backend: str, reason: str) -> None:
        # Not while torch.compile traces: dynamo cannot trace warnings or the set; the op's own
        # run-time resolution warns instead.
        if torch.compiler.is_compiling() or (backend, reason) in self._warned:
            return
        self._warned.add((backend, reason))
        warnings.warn(f"fastctx.ops.{self.name}: skipping backend {backend!r}: {reason}",
                      _backend.BackendFallbackWarning, stacklevel=4)

    def _forced(self, backend: str, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        reason = self.reason(backend, device, dtype, facts)
        if reason is not None:
            raise _backend.BackendUnavailableError(f"fastctx backend {backend!r} cannot run {self.name}: {reason}")
        return backend

    # -------------------------------------------------------------- resolution

    def _resolution(self, requested: str | None, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        """The backend that runs a call: `requested` (forced; raises if it cannot), or the automatic choice (None).

        Every call resolves (in its wrapper and again inside its op), and the answer depends on these
        arguments only (what is built is fixed for the process), so it is remembered: a call then costs
        one dict lookup instead of a walk over the backends' capabilities. Refusals raise every time; while
        torch.compile traces, nothing is read or written here (no guards on the memo, no side effects).
        """
        key = (requested, device, dtype, tuple(facts.items()))
        try:
            backend = None if torch.compiler.is_compiling() else self._resolved.get(key)
        except TypeError:  # symbolic sizes (make_fx tracing) do not hash: decide afresh
            return self._decide(requested, device, dtype, facts)
        if backend is None:
            backend = self._decide(requested, device, dtype, facts)
            if not torch.compiler.is_compiling():
                if len(self._resolved) >= _RESOLVED_MAX:  # a shape-varying workload: start over
                    self._resolved.clear()
                self._resolved[key] = backend
        return backend

    def _decide(self, requested: str | None, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        return self.choose(device, dtype, facts) if requested is None else self._forced(requested, device, dtype, facts)

    def wrapper_backend(self, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        """The `backend` argument a public wrapper passes to its custom op, or "reference".

        "reference": no fused backend runs the call (and none was forced), so
        the wrapper runs the eager maths itself. A forced backend is checked
        here so that one that cannot run raises at the call site.
        """
        return self.wrapper_choice(device, dtype, facts)[0]

    def wrapper_choice(self, device: torch.device, dtype: torch.dtype, facts: Facts) -> tuple[str, str]:
        """(`wrapper_backend`'s answer, the backend the call runs on now)."""
        forced = _backend.current_override()
        backend = self._resolution(forced, device, dtype, facts)
        if forced is not None or backend == "reference":
            return backend, backend
        return AUTO, backend

    def resolve(self, backend: str, device: torch.device, dtype: torch.dtype, facts: Facts) -> str:
        """Inside a custom op: the concrete backend for its `backend` argument."""
        if backend == AUTO:
            # "auto" is decided when the op runs: a traced or exported program follows the use_backend()
            # block it runs in, not the one it was traced in.
            return self._resolution(_backend.current_override(), device, dtype, facts)
        if backend not in _OP_BACKENDS:
            raise ValueError(f"unknown fastctx backend {backend!r}: expected one of {_OP_BACKENDS}")
        return self._resolution(backend, device, dtype, facts)

    def kernels(self, backend: str):
        """The object holding `<op>_fwd` / `<op>_bwd` for a fused backend."""
        if backend in ("cpu", "cuda"):
            return torch.ops.fastctx  # C++ kernels, dispatched on the tensors' device
        if backend == "triton":
            return importlib.import_module(f"fastctx.kernels.{self.home}")
        raise ValueError(f"no fused kernels for backend {backend!r}")

    def table(self, device: torch.device) -> list[tuple[str, str, str]]:
        """(backend, dtypes, limits) rows for `python -m fastctx.info`: every backend that runs tensors of
        `device`'s type, built here or not (the limits then say why not)."""
        rows = [("reference", _backend.dtype_names(_backend.FLOATS), "any shape")]
        for backend, support in self.support.items():
            if backend in _backend.automatic_order(device) or (backend, device.type) == ("triton", "cpu"):
                reason = self.built(backend, device)
                limits = support.note or "any shape"
                rows.append((backend, _backend.dtype_names(self.dtypes(backend, device)),
                             limits if reason is None else f"not here: {reason}"))
        return rows


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def cuda_capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as 10 * major + minor (80 for sm_80): the CUDA kernels' limits
    (shared memory per block) depend on it."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _has_kernel(schema: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(schema, dispatch_key)
    except RuntimeError:  # no such schema in this build
        return False


OPS: dict[str, FusedOp] = {}


def register(op: FusedOp) -> FusedOp:
    OPS[op.name] = op
    return op


# ----------------------------------------------------------------------------- custom ops

# Tensor types a call may pass to an op's implementation directly (nn.Parameter is a plain tensor to the
# dispatcher); subclasses (FakeTensor, FunctionalTensor, DTensor, ...) go through the dispatcher.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_DIRECT_DEVICES = ("cpu", "cuda")
# Argument types that are never tensors: checked by identity, as isinstance against torch.Tensor costs a
# metaclass call per argument.
_NON_TENSORS = frozenset((int, float, bool, str, list, tuple, type(None)))


_direct_calls = True  # False inside `dispatcher_calls()`


@contextlib.contextmanager
def dispatcher_calls():
    """Every op call inside the block goes through the dispatcher (and window_attention's through its custom op):
    A/B measurements of the direct paths."""
    global _direct_calls
    previous, _direct_calls = _direct_calls, False
    try:
        yield
    finally:
        _direct_calls = previous


def direct_call(args) -> bool:
    """Whether an eager call may run an op's implementation without the dispatcher.

    Only plain tensors on CPU/CUDA, outside torch.compile, torch.jit tracing, the profiler, torch
    function and dispatch modes (export, FakeTensorMode, FlopCounterMode, ...) and functorch
    transforms: everywhere else the custom op runs, with its fake kernel and its registered autograd.
    """
    if torch.compiler.is_compiling() or not _direct_calls or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._autograd._profiler_enabled():  # profiles show the op's event, with its input shapes
        return False
    if (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()):
        return False
    for arg in args:
        kind = type(arg)
        if kind in _PLAIN_TENSORS:
            if arg.device.type not in _DIRECT_DEVICES:
                return False
        elif kind not in _NON_TENSORS and isinstance(arg, torch.Tensor):
            return False
    return True


CUSTOM_OPS: dict[str, "CustomOp"] = {}  # "fastctx::<name>" -> its CustomOp


class CustomOp:
    """A `torch.library.custom_op` whose plain eager calls skip the custom-op machinery.

    The op (schema, fake kernel, autograd formula) is what torch.compile, torch.export, opcheck and
    tensor subclasses see. A plain eager call (see `direct_call`) runs the same implementation
    directly, under a `torch.autograd.Function` with the same setup_context and backward when an
    input requires grad. Same kernels, same bits, same gradients, but without the Python layers
    `custom_op` adds to every call, which cost about 0.1 ms per forward + backward: as much as a
    small op's kernels (pytorch/pytorch#139500).
    """

    def __init__(self, qualname: str, impl: Callable):
        self.qualname = qualname
        self.impl = impl
        self.op = torch.library.custom_op(qualname, mutates_args=())(impl)
        self._function: type[torch.autograd.Function] | None = None
        CUSTOM_OPS[qualname] = self

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        # Named per op: the graph shows e.g. fastctx_window_attentionBackward.
        self._function = type(self.qualname.replace("::", "_"), (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not direct_call(args):
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and any(
                type(arg) in _PLAIN_TENSORS and arg.requires_grad for arg in args):
            return self._function.apply(*args)
        return self.impl(*args)


def custom_op(qualname: str) -> Callable[[Callable], CustomOp]:
    """Decorator: `torch.library.custom_op(qualname, mutates_args=())` with a direct eager path (CustomOp)."""
    return lambda impl: CustomOp(qualname, impl)


# ----------------------------------------------------------------------------- autocast

def amp_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when an autocast region is active for x's device, else None.

    Like autocast itself, float64 data is left alone (None).
    """
    if not torch._C._is_any_autocast_enabled():  # one call answers the common case (tens of us less, cold)
        return None
    if x.device.type not in _AUTOCAST_DEVICES or x.dtype == torch.float64:
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def compute_dtype(device: torch.device, autocast_dtype: torch.dtype) -> torch.dtype:
    """dtype the fused kernels run in inside autocast: float32 on CPU (no 16-bit CPU kernels), else autocast's."""
    return torch.float32 if device.type == "cpu" else autocast_dtype


# ----------------------------------------------------------------------------- reference inside an op

def _no_autocast(device: torch.device):
    # Inside an op the reference maths must run in the op's dtype, not autocast's.
    enabled = device.type in _AUTOCAST_DEVICES
    return torch.autocast(device.type if enabled else "cpu", enabled=False)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row statistics an op saves for its backward (a log-sum-exp, a mean, an rstd):
    float32, float64 for float64 data (a 16-bit statistic would cost ~1% relative error)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_forward(fn: Callable, tensors: Sequence[torch.Tensor], *args):
    """`fn(*tensors, *args)` in the tensors' dtype, outputs in contiguous layout (as the fake kernels say)."""
    with _no_autocast(tensors[0].device):
        out = fn(*(t.contiguous() for t in tensors), *args)
    if isinstance(out, tuple):
        return tuple(o.contiguous() for o in out)
    return out.contiguous()


def reference_backward(fn: Callable, tensors: Sequence[torch.Tensor], grad: torch.Tensor, *args) -> tuple:
    """Vector-Jacobian product of the reference maths: the backward when an op resolves to "reference".

    Custom-op implementations run below autograd, so torch.func.vjp (which
    carries its own autodiff level) differentiates the reference here.
    """
    with _no_autocast(tensors[0].device):
        _, pullback = torch.func.vjp(lambda *ts: fn(*ts, *args), *(t.contiguous() for t in tensors))
        grads = pullback(grad.contiguous())
    return tuple(g.contiguous() for g in grads)


def reference_second_order(fn: Callable, grad: torch.Tensor, tensors: Sequence[torch.Tensor],
                           grad_grads: Sequence[torch.Tensor | None], *args) -> tuple:
    """The backward of a backward op, from the reference maths `fn(*tensors, *args)`.

    d/d(grad, tensors) of <vjp_fn(tensors)(grad), grad_grads>, for double
    backward (gradient penalties, meta-learning): the fused backward kernels
    have no derivative of their own, the reference maths does.
    """
    def first_order(g, *ts):
        _, pullback = torch.func.vjp(lambda *t: fn(*t, *args), *ts)
        return pullback(g)

    outs, pullback = torch.func.vjp(first_order, grad, *tensors)
    cotangents = tuple(torch.zeros_like(o) if gg is None else gg for o, gg in zip(outs, grad_grads))
    return pullback(cotangents)


__all__ = ["AUTO", "CUSTOM_OPS", "CustomOp", "FusedOp", "OPS", "Support", "acc_dtype", "amp_dtype", "compute_dtype",
           "custom_op", "direct_call", "dispatcher_calls", "reference_backward", "reference_forward",
           "reference_second_order", "register"]
