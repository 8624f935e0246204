"""Build fastctx and its two C++ extension modules.

fastctx._C       every kernel schema + the CPU kernels (csrc/fastctx.cpp, csrc/cpu/*.cpp); always built.
fastctx._C_cuda  the CUDA kernels (csrc/cuda/*.cu); built whenever torch is a CUDA build and nvcc is found
                 (no GPU needed). Optional: if it fails to compile, the build prints a warning and goes on,
                 so the CPU kernels never depend on the CUDA toolchain.

FASTCTX_NO_EXT=1 skips both (the package then runs on its reference and Triton backends);
FASTCTX_NO_CUDA=1 skips fastctx._C_cuda. TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it
and without a GPU to ask, fastctx._C_cuda is built for sm_75, sm_80 and sm_90.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_MODULE = "fastctx._C_cuda"
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit nvcc belongs to.

    Asking nvcc itself (`--dryrun` prints `_HERE_=<toolkit>/bin`) is right even
    when the `nvcc` on PATH is a wrapper script, where torch's own guess (the
    parent of the wrapper's folder) is not.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for candidate in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(candidate):
                nvcc = candidate
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return os.path.dirname(match.group(1)) if match else None


def _cuda_library_includes():
    """Headers of CUDA libraries that torch's headers include (cusparse.h, cublas_v2.h, ...): they come
    with the nvidia-* wheels torch depends on."""
    try:
        import nvidia
    except ImportError:
        return []
    return [d for p in nvidia.__path__ for d in [os.path.join(p, "cu13", "include")] if os.path.isdir(d)]


def _build_ext_class(BuildExtension):
    class BuildExt(BuildExtension):
        """torch's BuildExtension, with fastctx._C_cuda optional.

        setuptools' `optional` only forgives distutils compile errors; torch's
        ninja build raises RuntimeError. Any failure of the CUDA module is
        turned into a warning, and stale builds of it are removed.
        """

        def run(self):
            self.failed_optional = []
            super().run()
            # An in-place copy left from an earlier build would load CUDA
            # kernels older than the CPU ones: remove it.
            build_py = self.get_finalized_command("build_py")
            for ext in self.failed_optional:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                if self.inplace and os.path.exists(inplace_file):
                    os.remove(inplace_file)

        def build_extension(self, ext):
            if ext.name != CUDA_MODULE:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure
                self.failed_optional.append(ext)
                _, built = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
                if os.path.exists(built):
                    os.remove(built)
                print(
                    f"\nWARNING: building {CUDA_MODULE} failed ({type(exc).__name__}: {exc}).\n"
                    "fastctx is installed with its CPU kernels (fastctx._C); the cuda backend is\n"
                    "unavailable. The compiler output above says why; FASTCTX_NO_CUDA=1 skips this step.\n",
                    flush=True,
                )
                return None

    return BuildExt


def _extensions():
    if _flag("FASTCTX_NO_EXT"):
        return [], {}
    import torch

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = None
    if _flag("FASTCTX_NO_CUDA"):
        print("fastctx: FASTCTX_NO_CUDA=1, building the CPU kernels only")
    elif not torch.version.cuda:
        print("fastctx: torch is a CPU build, building the CPU kernels only")
    else:
        cuda_home = _find_cuda_home()
        if cuda_home:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
            os.environ["CUDA_HOME"] = cuda_home
        else:
            print("fastctx: nvcc not found, building the CPU kernels only")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fdiagnostics-color=always"]
    exts = [
        CppExtension(
            "fastctx._C", ["csrc/fastctx.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]}, extra_link_args=["-fopenmp"],
        )
    ]
    if cuda_home is not None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: the architectures CI checks (T4, A100, H100 classes).
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        ext = CUDAExtension(
            CUDA_MODULE,
            ["csrc/cuda/module.cpp"] + cuda_sources,
            include_dirs=include_dirs + _cuda_library_includes(),
            extra_compile_args={
                "cxx": cxx_flags,
                # -Xptxas=-v: register / spill / shared-memory figures in the build log.
                "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"],
            },
        )
        ext.optional = True
        exts.append(ext)
    return exts, {"build_ext": _build_ext_class(BuildExtension)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
