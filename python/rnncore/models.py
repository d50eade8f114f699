"""Models: Sequential (stacks of blocks and recurrent layers) and Seq2Seq, with training
loops (fit), evaluation, prediction and sampling.

Data inside a model is batch-first: token ids (B, T) or features (B, T, F). Recurrent
layers built with batch_first=False are fed time-major transparently.
"""
from __future__ import annotations

import time

import numpy as np

from . import _random
from . import losses as _losses
from . import optim as _optim
from ._arrays import ParamDict, check_int, shape_str, state_without
from .blocks import Block, Dense, Embedding, LastStep
from .layers import GRU, LSTM, RNN, _Recurrent


def _is_rec(b):
    return getattr(b, "is_recurrent", False)


class History:
    """What fit() recorded: `history` maps 'loss', 'val_loss' and metrics to per-epoch lists."""

    def __init__(self):
        self.history = {}
        self.epoch = []

    def _add(self, epoch, logs):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __repr__(self):
        last = {k: round(v[-1], 4) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


class _ModelParams(ParamDict):
    """All parameters of a model under PyTorch-style prefixed names ("0.weight", ...).
    The arrays are the blocks' own; assignment copies into them; touch() marks every
    block's parameters as changed."""

    __slots__ = ("_parts", "_named")

    def __init__(self, parts, dtype):
        arrays = {}
        for prefix, pd in parts:
            for k, v in dict.items(pd):
                arrays[f"{prefix}.{k}"] = v
        super().__init__(arrays, dtype)
        self._named = list(parts)
        self._parts = [pd for _, pd in parts]
        self.frozen = bool(self._parts) and all(pd.frozen for pd in self._parts)

    def __reduce__(self):
        # Rebuilt over the (copied) blocks' own dicts, so a copy of a model keeps assigning
        # into its blocks' arrays.
        return (_ModelParams, (self._named, self._dtype))

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        for pd in self._parts:
            pd.touch()

    def touch(self):
        super().touch()
        for pd in self._parts:
            pd.touch()


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)


