"""The full benchmark: rnncore against NumPy, PyTorch (CPU) and ONNX Runtime, same weights
and threads, one run. Install the peers with `pip install '.[bench]'`, then:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/run.py [--threads 2] [--json out.json]

(OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE may be set on this machine for old OpenBLAS builds; they
slow a current NumPy, so the benchmark command unsets them, and only it.)
"""
import os
import sys

# Thread counts must be fixed before NumPy's BLAS starts.
threads = "2"
if "--threads" in sys.argv:
    threads = sys.argv[sys.argv.index("--threads") + 1]
else:
    sys.argv += ["--threads", str(os.cpu_count() or 1)]
    threads = str(os.cpu_count() or 1)
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, threads)

from rnncore.bench import main  # noqa: E402

sys.exit(main())
