"""The saved-model file: safetensors with rnncore's configuration in its metadata.

Layout (the safetensors format): 8 bytes little-endian header length N, N bytes of JSON
header (padded with spaces to a multiple of 8), then the raw little-endian tensor data.
The header's "__metadata__" (string to string) holds:
  format          "rnncore"
  format_version  "1"  (a reader refuses a newer version)
  model           the model class ("Sequential", "Seq2Seq", "LSTM", ...)
  config          JSON of the constructor configuration
  data_crc32      CRC-32 of the whole data section
  meta_crc32      CRC-32 of the other metadata entries ("key=value\n", keys sorted)
Together with the structural checks of every tensor entry, a flipped byte anywhere in the
file is detected.
Saving is atomic: a temporary file in the same folder is written, flushed, fsynced and
renamed over the target, so a crash or a full disk leaves the previous file intact.
Loading checks every length, offset, dtype and shape before it reads a tensor and raises
ValueError naming what is wrong.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import numpy as np

FORMAT = "rnncore"
FORMAT_VERSION = 1
MAX_HEADER = 64 * 1024 * 1024
_DT = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_DT_NAME = {np.dtype("float32"): "F32", np.dtype("float64"): "F64"}


def _model_kind(model):
    from .layers import _Recurrent
    from .models import Seq2Seq, Sequential
    for cls in (Sequential, Seq2Seq):
        if isinstance(model, cls):
            return cls.__name__
    if isinstance(model, _Recurrent):
        return type(model).__name__
    raise TypeError(f"model: expected a Sequential, Seq2Seq or recurrent layer, got {type(model).__name__}")


def encode(model) -> bytes:
    """The file's bytes for a model."""
    kind = _model_kind(model)
    tensors = [(k, np.ascontiguousarray(v)) for k, v in model.params.items()]
    header = {}
    offset = 0
    for k, a in tensors:
        dt = _DT_NAME.get(a.dtype)
        if dt is None:
            raise TypeError(f"{k}: cannot save dtype {a.dtype}")
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    data = b"".join(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for _, a in tensors)
    header["__metadata__"] = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": kind,
        "config": json.dumps(model.config(), sort_keys=True),
        "data_crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}",
    }
    user = getattr(model, "metadata", None)
    if user:
        header["__metadata__"]["user"] = json.dumps(user, sort_keys=True)
    header["__metadata__"]["meta_crc32"] = _meta_crc(header["__metadata__"])
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def _meta_crc(meta) -> str:
    text = "".join(f"{k}={meta[k]}\n" for k in sorted(meta) if k != "meta_crc32")
    return f"{zlib.crc32(text.encode('utf-8')) & 0xFFFFFFFF:08x}"


def _write_all(f, data: bytes):
    f.write(data)


