"""Build the optional native CPU kernels (``tapo_kernels._C``).

Set ``TAPO_NO_NATIVE=1`` to skip the C++ build; the package then runs its pure-torch
reference on the CPU. Build in place with ``pip install --no-build-isolation -e .``
(build isolation would download a CUDA build of torch).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("TAPO_NO_NATIVE", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="tapo_kernels._C",
            sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=["-O3", "-g0", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
