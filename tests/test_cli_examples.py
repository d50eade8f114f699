"""The command line (train, sample, info, --help, errors) and the examples, end to end."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnncore as rc

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "rnncore", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_help_everywhere():
    for args in ([], ["--help"], ["train", "--help"], ["sample", "--help"], ["info", "--help"],
                 ["bench", "--help"]):
        out = cli(*args)
        assert "usage: rnncore" in out.stdout + out.stderr


def test_bench_one_small_shape(tmp_path):
    out = cli("bench", "--cells", "RNN,GRU", "--shapes", "5,1,8,16;4,2,8,16", "--no-train", "--no-step",
              "--threads", "1", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("RNN ", "GRU "))]
    assert len(rows) == 4 and all("rnncore" in r for r in rows)
    import json
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["shape"] for r in data["rows"]] == [[5, 1, 8, 16], [4, 2, 8, 16]] * 2
    assert all(r["rnncore"] > 0 for r in data["rows"]) and data["steps"] == []
    rt = data["bandwidth"]["round_trip_ns"]
    assert rt != rt and "round trip between two threads n/a (one thread)" in out.stdout   # NaN
    from rnncore.bench import ROUNDS
    for r in data["rows"]:   # every library timed in each round, its figure the rounds' median
        assert r["rounds"].keys() >= {"rnncore", "numpy"} and len(r["rounds"]["rnncore"]) == ROUNDS
        for lib, times in r["rounds"].items():
            assert len(times) == ROUNDS and r[lib] == sorted(times)[ROUNDS // 2], lib
        assert len(r["ratio_rounds"]) == ROUNDS
        # batch <= 4: the frozen copy and the bfloat16 layer are timed beside it
        assert {"rnncore_frozen", "rnncore_bf16"} <= r["rounds"].keys()
        assert r["ratio_frozen"] == r["rnncore_frozen"] / r[r["best_peer"]]
    assert "| ratio frozen |" in out.stdout and "frozen " in rows[0]
    for bad in (["--shapes", "1,2,3"], ["--shapes", "a,b,c,d"], ["--shapes", "5,1,8,16,2,3"],
                ["--shapes", "5,1,8,16,0"], ["--cells", "XYZ"]):
        out = cli("bench", *bad)
        assert out.returncode == 2 and ("--shapes" in out.stderr or "--cells" in out.stderr), out.stderr


def test_train_on_a_file_then_sample(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("hello world, hello rnncore. " * 300)
    model = tmp_path / "m.rnnc"
    out = cli("train", "--data", str(data), "--epochs", "2", "--hidden", "32", "--embed", "8",
              "--seq-len", "32", "--bptt", "16", "--batch-size", "8", "--no-progress",
              "--out", str(model), "--sample-length", "40", "--prime", "hel")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("---- sample ----") == 2
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in out.stdout.splitlines()
              if line.startswith("epoch ")]
    assert losses[1] < losses[0]
    assert model.exists() and rc.load(model).metadata["chars"]
    out = cli("sample", "--model", str(model), "--prime", "hello", "--length", "30", "--seed", "1",
              "--temperature", "0.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("hello") and len(out.stdout.strip()) >= 30


def test_train_default_corpus_small(tmp_path):
    out = cli("train", "--max-chars", "20000", "--epochs", "1", "--hidden", "32", "--embed", "8",
              "--seq-len", "64", "--bptt", "32", "--no-progress", "--sample-length", "20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "standard library" in out.stdout
    assert (tmp_path / "char-lstm.rnnc").exists()


def test_train_errors(tmp_path):
    out = cli("train", "--data", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "missing.txt: no such file" in out.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = cli("train", "--data", str(empty))
    assert out.returncode == 2 and "empty" in out.stderr
    short = tmp_path / "short.txt"
    short.write_text("abc")
    out = cli("train", "--data", str(short))
    assert out.returncode == 2 and "at least" in out.stderr
    out = cli("train", "--epochs", "0")
    assert out.returncode == 2 and "--epochs" in out.stderr


def test_sample_errors(tmp_path):
    out = cli("sample", "--model", str(tmp_path / "none.rnnc"))
    assert out.returncode == 2 and "no such file" in out.stderr
    bad = tmp_path / "bad.rnnc"
    bad.write_bytes(b"\x00" * 5)
    out = cli("sample", "--model", str(bad))
    assert out.returncode == 2 and "not a loadable rnncore model" in out.stderr
    layer = tmp_path / "layer.rnnc"
    rc.GRU(2, 3).save(layer)
    out = cli("sample", "--model", str(layer))
    assert out.returncode == 2 and "not a character-level model" in out.stderr


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_smoke(example):
    env = {**os.environ, "RNNCORE_EXAMPLE_QUICK": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def test_bench_training_without_the_input_gradient(tmp_path):
    """--no-input-grad: both libraries' training steps skip the input's gradient (PyTorch's x
    without requires_grad), said in the header, the table's caption and the JSON."""
    pytest.importorskip("torch")
    out = cli("bench", "--cells", "GRU", "--shapes", "6,2,8,16", "--no-step", "--no-input-grad",
              "--threads", "1", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    import json
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["train_input_grad"] is False
    assert data["rows"][0]["train_rnncore"] > 0 and data["rows"][0]["train_torch"] > 0
    assert out.stdout.count("without the input's gradient") == 2
    out = cli("bench", "--cells", "GRU", "--shapes", "6,2,8,16", "--no-step", "--threads", "1",
              "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0 and "without the input's gradient" not in out.stdout
    assert json.loads((tmp_path / "b.json").read_text())["train_input_grad"] is True


def test_bench_a_stack(tmp_path):
    """A fifth number in a shape is the stack's layers: every peer runs the same stack (the
    NumPy peer layer after layer, checked against rnncore's output before timing)."""
    out = cli("bench", "--cells", "LSTM", "--shapes", "40,1,8,16,2", "--no-train", "--no-step",
              "--threads", "2", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    import json
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["shape"] for r in data["rows"]] == [[40, 1, 8, 16, 2]]
    assert "L=2" in out.stdout and "| 40, 1, 8, 16 (2 layers) |" in out.stdout
    # the ceilings measured with two threads include the team's round trip
    import rnncore
    rt = data["bandwidth"]["round_trip_ns"]
    assert (rt > 0) if rnncore.info()["openmp"] else rt != rt
    assert "round trip between two threads" in out.stdout
