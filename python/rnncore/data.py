"""Text data for character-level models: the embedded default corpus (the source of
Python's standard library, present wherever Python is) and a character vocabulary."""
from __future__ import annotations

import os
import sysconfig

import numpy as np

_PREFERRED = ["textwrap.py", "argparse.py", "collections/__init__.py", "functools.py", "pathlib.py",
              "json/encoder.py", "json/decoder.py", "string.py", "random.py", "heapq.py", "bisect.py",
              "dataclasses.py", "enum.py", "inspect.py", "typing.py", "logging/__init__.py",
              "subprocess.py", "shutil.py", "tempfile.py", "threading.py", "csv.py", "difflib.py",
              "ast.py", "calendar.py", "statistics.py", "fractions.py", "decimal.py", "_pydecimal.py"]


def default_corpus(max_chars: int = 1_000_000) -> str:
    """Python standard-library source text: a fixed list of well-known modules first, then
    the rest in sorted order, until max_chars characters."""
    root = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(root, p) for p in _PREFERRED]
    rest = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests",
                                                              "idlelib", "lib2to3", "__pycache__"))
        rest.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    seen = set()
    parts = []
    total = 0
    for path in files + rest:
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise RuntimeError(f"no Python source files found under {root}")
    return "".join(parts)[:max_chars]


def ascii_clean(text: str) -> str:
    """Keeps printable ASCII, newlines and tabs; anything else becomes '?'."""
    return "".join(c if (32 <= ord(c) < 127 or c in "\n\t") else "?" for c in text)


class CharVocab:
    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        unk = self.index.get("?", 0)
        return np.array([self.index.get(c, unk) for c in text], dtype=np.int64)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def windows(ids: np.ndarray, seq_len: int):
    """Non-overlapping (input, next-char target) windows: X, Y of shape (N, seq_len)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"text: expected at least {seq_len + 1} characters, got {len(ids)}")
    X = ids[:n * seq_len].reshape(n, seq_len)
    Y = ids[1:n * seq_len + 1].reshape(n, seq_len)
    return X, Y
