"""The C++ model reader and runner under AddressSanitizer and UndefinedBehaviorSanitizer:
the core and tests/cpp/test_model.cpp are built from source with both sanitizers, then run
on models saved from Python (outputs compared with Python's) and on damaged files."""
import os
import shutil
import subprocess

import pytest

from cpp_cases import cmake_build, write_cases


def sanitizer_build(tmp):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not available")
    b = tmp / "build-asan"
    cmake_build(b, ["rnncore_cpp_tests"], "-DRNNCORE_BUILD_TESTS=ON", "-DRNNCORE_SANITIZE=ON",
                build_type="RelWithDebInfo")
    return b / "rnncore_cpp_tests"


def test_cpp_model_under_sanitizers(tmp_path):
    exe = sanitizer_build(tmp_path)
    cases = tmp_path / "cases"
    cases.mkdir()
    write_cases(cases, large=True)   # the packed, multi-threaded paths too (bfloat16 included)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([str(exe), str(cases)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "0 failed" in out.stdout
    assert "ERROR: AddressSanitizer" not in out.stderr and "runtime error" not in out.stderr