def _accuracy(out, target, mask=None, ignore_index=None):
    t = np.asarray(target)
    if out.ndim != t.ndim + 1 or t.dtype.kind not in "iu":
        return None
    valid = np.ones(t.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if ignore_index is not None:
        valid &= t != ignore_index
    n = valid.sum()
    return float(((out.argmax(-1) == t) & valid).sum() / max(n, 1)), int(n)


class _Trainable:
    """Training loop shared by Sequential and Seq2Seq. A subclass provides
    _batch_loss(batch, loss_fn, train) -> (loss, count, correct_or_None) where train=True
    also runs backward, and _batches(data, idx) to slice a batch."""

    loss = "cross_entropy"

    def _fit_loop(self, data, n, loss, optimizer, epochs, batch_size, clip_norm,
                  validation_data, progress, seed, shuffle, tokens_per_item):
        self._check_trainable("fit")
        epochs = check_int(epochs, "epochs")
        batch_size = check_int(batch_size, "batch_size")
        loss_fn = _losses.get(loss)
        self.loss = loss
        opt = _optim.get(optimizer)
        self.optimizer = opt
        rng = _random.rng(seed)
        hist = History()
        params = self.params
        for epoch in range(epochs):
            self.train()
            order = rng.permutation(n) if shuffle else np.arange(n)
            nb = (n + batch_size - 1) // batch_size
            bar = _progress(nb, progress, f"epoch {epoch + 1}/{epochs}")
            tot_loss = tot_count = tot_correct = 0.0
            seen = 0
            has_acc = False
            t0 = time.perf_counter()
            for bi in range(nb):
                idx = order[bi * batch_size:(bi + 1) * batch_size]
                batch = self._slice(data, idx)

                def update():
                    if clip_norm is not None:
                        _optim.clip_grad_norm(self.grads, clip_norm)
                    opt.step(params, self.grads)
                    self.zero_grad()

                l, c, acc = self._batch_loss(batch, loss_fn, train=True, update=update)
                seen += len(idx)
                tot_loss += l * c
                tot_count += c
                if acc is not None:
                    has_acc = True
                    tot_correct += acc
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{tot_loss / max(tot_count, 1):.4f}",
                                    tok_s=f"{seen * tokens_per_item / max(el, 1e-9):.0f}")
                    bar.update(1)
            logs = {"loss": tot_loss / max(tot_count, 1)}
            if has_acc:
                logs["accuracy"] = tot_correct / max(tot_count, 1)
            if validation_data is not None:
                v = self.evaluate(*validation_data)
                logs.update({"val_" + k: val for k, val in v.items()})
            hist._add(epoch, logs)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
                bar.close()
        self.eval()
        return hist

    # parameters -------------------------------------------------------------
    def zero_grad(self):
        for b in self._parts():
            b.zero_grad()

    def train(self, mode=True):
        if mode:
            self._check_trainable("train")
        for b in self._parts():
            b.train(mode)
        self.training = bool(mode)
        return self

    def __getstate__(self):
        return state_without(self, "_params", "_grads")   # views of the blocks' own dicts

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_params(self._named_parts())

    @property
    def is_frozen(self) -> bool:
        """Whether this is a frozen, inference-only copy (see `frozen()`)."""
        return bool(self.params.frozen)

    def frozen(self):
        """An inference-only copy of the model whose parameters can never change (every
        block's `frozen()`): `predict`, `evaluate`, `generate`, calling it and saving work;
        `fit`, `forward`, assignment and load_state_dict raise ValueError. Its recurrent
        layers keep their packed weights without checking them at each call. The original
        is unchanged."""
        import copy
        c = copy.deepcopy(self)
        for b in c._parts():
            b._freeze()
        c._build_params(c._named_parts())
        c.training = False
        return c

    def _check_trainable(self, what):
        if self.is_frozen:
            raise ValueError(f"{what}: this model is frozen (inference only, made by frozen()); "
                             f"train the original, or load its state_dict into a new model")

    def eval(self):
        return self.train(False)

    @property
    def inference_precision(self) -> str:
        """Precision of the recurrent weights of every recurrent layer in inference
        (`predict`, `evaluate`, `generate`, calling the model): "float32" or "bfloat16" (see
        `LSTM.inference_precision`); "mixed" when the layers differ. Training is unaffected."""
        vals = {b.inference_precision for b in self._parts() if isinstance(b, _Recurrent)}
        return "float32" if not vals else vals.pop() if len(vals) == 1 else "mixed"

    @inference_precision.setter
    def inference_precision(self, value):
        rec = [b for b in self._parts() if isinstance(b, _Recurrent)]
        for b in rec:                       # validate against every layer before changing any
            if value == "bfloat16" and b.dtype != np.float32:
                raise ValueError(f"inference_precision: 'bfloat16' needs float32 layers, "
                                 f"this model has {b.dtype.name} ones")
        if value not in ("float32", "bfloat16"):
            raise ValueError(f"inference_precision: expected 'float32' or 'bfloat16', got {value!r}")
        for b in rec:
            b.inference_precision = value

    @property
    def params(self):
        return self._params

    @property
    def grads(self):
        return self._grads

    def _build_params(self, named):
        dt = next((b.dtype for _, b in named if hasattr(b, "dtype")), np.dtype(np.float32))
        self._params = _ModelParams([(k, b.params) for k, b in named], dt)
        self._grads = _ModelParams([(k, b.grads) for k, b in named], dt)

    def state_dict(self):
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict, strict=True):
        missing = [k for k in self.params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.params]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict: missing keys: {missing}; unexpected keys: {unexpected}")
        for k, v in state_dict.items():
            if k in self.params:
                want = self.params[k].shape
                if np.shape(v) != want:
                    raise ValueError(f"state_dict: {k}: expected shape {shape_str(want)}, got {shape_str(np.shape(v))}")
        for k, v in state_dict.items():
            if k in self.params:
                self.params[k] = v
        return missing, unexpected

    def save(self, path):
        """Writes the model (weights + configuration) to a safetensors file, atomically."""
        from .io import save
        save(self, path)


