"""Builds embfile's one extension, embfile._core, from the Cython layer and the C core."""

import os
import platform

import numpy
from setuptools import Extension, setup


def core_extension():
    """The extension: embfile/_core.pyx plus src_c/*.c.

    EMBFILE_DEBUG=1 builds without optimisation and with assertions;
    EMBFILE_SANITIZE=1 adds AddressSanitizer and UBSan, any undefined behaviour
    fatal, and EMBFILE_SANITIZE=fuzz libFuzzer's coverage too (clang only);
    EMBFILE_COVERAGE=1 adds gcov's line counts.  fuzz/sanitized.py builds these.
    """
    args = ["-std=c99", "-O3", "-Wall", "-Wextra", "-Wno-unused-function"]
    link = []
    if os.environ.get("EMBFILE_DEBUG"):
        args += ["-O0", "-g", "-UNDEBUG"]
    sanitize = os.environ.get("EMBFILE_SANITIZE")
    if platform.machine() in ("x86_64", "AMD64") and not sanitize:  # sanitized builds may use clang's assembler
        # Intel's JCC-erratum microcode slows a loop whose jumps cross a 32-byte boundary, so a lookup's speed
        # moved by a third with unrelated code around it: have GNU as keep jumps inside the boundaries.
        args += ["-Wa,-mbranches-within-32B-boundaries"]
    if sanitize:
        checks = "address,undefined" + (",fuzzer-no-link" if sanitize == "fuzz" else "")
        args += ["-O1", "-g", f"-fsanitize={checks}", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={checks}"]
    if os.environ.get("EMBFILE_COVERAGE"):
        args += ["-O0", "--coverage"]
        link += ["--coverage"]
    return Extension(
        "embfile._core",
        sources=[
            "embfile/_core.pyx",
            "src_c/index.c",
            "src_c/pool.c",
            "src_c/records.c",
            "src_c/search.c",
            "src_c/shuffle.c",
        ],
        include_dirs=["src_c", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=args,
        extra_link_args=link,
    )


setup(ext_modules=[core_extension()])
