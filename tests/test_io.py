"""The saved-model file: round trips, readable by the safetensors library, atomic writes,
and damaged files refused with a ValueError (in child processes, so a crash would show)."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import rnncore as rc
from conftest import run_child


def char_model(dtype="float32"):
    m = rc.Sequential(rc.Embedding(11, 8, seed=0, dtype=dtype),
                      rc.LSTM(8, 16, num_layers=2, batch_first=True, proj_size=5, seed=1, dtype=dtype),
                      rc.Dropout(0.1), rc.Dense(5, 11, seed=2, dtype=dtype))
    m.metadata = {"chars": list("abcdefghijk")}
    return m


MODELS = {
    "sequential": char_model,
    "sequential_f64": lambda: char_model("float64"),
    "many_to_one": lambda: rc.Sequential(rc.OneHot(4), rc.GRU(4, 6, bidirectional=True, batch_first=True,
                                                                linear_before_reset=False),
                                          rc.LastStep(), rc.Dense(12, 3, activation="tanh")),
    "seq2seq": lambda: rc.Seq2Seq(9, 10, embed=4, hidden=8, cell="gru", seed=0),
    "layer": lambda: rc.LSTM(3, 4, peephole=True, coupled_gates=True, num_layers=2),
}


def inputs_for(name, rng):
    if name in ("sequential", "sequential_f64"):
        return rng.integers(0, 11, (3, 7))
    if name == "many_to_one":
        return rng.integers(0, 4, (3, 7))
    return rng.standard_normal((5, 2, 3)).astype(np.float32)


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_identical(name, tmp_path):
    rng = np.random.default_rng(0)
    m = MODELS[name]()
    path = tmp_path / "m.rnnc"
    m.save(path)
    m2 = rc.load(path)
    assert type(m2) is type(m)
    for k, v in m.params.items():
        np.testing.assert_array_equal(m2.params[k], v)
        assert m2.params[k].dtype == v.dtype
    m.eval()
    if name == "seq2seq":
        src = rng.integers(0, 9, (4, 5))
        assert m.translate(src, 6, 1, 2) == m2.translate(src, 6, 1, 2)
    elif name == "layer":
        x = inputs_for(name, rng)
        np.testing.assert_array_equal(m(x)[0], m2(x)[0])
    else:
        x = inputs_for(name, rng)
        np.testing.assert_array_equal(m.predict(x), m2.predict(x))
    if name == "sequential":
        assert m2.metadata == {"chars": list("abcdefghijk")}


def test_safetensors_library_reads_it(tmp_path):
    from safetensors.numpy import load_file
    from safetensors import safe_open
    m = char_model()
    path = tmp_path / "m.rnnc"
    m.save(path)
    tensors = load_file(str(path))
    assert set(tensors) == set(m.params)
    for k, v in tensors.items():
        np.testing.assert_array_equal(v, m.params[k])
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "rnncore" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["blocks"][1]["type"] == "LSTM"


def _blob(tmp_path):
    path = tmp_path / "good.rnnc"
    char_model().save(path)
    return path.read_bytes()


def _rewrite_header(blob, fn):
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    fn(header)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + blob[8 + n:]


def mutations(blob):
    n = len(blob)
    (hlen,) = struct.unpack("<Q", blob[:8])
    out = {}
    for cut in (0, 3, 8, 8 + hlen // 2, 8 + hlen, n - 1):
        out[f"truncated_{cut}"] = (blob[:cut], "")
    out["huge_header"] = (struct.pack("<Q", 2**63) + blob[8:], "header length")
    out["header_past_end"] = (struct.pack("<Q", n) + blob[8:], "past the end")
    out["bad_json"] = (blob[:8] + b"{" * hlen + blob[8 + hlen:], "JSON")
    out["not_object"] = (_rewrite_header(blob, lambda h: None)[:8] + b"[]" + b" " * (hlen - 2) + blob[8 + hlen:], "")

    def newer(h):
        h["__metadata__"]["format_version"] = "2"
    out["newer_version"] = (_rewrite_header(blob, newer), "newer rnncore")

    def other_format(h):
        h["__metadata__"]["format"] = "other"
    out["wrong_format"] = (_rewrite_header(blob, other_format), "format")

    def dtype(h):
        h["0.weight"]["dtype"] = "I32"
    out["wrong_dtype"] = (_rewrite_header(blob, dtype), "dtype")

    def dtype64(h):
        e = h["0.weight"]
        e["dtype"] = "F64"
        e["shape"] = [e["shape"][0], e["shape"][1] // 2]
    out["other_float_dtype"] = (_rewrite_header(blob, dtype64), "")

    def shape(h):
        e = h["0.weight"]
        e["shape"] = e["shape"][::-1]
    out["wrong_shape"] = (_rewrite_header(blob, shape), "0.weight")

    def offsets(h):
        h["0.weight"]["data_offsets"][1] += 4
    out["bad_offsets"] = (_rewrite_header(blob, offsets), "data_offsets")

    def missing(h):
        del h["3.bias"]
    out["missing_tensor"] = (_rewrite_header(blob, missing), "")

    def config(h):
        h["__metadata__"]["config"] = h["__metadata__"]["config"].replace('"hidden_size": 16', '"hidden_size": -16')
    out["bad_config_checksum"] = (_rewrite_header(blob, config), "checksum")
    return out


def test_damaged_files_are_refused_without_crashing(tmp_path):
    blob = _blob(tmp_path)
    cases = mutations(blob)
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(0, len(blob), 150).tolist()) | set(range(0, 8)))
    for i, pos in enumerate(positions):          # every flipped byte is detected
        b = bytearray(blob)
        b[pos] ^= 0xFF
        cases[f"flip_{pos}"] = (bytes(b), "")
    for i, pos in enumerate(rng.integers(8, len(blob), 60).tolist()):   # and single flipped bits
        b = bytearray(blob)
        b[pos] ^= 1 << (i % 8)
        cases[f"bit_{pos}_{i % 8}"] = (bytes(b), "")
    folder = tmp_path / "bad"
    folder.mkdir()
    expect = {}
    for name, (data, part) in cases.items():
        (folder / f"{name}.rnnc").write_bytes(data)
        expect[name] = part
    (folder / "expect.json").write_text(json.dumps(expect))
    out = run_child(f"""
        import json, os, rnncore
        folder = {str(folder)!r}
        expect = json.load(open(os.path.join(folder, "expect.json")))
        bad = []
        for name, part in expect.items():
            try:
                rnncore.load(os.path.join(folder, name + ".rnnc"))
                bad.append(name + ": loaded")
            except ValueError as e:
                if part not in str(e) or "not a loadable rnncore model" not in str(e):
                    bad.append(name + ": " + str(e))
        print("BAD", bad)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "BAD []", out.stdout[-3000:]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        rc.load(tmp_path / "nope.rnnc")


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.rnnc"
    m = char_model()
    m.save(path)
    good = path.read_bytes()
    other = char_model()
    for v in other.params.values():
        v += 1

    def half_then_full_disk(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rc.io, "_write_all", half_then_full_disk)
    with pytest.raises(OSError):
        other.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.rnnc"]          # no temporary file left behind
    monkeypatch.undo()
    rc.load(path)


def test_killed_mid_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "big.rnnc"
    code = textwrap.dedent(f"""
        import rnncore, sys
        m = rnncore.Sequential(rnncore.LSTM(256, 1024, num_layers=2, batch_first=True))
        m.save({str(path)!r})
        print("ready", flush=True)
        while True:
            for v in m.params.values():
                v += 1
            m.save({str(path)!r})
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(1.0)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
    m = rc.load(path)                  # whatever version it is, it is whole
    first = next(iter(m.params.values()))
    assert np.all(np.isfinite(first))