class Sequential(_Trainable):
    """A stack of blocks: Embedding/OneHot, recurrent layers, Dense, Dropout, LastStep."""

    def __init__(self, *blocks):
        if len(blocks) == 1 and isinstance(blocks[0], (list, tuple)):
            blocks = tuple(blocks[0])
        if not blocks:
            raise ValueError("Sequential: expected at least one block")
        for i, b in enumerate(blocks):
            if not (isinstance(b, Block) or _is_rec(b)):
                raise TypeError(f"blocks[{i}]: expected an rnncore block or layer, got {type(b).__name__}")
        self.blocks = list(blocks)
        self.training = True
        self._build_params(self._named_parts())

    def _parts(self):
        return self.blocks

    def _named_parts(self):
        return [(str(i), b) for i, b in enumerate(self.blocks)]

    @property
    def recurrent_layers(self):
        return [b for b in self.blocks if _is_rec(b)]

    def __repr__(self):
        inner = ",\n  ".join(repr(b) if _is_rec(b) else f"{type(b).__name__}({b.config()})"
                             for b in self.blocks)
        return f"Sequential(\n  {inner})"

    def __getitem__(self, i):
        return self.blocks[i]

    def __len__(self):
        return len(self.blocks)

    # running ---------------------------------------------------------------
    def _run(self, x, lengths=None, states=None, keep=False, stream=False):
        """stream: x is one time step and `states` belong to the caller, who lets them be
        overwritten: recurrent layers run `step` (in place, the streaming kernels)."""
        h = x
        new_states = []
        r = 0
        for b in self.blocks:
            if _is_rec(b):
                st = states[r] if states is not None else None
                h = np.asarray(h)
                if h.ndim != 3:
                    raise ValueError(f"x: a recurrent layer expects (B, T, F) input inside Sequential, "
                                     f"got shape {shape_str(h.shape)}")
                if stream and not keep and st is not None and lengths is None and h.shape[1] == 1 \
                        and not b.bidirectional:
                    y_t, s = b.step(h[:, 0], st)
                    h = y_t[:, None]
                    new_states.append(s)
                    r += 1
                    continue
                inp = h if b.batch_first else h.transpose(1, 0, 2)
                y, s = (b.forward if keep else b)(inp, st, lengths)
                h = y if b.batch_first else y.transpose(1, 0, 2)
                new_states.append(s)
                r += 1
            else:
                h = b.forward(h, lengths) if keep else b(h, lengths)
        return h, new_states

    def forward(self, x, lengths=None, states=None):
        """Training forward (keeps activations). Returns (output, final states)."""
        return self._run(x, lengths, states, keep=True)

    def backward(self, dy, input_grad=True):
        """Backpropagates dy through the last forward; grads accumulate. Returns the gradient
        of the model's input, or None where input_grad is False: then nothing is computed
        that only the input's gradient needs (the backward stops at the lowest block with
        parameters, a recurrent one skipping its input-gradient GEMM), as `fit` does."""
        low = 0
        if not input_grad:   # the lowest block with parameters; none below it needs a gradient
            low = next((i for i, b in enumerate(self.blocks) if len(b.params)), len(self.blocks))
        g = dy
        for i in range(len(self.blocks) - 1, low - 1, -1):
            b = self.blocks[i]
            last = not input_grad and i == low
            if _is_rec(b):
                gg = g if b.batch_first else np.ascontiguousarray(g.transpose(1, 0, 2))
                dx, _ = b.backward(gg, input_grad=not last)
                g = None if dx is None else (dx if b.batch_first else dx.transpose(1, 0, 2))
            else:
                g = b.backward(g)
            if g is None:
                break
        return None if not input_grad else g

    def __call__(self, x, lengths=None, states=None):
        y, _ = self._run(x, lengths, states, keep=False)
        return y

    def predict(self, X, lengths=None, batch_size=256):
        """Outputs of the last block for every item of X (eval mode)."""
        was = self.training
        self.eval()
        try:
            n = len(X)
            outs = []
            for s in range(0, n, batch_size):
                lb = None if lengths is None else np.asarray(lengths)[s:s + batch_size]
                outs.append(self(np.asarray(X[s:s + batch_size]), lb))
            return np.concatenate(outs, axis=0)
        finally:
            self.train(was)

    def evaluate(self, X, Y, lengths=None, batch_size=256, loss=None):
        """Mean loss (and accuracy for classification) over X, Y in eval mode."""
        loss_fn = _losses.get(loss or self.loss)
        was = self.training
        self.eval()
        try:
            tot = cnt = cor = 0.0
            has_acc = False
            for s in range(0, len(X), batch_size):
                xb = np.asarray(X[s:s + batch_size])
                yb = np.asarray(Y[s:s + batch_size])
                lb = None if lengths is None else np.asarray(lengths)[s:s + batch_size]
                out = self(xb, lb)
                mask = self._seq_mask(out, yb, lb)
                l = loss_fn(out, yb, mask=mask) if mask is not None else loss_fn(out, yb)
                c = _count(out, yb, mask)
                tot += l * c
                cnt += c
                acc = _accuracy(out, yb, mask) if loss_fn is _losses.cross_entropy else None
                if acc is not None:
                    has_acc = True
                    cor += acc[0] * c
            res = {"loss": tot / max(cnt, 1)}
            if has_acc:
                res["accuracy"] = cor / max(cnt, 1)
            return res
        finally:
            self.train(was)

    @staticmethod
    def _seq_mask(out, y, lengths):
        """Many-to-many with lengths: steps past a sequence's length do not count."""
        if lengths is None or out.ndim < 3 or y.ndim < 2:
            return None
        valid = np.arange(y.shape[1])[None, :] < np.asarray(lengths)[:, None]   # (B, T)
        if y.dtype.kind in "iu":
            return valid
        return np.broadcast_to(valid.reshape(valid.shape + (1,) * (y.ndim - 2)), y.shape)

    # training ----------------------------------------------------------------
    def fit(self, X, Y, loss="cross_entropy", optimizer=None, epochs=10, batch_size=64, bptt=None,
            clip_norm=5.0, validation_data=None, progress=True, lengths=None, shuffle=True,
            seed=None):
        """Trains on (X, Y) with shuffled, seeded mini-batches. bptt=k cuts each batch's
        sequences into chunks of k steps and carries the state across chunks without
        gradient (truncated BPTT). Returns a History."""
        X = np.asarray(X)
        Y = np.asarray(Y)
        if len(X) != len(Y):
            raise ValueError(f"Y: expected {len(X)} items (as many as X), got {len(Y)}")
        if len(X) == 0:
            raise ValueError("X: expected at least one training item")
        if bptt is not None:
            bptt = check_int(bptt, "bptt")
            if lengths is not None:
                raise ValueError("bptt: truncated BPTT needs equal-length sequences (lengths=None)")
            if X.ndim < 2 or Y.ndim < 2 or Y.shape[1] != X.shape[1]:
                raise ValueError("bptt: expected many-to-many data, X (N, T, ...) and Y (N, T, ...)")
        if validation_data is not None and not isinstance(validation_data, (tuple, list)):
            raise TypeError("validation_data: expected a tuple (X_val, Y_val[, lengths_val])")
        data = (X, Y, None if lengths is None else np.asarray(lengths))
        self._bptt = bptt
        tokens = X.shape[1] if X.ndim >= 2 else 1
        return self._fit_loop(data, len(X), loss, optimizer, epochs, batch_size, clip_norm,
                              validation_data, progress, seed, shuffle, tokens)

    @staticmethod
    def _slice(data, idx):
        X, Y, L = data
        return X[idx], Y[idx], (None if L is None else L[idx])

    def _batch_loss(self, batch, loss_fn, train, update):
        xb, yb, lb = batch
        T = xb.shape[1] if xb.ndim >= 2 else 1
        k = self._bptt or T
        states = None
        tot = cnt = cor = 0.0
        acc_seen = False
        for s in range(0, T, k):
            xc = xb[:, s:s + k] if self._bptt else xb
            yc = yb[:, s:s + k] if self._bptt else yb
            out, states = self.forward(xc, lb, states)
            if self._bptt:   # carry the state, not its gradient
                states = [tuple(np.copy(a) for a in st) if isinstance(st, tuple) else np.copy(st)
                          for st in states]
            mask = self._seq_mask(out, yc, lb)
            if mask is not None:
                l, g = loss_fn(out, yc, mask=mask, return_grad=True)
            else:
                l, g = loss_fn(out, yc, return_grad=True)
            self.backward(g, input_grad=False)
            update()
            c = _count(out, yc, mask)
            tot += l * c
            cnt += c
            if loss_fn is _losses.cross_entropy:
                a = _accuracy(out, yc, mask)
                if a is not None:
                    acc_seen = True
                    cor += a[0] * c
        return tot / max(cnt, 1), cnt, (cor if acc_seen else None)

    # sampling ------------------------------------------------------------------
    def generate(self, prime, steps, temperature=1.0, seed=None):
        """One-to-many sampling from a token model: feeds `prime` (a sequence of ids), then
        samples `steps` ids, each fed back as the next input. temperature=0 is greedy.
        Returns the sampled ids (np.int64 array of length steps)."""
        steps = check_int(steps, "steps", minimum=0)
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        prime = np.asarray(prime, dtype=np.int64).reshape(-1)
        if prime.size == 0:
            raise ValueError("prime: expected at least one token id")
        rng = _random.rng(seed)
        was = self.training
        self.eval()
        try:
            out, states = self._run(prime[None, :], None, None, keep=False)
            res = np.empty(steps, np.int64)
            for i in range(steps):
                logits = np.asarray(out[0, -1] if out.ndim == 3 else out[0], dtype=np.float64)
                if temperature == 0:
                    tok = int(np.argmax(logits))
                else:
                    z = logits / temperature
                    p = np.exp(z - z.max())
                    p /= p.sum()
                    # Generator.choice(len(p), p=p)'s own draw without its checks of p (they
                    # took 7 of a sampled character's ~55 us): the same token from the same number
                    cdf = p.cumsum()
                    if not np.isfinite(cdf[-1]):
                        raise ValueError("generate: the model's outputs are not finite (NaN or inf "
                                         "logits); cannot sample from them")
                    cdf /= cdf[-1]
                    tok = int(cdf.searchsorted(rng.random(), side="right"))
                res[i] = tok
                out, states = self._run(np.array([[tok]]), None, states, keep=False, stream=True)
            return res
        finally:
            self.train(was)

    def config(self):
        return {"blocks": [{"type": type(b).__name__, "config": b.config()} for b in self.blocks]}


