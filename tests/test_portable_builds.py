"""Builds beyond this machine's own: the core compiled by Clang (through the ziglang
package, a self-contained Clang that cross-compiles) for x86_64 and for arm64, where the
portable kernels use NEON, with no warnings; and, where a cross compiler and qemu are
installed, the arm64 build of the C++ model runner run under emulation on models saved
from Python here, its NEON kernels' outputs matched against Python's."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpp_cases import cmake_build, write_cases


def zig_cxx(tmp_path, target):
    pytest.importorskip("ziglang")
    wrapper = tmp_path / f"clang-{target}"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ziglang c++ -target {target} "$@"\n')
    wrapper.chmod(0o755)
    version = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True).stdout
    return wrapper, re.search(r"clang version (\d+\.\d+\.\d+)", version).group(1)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.parametrize("target,processor", [("x86_64-linux-gnu", "x86_64"), ("aarch64-linux-gnu", "aarch64")])
def test_clang_builds_without_warnings(tmp_path, target, processor):
    # The core library: every kernel unit of the target (AVX-512, AVX2 and SSE2 on x86_64,
    # NEON on arm64), compiled, not linked. CMake is told the compiler instead of testing it:
    # its test links a program, and zig first builds a C++ runtime for the target (about two
    # minutes). Without OpenMP: ziglang has no libomp.
    cxx, version = zig_cxx(tmp_path, target)
    cmake_build(tmp_path / "build", ["rnncore_core"], f"-DCMAKE_CXX_COMPILER={cxx}",
                "-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={processor}",
                "-DRNNCORE_ENABLE_OPENMP=OFF", "-DCMAKE_CXX_COMPILER_FORCED=TRUE",
                "-DCMAKE_CXX_COMPILER_ID_RUN=TRUE", "-DCMAKE_CXX_COMPILER_ID=Clang",
                f"-DCMAKE_CXX_COMPILER_VERSION={version}", "-DCMAKE_CXX_STANDARD_COMPUTED_DEFAULT=17",
                "-DCMAKE_CXX_EXTENSIONS_COMPUTED_DEFAULT=ON", allow_warnings=False)


CROSS = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")


@pytest.mark.skipif(not (shutil.which(CROSS) and shutil.which(QEMU) and shutil.which("cmake")
                         and SYSROOT.is_dir()),
                    reason=f"needs {CROSS}, {QEMU} and cmake (Debian: g++-aarch64-linux-gnu qemu-user)")
def test_neon_build_matches_python(tmp_path):
    b = tmp_path / "build-arm64"
    cmake_build(b, ["rnncore_cpp_tests"], f"-DCMAKE_CXX_COMPILER={CROSS}", "-DCMAKE_SYSTEM_NAME=Linux",
                "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DRNNCORE_BUILD_TESTS=ON", allow_warnings=False)
    cases = tmp_path / "cases"
    cases.mkdir()
    write_cases(cases, large=True)
    out = subprocess.run([QEMU, "-L", str(SYSROOT), str(b / "rnncore_cpp_tests"), str(cases)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "isa neon" in out.stdout, out.stdout[-1000:]
    assert "0 failed" in out.stdout, out.stdout[-3000:]


def _nvcc():
    found = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return found if os.path.exists(found) else None


@pytest.mark.skipif(shutil.which("cmake") is None or _nvcc() is None, reason="needs cmake and nvcc")
def test_cuda_build_configures_and_builds(tmp_path):
    # The optional CUDA path from a fresh build folder, with no architectures named: the core
    # library's target exists before CUDA is enabled, so the build picks them for it (an
    # empty CUDA_ARCHITECTURES stopped the configure on an H200 machine with CMake 4). The
    # CUDA unit alone is compiled (the whole core takes minutes on two cores; the full CUDA
    # build was linked and its test suite run on that machine).
    cmake_build(tmp_path / "build-cuda", ["cpp/src/cuda/cuda_runtime.cu.o"], "-G", "Unix Makefiles",
                "-DRNNCORE_ENABLE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
    cache = (tmp_path / "build-cuda" / "CMakeCache.txt").read_text()
    assert "RNNCORE_ENABLE_CUDA:BOOL=ON" in cache


# The sources linked into the Python module (python/bindings, and the core library's own units)
MODULE_SOURCES = sorted(
    [*Path(__file__).resolve().parents[1].glob("python/bindings/*.cpp"),
     *[Path(__file__).resolve().parents[1] / "cpp/src" / f
       for f in ("dispatch.cpp", "layer.cpp", "runtime.cpp", "hopfield.cpp", "second_order.cpp",
                 "kernels.hpp", "cpu/impl.hpp")]])


@pytest.mark.parametrize("path", MODULE_SOURCES, ids=lambda p: p.name)
def test_module_sources_use_no_iostreams(path):
    # A module built where libstdc++ ends up linked into it as well as loaded by the process
    # (seen with Ubuntu 24.04's GCC 13) crashed formatting a number through an ostringstream;
    # error messages are built from std::to_string and appends instead.
    text = path.read_text()
    for banned in ("<sstream>", "<iostream>", "stringstream", "std::cout", "std::cerr", "<fstream>"):
        assert banned not in text, f"{path.name} uses {banned}"


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_module_exports_only_its_init():
    # Nothing of the static core (nor of a statically linked libstdc++) is exported by the
    # module, so no other library in the process binds to its copies (--exclude-libs,ALL).
    import rnncore._core as core
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", core.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    functions = [line.split(" ", 2)[2] for line in out.stdout.splitlines()
                 if len(line.split(" ", 2)) == 3 and line.split(" ", 2)[1] in ("T", "W", "u", "i")]
    assert "PyInit__core" in functions
    leaked = [f for f in functions if "rnncore::" in f or "basic_ostream" in f or "locale" in f]
    assert not leaked, leaked[:10]
