"""Installs proto_ce (the fused subsampled-prototype loss) and compiles its kernels from csrc/.

    pip install --no-build-isolation .        # needs torch already installed (it compiles against it)
    python setup.py build_ext --inplace       # or: build _proto_ce_ext*.so next to proto_ce.py

The C++ (CPU) kernels are always built. The CUDA kernels (csrc/*.cu) are built too when a CUDA toolkit
is found (CUDA_HOME or nvcc on PATH) and either a GPU is visible or FORCE_CUDA=1 (CI machines without a
GPU use FORCE_CUDA=1 so that a CUDA compile error cannot land). Without a visible GPU and without
TORCH_CUDA_ARCH_LIST, the CUDA code is compiled for "8.0;9.0" (A100, H100) only, to keep CI builds short.

Only the module proto_ce and the extension _proto_ce_ext are installed: the experiment scripts and
data.py / metrics.py run from the checkout, and no generic top-level name lands in site-packages.
Without installing anything, proto_ce.py compiles csrc/ on first use (see its docstring).
"""
import glob
import hashlib
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    raise SystemExit("setup.py: error: torch is needed to build the extension: install it first "
                     "(pip install -r requirements.txt), then `pip install --no-build-isolation .` "
                     "(pip's isolated build environment has no torch)")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def sources_hash():
    """Hash of csrc/ (sources and headers); identical to proto_ce._sources_hash (keep the two in sync).

    Compiled into the library so that proto_ce.py can tell a prebuilt extension from stale sources."""
    digest = hashlib.sha256()
    paths = [f for p in ("*.cpp", "*.cu", "*.h", "*.cuh") for f in glob.glob(os.path.join(HERE, "csrc", p))]
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def requirements():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def extension():
    cpp_sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    cuda_sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu")))
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if force_cuda and CUDA_HOME is None:
        raise SystemExit("setup.py: error: FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME)")
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None and (torch.cuda.is_available() or force_cuda)
    # The hash goes in unquoted (the build commands pass through a shell); ops.cpp turns it into a string.
    macros = [("PROTO_CE_SOURCES_HASH", sources_hash())]
    cxx_flags = ["-O3", "-g0"]  # -g0: no debug info (Python's CFLAGS add -g), a faster build and a smaller library
    if not with_cuda:
        return CppExtension("_proto_ce_ext", cpp_sources, define_macros=macros, extra_compile_args=cxx_flags)
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return CUDAExtension("_proto_ce_ext", cpp_sources + cuda_sources, define_macros=macros + [("PROTO_CE_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})


setup(
    name="clip-beyond-tail",
    version="0.1.0",
    description="Reproduction toolkit for 'Generalization Beyond Data Imbalance' (Wen et al., NeurIPS 2024): "
                "fused subsampled-prototype cross-entropy op",
    python_requires=">=3.9",
    install_requires=requirements(),
    py_modules=["proto_ce"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
