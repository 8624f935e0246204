"""Import mmsegmentation's real heads for parity tests, or None when it is not installed.

mmseg 1.x imports `mmcv.ops` (compiled CUDA ops of full mmcv) at package
import; with mmcv-lite that module does not exist, and the heads under test do
not use it, so a placeholder module stands in for it.
"""
import sys
import types
import warnings


def _stub_mmcv_ops():
    if "mmcv.ops" in sys.modules:
        return
    stub = types.ModuleType("mmcv.ops")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})  # placeholder class, never instantiated by these heads

    stub.__getattr__ = __getattr__
    sys.modules["mmcv.ops"] = stub


def import_decode_heads():
    try:
        import mmcv  # noqa: F401
    except ImportError:
        return None
    _stub_mmcv_ops()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from mmseg.models import decode_heads
        except ImportError:
            return None
    return decode_heads
