"""The arm64 build: the core (its portable kernels compiled for NEON) and the C++ model
runner cross-compiled for aarch64 and run under qemu's user-mode emulation on models saved
from Python on this machine; the NEON kernels' outputs must match Python's (x86) within
test_model's tolerance, and damaged files are refused there too.

Needs a cross compiler and qemu (Debian: g++-aarch64-linux-gnu qemu-user); skipped without
them. On an arm64 machine the whole suite runs natively instead."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cpp_cases import write_cases

ROOT = Path(__file__).resolve().parents[1]
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")


@pytest.mark.skipif(not (shutil.which(CXX) and shutil.which(QEMU) and shutil.which("cmake")
                         and SYSROOT.is_dir()),
                    reason=f"needs {CXX}, {QEMU} and cmake (Debian: g++-aarch64-linux-gnu qemu-user)")
def test_neon_build_matches_python(tmp_path):
    b = tmp_path / "build-arm64"
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(b), "-DCMAKE_SYSTEM_NAME=Linux",
                          "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={CXX}",
                          "-DRNNCORE_BUILD_TESTS=ON", "-DRNNCORE_BUILD_PYTHON=OFF",
                          "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(b), "--target", "rnncore_cpp_tests", "-j", "2"],
                         capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    # compiled without a warning for the NEON unit as well
    assert "warning:" not in bld.stdout + bld.stderr, (bld.stdout + bld.stderr)[-3000:]
    cases = tmp_path / "cases"
    cases.mkdir()
    write_cases(cases, large=True)
    out = subprocess.run([QEMU, "-L", str(SYSROOT), str(b / "rnncore_cpp_tests"), str(cases)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "isa neon" in out.stdout, out.stdout[-1000:]
    assert "0 failed" in out.stdout, out.stdout[-3000:]
