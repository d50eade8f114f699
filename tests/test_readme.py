"""The README's Python examples run as written: each ```python block in order, the ones that
continue the quick tour in its namespace, the others after a few lines that make the names
they leave to the reader (data, a stream). A README edit that renames an argument or drops a
method fails here."""
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


# what a block takes from the reader, by a line it contains
PRELUDES = {
    "model = rnncore.Sequential(\n    rnncore.Embedding(vocab": """
rng = np.random.default_rng(0)
vocab = 12
X = rng.integers(0, vocab, (16, 20)); Y = np.roll(X, -1, axis=1)
Xv, Yv = X[:4], Y[:4]
prime_ids = X[0, :5]
""",
    "net = rnncore.Hopfield(128)": """
rng = np.random.default_rng(0)
patterns = np.where(rng.standard_normal((3, 128)) > 0, 1.0, -1.0)
noisy_probe = patterns[0].copy(); noisy_probe[:10] *= -1
stream = [(rng.standard_normal(1), rng.standard_normal(1)) for _ in range(5)]
""",
}
# a block's line that is meant to raise (the README says so in its comment)
RAISES = {"server.params[\"weight_hh_l0\"][0, 0] = 1.0": ValueError}


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")                   # the tour loads a PyTorch state_dict
    monkeypatch.chdir(tmp_path)                     # model.save("model.rnnc") writes here
    blocks = python_blocks()
    assert len(blocks) >= 5, "the README's Python examples were not found"
    tour = {"np": np}
    ran, raised = 0, 0
    for block in blocks:
        prelude = next((p for key, p in PRELUDES.items() if key in block), None)
        ns = tour if prelude is None else {"np": np}
        if prelude is not None:
            exec("import numpy as np, rnncore\n" + prelude, ns)
        lines = block.splitlines()
        bad = [i for i, line in enumerate(lines) if any(k in line for k in RAISES)]
        body = "\n".join(line for i, line in enumerate(lines) if i not in bad)
        exec(compile(body, f"README block {ran}", "exec"), ns)
        for i in bad:
            err = next(e for k, e in RAISES.items() if k in lines[i])
            with pytest.raises(err):
                exec(lines[i].split("#")[0], ns)
            raised += 1
        ran += 1
    assert ran == len(blocks) and raised == len(RAISES), "a block meant to raise was not found"
    assert all(any(key in b for b in blocks) for key in PRELUDES), "a block with a prelude was not found"