def _count(out, y, mask):
    """How many loss terms a batch averaged over (to weight batch means into epoch means)."""
    return float(np.sum(mask)) if mask is not None else float(np.size(y))


_CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


class Seq2Seq(_Trainable):
    """Encoder-decoder for many-to-many tasks of different lengths (translation style).
    The decoder starts from the encoder's final state; fit uses teacher forcing with
    targets that begin with a BOS id; translate decodes greedily (beam=1) or by beam search."""

    def __init__(self, src_vocab, tgt_vocab, embed=64, hidden=256, cell="lstm", num_layers=1,
                 seed=None, dtype="float32"):
        if cell not in _CELLS:
            raise ValueError(f"cell: expected one of {sorted(_CELLS)}, got {cell!r}")
        self.src_vocab, self.tgt_vocab = check_int(src_vocab, "src_vocab"), check_int(tgt_vocab, "tgt_vocab")
        self.embed, self.hidden = check_int(embed, "embed"), check_int(hidden, "hidden")
        self.cell, self.num_layers = cell, check_int(num_layers, "num_layers")
        ss = _random.seed_sequence(seed)
        s = [int(c.generate_state(1)[0]) for c in ss.spawn(5)]
        C = _CELLS[cell]
        self.src_embedding = Embedding(src_vocab, embed, seed=s[0], dtype=dtype)
        self.encoder = C(embed, hidden, num_layers, batch_first=True, seed=s[1], dtype=dtype)
        self.tgt_embedding = Embedding(tgt_vocab, embed, seed=s[2], dtype=dtype)
        self.decoder = C(embed, hidden, num_layers, batch_first=True, seed=s[3], dtype=dtype)
        self.out = Dense(hidden, tgt_vocab, seed=s[4], dtype=dtype)
        self.training = True
        self.loss = "cross_entropy"
        self._build_params(self._named_parts())

    _names = ("src_embedding", "encoder", "tgt_embedding", "decoder", "out")

    def _parts(self):
        return [getattr(self, k) for k in self._names]

    def _named_parts(self):
        return [(k, getattr(self, k)) for k in self._names]

    def config(self):
        return {"src_vocab": self.src_vocab, "tgt_vocab": self.tgt_vocab, "embed": self.embed,
                "hidden": self.hidden, "cell": self.cell, "num_layers": self.num_layers,
                "dtype": self.out.dtype.name}

    def _encode(self, src, src_lengths, keep):
        e = (self.src_embedding.forward if keep else self.src_embedding)(src)
        _, st = (self.encoder.forward if keep else self.encoder)(e, None, src_lengths)
        return st

    def fit(self, src, tgt, optimizer=None, epochs=10, batch_size=64, clip_norm=5.0,
            validation_data=None, progress=True, src_lengths=None, pad=None, seed=None,
            shuffle=True):
        """Teacher forcing: the decoder reads tgt[:, :-1] and learns tgt[:, 1:]. tgt must
        start with the BOS id; positions whose target equals `pad` do not count."""
        src = np.asarray(src)
        tgt = np.asarray(tgt)
        if src.ndim != 2 or tgt.ndim != 2:
            raise ValueError(f"src, tgt: expected (N, T) token arrays, got {shape_str(src.shape)} and {shape_str(tgt.shape)}")
        if len(src) != len(tgt):
            raise ValueError(f"tgt: expected {len(src)} items (as many as src), got {len(tgt)}")
        if tgt.shape[1] < 2:
            raise ValueError("tgt: expected at least two steps (BOS and one target)")
        self._pad = pad
        data = (src, tgt, None if src_lengths is None else np.asarray(src_lengths))
        return self._fit_loop(data, len(src), "cross_entropy", optimizer, epochs, batch_size,
                              clip_norm, validation_data, progress, seed, shuffle, tgt.shape[1])

    _slice = staticmethod(Sequential._slice)

    def _batch_loss(self, batch, loss_fn, train, update):
        src, tgt, sl = batch
        st = self._encode(src, sl, keep=True)
        d = self.tgt_embedding.forward(tgt[:, :-1])
        y, _ = self.decoder.forward(d, st)
        logits = self.out.forward(y)
        target = tgt[:, 1:]
        l, g = _losses.cross_entropy(logits, target, ignore_index=self._pad, return_grad=True)
        dy = self.out.backward(g)
        dd, dst = self.decoder.backward(dy)
        self.tgt_embedding.backward(dd)
        de, _ = self.encoder.backward(None, dst)
        self.src_embedding.backward(de)
        update()
        acc, n = _accuracy(logits, target, ignore_index=self._pad)
        return l, n, acc * n

    def evaluate(self, src, tgt, src_lengths=None, batch_size=256):
        was = self.training
        self.eval()
        try:
            tot = cnt = cor = 0.0
            for s in range(0, len(src), batch_size):
                sb, tb = np.asarray(src[s:s + batch_size]), np.asarray(tgt[s:s + batch_size])
                sl = None if src_lengths is None else np.asarray(src_lengths)[s:s + batch_size]
                st = self._encode(sb, sl, keep=False)
                y, _ = self.decoder(self.tgt_embedding(tb[:, :-1]), st)
                logits = self.out(y)
                pad = getattr(self, "_pad", None)
                l = _losses.cross_entropy(logits, tb[:, 1:], ignore_index=pad)
                a, n = _accuracy(logits, tb[:, 1:], ignore_index=pad)
                tot += l * n
                cnt += n
                cor += a * n
            return {"loss": tot / max(cnt, 1), "accuracy": cor / max(cnt, 1)}
        finally:
            self.train(was)

    def translate(self, src, max_len, bos, eos, beam=1, src_lengths=None):
        """Decodes each source sequence; returns a list of id lists (without BOS, up to and
        excluding EOS). beam=1 is greedy decoding."""
        src = np.asarray(src)
        single = src.ndim == 1
        if single:
            src = src[None]
        max_len = check_int(max_len, "max_len")
        beam = check_int(beam, "beam")
        was = self.training
        self.eval()
        try:
            st = self._encode(src, src_lengths, keep=False)
            if beam == 1:
                res = self._greedy(st, len(src), max_len, bos, eos)
            else:
                res = [self._beam(_take_state(st, i), max_len, bos, eos, beam) for i in range(len(src))]
            return res[0] if single else res
        finally:
            self.train(was)

    def _step(self, tokens, st):
        # the decoder's streaming step: st belongs to the decoding loop (it is overwritten)
        y, st = self.decoder.step(self.tgt_embedding(np.asarray(tokens)[:, None])[:, 0], st)
        z = self.out(y).astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True)), st

    def _greedy(self, st, B, max_len, bos, eos):
        tok = np.full(B, bos)
        out = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        for _ in range(max_len):
            logp, st = self._step(tok, st)
            tok = logp.argmax(-1)
            for b in range(B):
                if not done[b]:
                    if tok[b] == eos:
                        done[b] = True
                    else:
                        out[b].append(int(tok[b]))
            if done.all():
                break
        return out

    def _beam(self, st, max_len, bos, eos, K):
        beams = [(0.0, [], st)]
        finished = []
        for _ in range(max_len):
            toks = np.array([b[1][-1] if b[1] else bos for b in beams])
            states = _stack_states([b[2] for b in beams])
            logp, new = self._step(toks, states)
            cand = []
            for i, (score, seq, _) in enumerate(beams):
                for t in np.argsort(logp[i])[::-1][:K]:
                    cand.append((score + float(logp[i, t]), seq + [int(t)], i))
            cand.sort(key=lambda c: -c[0])
            beams = []
            for score, seq, i in cand:
                if seq[-1] == eos:
                    finished.append((score, seq[:-1]))
                else:
                    beams.append((score, seq, _take_state(new, i)))
                if len(beams) == K:
                    break
            if not beams or (len(finished) >= K and max(f[0] for f in finished) >= beams[0][0]):
                break
        finished.extend((s, q) for s, q, _ in beams)
        return max(finished, key=lambda f: f[0])[1]


def _take_state(st, i):
    if isinstance(st, tuple):
        return tuple(a[:, i:i + 1] for a in st)
    return st[:, i:i + 1]


def _stack_states(states):
    if isinstance(states[0], tuple):
        return tuple(np.ascontiguousarray(np.concatenate([s[j] for s in states], axis=1))
                     for j in range(len(states[0])))
    return np.ascontiguousarray(np.concatenate(states, axis=1))
