"""Build fastctx and its C++/CUDA extension fastctx._C.

CPU kernels are always built. CUDA kernels are built whenever torch is a CUDA
build and nvcc is found -- no GPU is needed. FASTCTX_NO_EXT=1 skips the
extension (the package then runs on its reference and Triton backends);
FASTCTX_NO_CUDA=1 builds the CPU kernels only.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    if _flag("FASTCTX_NO_EXT"):
        return [], {}
    import torch

    sources = ["csrc/fastctx.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = None
    if torch.version.cuda and cuda_sources and not _flag("FASTCTX_NO_CUDA"):
        cuda_home = _find_cuda_home()
        if cuda_home:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
            os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fdiagnostics-color=always"]
    if cuda_home is None:
        ext = CppExtension(
            "fastctx._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]}, extra_link_args=["-fopenmp"],
        )
        return [ext], {"build_ext": BuildExtension}

    # Headers of CUDA libraries that torch's headers include (cusparse.h,
    # cublas_v2.h, ...) come with the nvidia-* wheels torch depends on.
    try:
        import nvidia

        include_dirs += [
            d for p in nvidia.__path__ for d in [os.path.join(p, "cu13", "include")] if os.path.isdir(d)
        ]
    except ImportError:
        pass
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build the architectures fastctx is tuned for.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "fastctx._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags + ["-fopenmp"],
            # -Xptxas=-v: register / spill / shared-memory figures in the build log.
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"],
        },
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