def save(model, path):
    """Writes `model` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    blob = encode(model)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rnncore-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _bad(path, msg):
    return ValueError(f"{path}: not a loadable rnncore model: {msg}")


def decode(blob: bytes, path="<bytes>"):
    """Parses and validates the file's bytes; returns (metadata, {name: array})."""
    n = len(blob)
    if n < 8:
        raise _bad(path, f"file is {n} bytes, too short for a safetensors header (truncated?)")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > MAX_HEADER:
        raise _bad(path, f"header length {hlen} exceeds the {MAX_HEADER}-byte limit (corrupted?)")
    if 8 + hlen > n:
        raise _bad(path, f"header length {hlen} runs past the end of the {n}-byte file (truncated?)")
    try:
        header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "missing or malformed __metadata__")
    if meta.get("format") != FORMAT:
        raise _bad(path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise _bad(path, f"format_version {meta.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise _bad(path, f"format version {version} was written by a newer rnncore; this one reads "
                         f"version {FORMAT_VERSION} (upgrade rnncore)")
    if version < 1:
        raise _bad(path, f"format version {version} is invalid")
    if meta.get("meta_crc32") != _meta_crc(meta):
        raise _bad(path, "metadata checksum mismatch (the header is corrupted)")
    data = memoryview(blob)[8 + hlen:]
    crc = meta.get("data_crc32")
    if crc is None or f"{zlib.crc32(data) & 0xFFFFFFFF:08x}" != crc:
        raise _bad(path, "data checksum mismatch (the file is corrupted or truncated)")
    tensors = {}
    spans = []
    for name, ent in header.items():
        if not isinstance(ent, dict) or set(ent) - {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name!r}: malformed entry")
        dt = _DT.get(ent.get("dtype"))
        if dt is None:
            raise _bad(path, f"tensor {name!r}: dtype {ent.get('dtype')!r} is not F32 or F64")
        shape = ent.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
            raise _bad(path, f"tensor {name!r}: invalid shape {shape!r}")
        off = ent.get("data_offsets")
        if not (isinstance(off, list) and len(off) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in off)):
            raise _bad(path, f"tensor {name!r}: invalid data_offsets {off!r}")
        b, e = off
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= b <= e <= len(data)) or e - b != count * dt.itemsize:
            raise _bad(path, f"tensor {name!r}: data_offsets {off} do not fit shape {shape} "
                             f"and a {len(data)}-byte data section")
        spans.append((b, e))
        tensors[name] = np.frombuffer(data[b:e], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise _bad(path, "tensor data overlaps or leaves gaps")
        pos = e
    if pos != len(data):
        raise _bad(path, f"data section is {len(data)} bytes but tensors cover {pos}")
    return meta, tensors


def build(meta, path="<bytes>"):
    """A fresh model from the metadata's configuration."""
    from . import blocks as B
    from .classic import SecondOrderRNN
    from .layers import GRU, LSTM, RNN
    from .models import Seq2Seq, Sequential
    try:
        cfg = json.loads(meta.get("config", ""))
    except ValueError as e:
        raise _bad(path, f"config is not valid JSON ({e})") from None
    kind = meta.get("model")
    block_types = {"Embedding": B.Embedding, "OneHot": B.OneHot, "Dense": B.Dense,
                   "Dropout": B.Dropout, "LastStep": B.LastStep, "RNN": RNN, "LSTM": LSTM, "GRU": GRU,
                   "SecondOrderRNN": SecondOrderRNN}
    try:
        if kind == "Sequential":
            blocks = []
            for b in cfg["blocks"]:
                cls = block_types.get(b["type"])
                if cls is None:
                    raise _bad(path, f"unknown block type {b['type']!r}")
                blocks.append(cls(**b["config"]))
            return Sequential(*blocks)
        if kind == "Seq2Seq":
            return Seq2Seq(**cfg)
        if kind in ("RNN", "LSTM", "GRU"):
            return block_types[kind](**cfg)
    except ValueError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise _bad(path, f"invalid configuration ({e})") from None
    except (TypeError, KeyError) as e:
        raise _bad(path, f"invalid configuration ({type(e).__name__}: {e})") from None
    raise _bad(path, f"unknown model type {kind!r}")


def load(path):
    """Loads a model saved with `model.save(path)`; raises ValueError for a damaged file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file")
    with open(path, "rb") as f:
        blob = f.read()
    meta, tensors = decode(blob, path)
    model = build(meta, path)
    want = {k: v.shape for k, v in model.params.items()}
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    wrong = [f"{k}: expected shape {want[k]}, got {tensors[k].shape}" for k in want
             if k in tensors and tensors[k].shape != want[k]]
    wrong_dtype = [f"{k}: expected {model.params[k].dtype}, got {tensors[k].dtype}" for k in want
                   if k in tensors and tensors[k].dtype != model.params[k].dtype]
    if missing or unexpected or wrong or wrong_dtype:
        raise _bad(path, "tensors do not match the configuration: " +
                   "; ".join(filter(None, [missing and f"missing {missing}",
                                           unexpected and f"unexpected {unexpected}"] + wrong + wrong_dtype)))
    for k, v in tensors.items():
        model.params[k] = v
    if "user" in meta:
        try:
            model.metadata = json.loads(meta["user"])
        except ValueError:
            raise _bad(path, "user metadata is not valid JSON") from None
    model.eval()
    return model
