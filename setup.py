"""Builds torch_cnnbp._C, the C++ kernels, against the torch that is installed.

Install with `pip install --no-build-isolation -e .` so that the extension is compiled against the
same torch it will be loaded into. CNNBP_DEBUG=1 builds with -O0 -g; CNNBP_SANITIZE=1 adds ASan and UBSan.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
debug = os.environ.get("CNNBP_DEBUG", "0") == "1"

# -fopenmp: at::parallel_for is a header template that runs its body on the calling thread unless
# the including file is compiled with OpenMP (ATen/ParallelOpenMP.h). The extension then links the
# libgomp.so.1 that torch has already loaded, so one thread pool serves both.
cxx_flags = ["-std=c++17", "-O0" if debug else "-O3", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp"]
if debug:
    cxx_flags.append("-g")
# CNNBP_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh builds and tests it).
if os.environ.get("CNNBP_SANITIZE", "0") == "1":
    sanitize_flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    cxx_flags += sanitize_flags
    link_flags += sanitize_flags

setup(
    name="torch_cnnbp",
    version="0.1.0",
    description="Hand-written C++ conv2d and max_pool2d forward and backward for PyTorch",
    packages=find_packages(include=["torch_cnnbp", "torch_cnnbp.*"]),
    ext_modules=[
        CppExtension(
            "torch_cnnbp._C",
            sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"demo": ["scikit-learn"], "test": ["pytest", "hypothesis"]},
)
