"""Builds deepseek_ops._C: every csrc/*.cu for sm_90a plus the host code in csrc/*.cpp (the schemas in
registration.cpp, the CUDA adapters in torch_<family>.cpp, the GEMM tile configuration).

Without a CUDA toolkit (or with a CPU-only torch) only registration.cpp is compiled:
the op schemas exist and the reference kernels run on the CPU; CUDA calls then
raise an error that says the extension was built without CUDA.
"""
import glob
import os

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the `nvcc` on PATH, which a /usr/local/bin/nvcc link sends to
# /usr/local (no headers there); the toolkit's standard home is the better guess.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _arch_flags():
    # TORCH_CUDA_ARCH_LIST is respected only where it names Hopper: every kernel
    # here uses sm_90a instructions (wgmma, setmaxnreg) that no other target has.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    if "9.0" not in archs:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={archs!r}: deepseek_ops kernels need 9.0a (Hopper)")
    return ["-gencode=arch=compute_90a,code=sm_90a"]


def _extension():
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if os.environ.get("DEEPSEEK_OPS_NO_CUDA") == "1":
        with_cuda = False
    cxx = ["-O3", "-std=c++20"]
    # Some toolchains (the CUDA image's /opt/gcc among them) link libstdc++ statically into the
    # extension. Python's -Bsymbolic-functions then binds its functions locally while its data
    # (the locale facet ids) still resolves to the process's shared libstdc++: formatting a number
    # through our own ostream (c10::str in every TORCH_CHECK message) read a foreign facet table and
    # crashed. Hiding the static archives' symbols keeps that copy self-consistent; with a shared
    # libstdc++ there is nothing static to hide.
    link = ["-Wl,--exclude-libs,ALL"]
    if not with_cuda:
        print("deepseek_ops: no CUDA toolkit found (or a CPU-only torch): building the "
              "reference-only extension; CUDA ops will raise until rebuilt with CUDA.")
        return CppExtension("deepseek_ops._C", ["csrc/registration.cpp"],
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-Xptxas=-v" if os.environ.get("DEEPSEEK_OPS_PTXAS_VERBOSE") == "1" else "-Xptxas=-O3",
            *_arch_flags()]
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    return CUDAExtension("deepseek_ops._C", sources,
                         include_dirs=[os.path.join(ROOT, "ptx"), os.path.join(ROOT, "csrc")],
                         define_macros=[("DSO_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    name="deepseek_ops",
    version="0.1.0",
    description="Hopper PTX/CUDA kernels for DeepSeek-V3 building blocks, as PyTorch ops",
    packages=find_packages(include=["deepseek_ops", "deepseek_ops.*", "model", "benchmarks"]),
    python_requires=">=3.9",
    # torch: the README pins the version CI tests (2.14.1); the extension compiles against whichever
    # torch is installed, so this is the oldest the code could run with, not a tested range.
    install_requires=["torch>=2.4", "safetensors", "tqdm"],  # tqdm: the progress bars of model/
    extras_require={
        # tests and benchmarks; transformers: the model's parity tests (DeepseekV3ForCausalLM, its eager
        # experts in float64), pinned to the version those tests pass with.
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "transformers==5.25.0", "matplotlib"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
