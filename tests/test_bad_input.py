"""Bad input gives a ValueError or TypeError naming the argument, the expected and the
received, and never crashes: each case runs in a child process, so a segfault or an abort
fails the test instead of killing the run."""
import pytest

from conftest import run_child

PRELUDE = """
import numpy as np, rnncore
from rnncore import _core
def expect(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        print("RAISED", type(e).__name__, "|", e)
    else:
        print("NO ERROR")
"""

# name: (code calling expect(...), exception type, substrings the message must contain)
CASES = {
    "input_size": ("expect(lambda: rnncore.RNN(4, 6)(np.zeros((5, 2, 3))))",
                   "ValueError", ["x", "(T, B, 4)", "(5, 2, 3)"]),
    "input_size_batch_first": ("expect(lambda: rnncore.GRU(4, 6, batch_first=True)(np.zeros((2, 5, 3))))",
                               "ValueError", ["x", "(B, T, 4)", "(2, 5, 3)"]),
    "rank_1": ("expect(lambda: rnncore.LSTM(4, 6)(np.zeros(4)))", "ValueError", ["x", "3-D", "(4,)"]),
    "rank_4": ("expect(lambda: rnncore.LSTM(4, 6)(np.zeros((2, 2, 2, 4))))", "ValueError",
               ["x", "(2, 2, 2, 4)"]),
    "empty_sequence": ("expect(lambda: rnncore.RNN(4, 6)(np.zeros((0, 2, 4))))", "ValueError",
                       ["x", "(0, 2, 4)"]),
    "h0_shape": ("expect(lambda: rnncore.GRU(4, 6, num_layers=2)(np.zeros((5, 3, 4)), np.zeros((1, 3, 6))))",
                 "ValueError", ["h0", "(2, 3, 6)", "(1, 3, 6)"]),
    "c0_shape": ("expect(lambda: rnncore.LSTM(4, 6, proj_size=2)(np.zeros((5, 3, 4)), (np.zeros((1, 3, 2)), np.zeros((1, 3, 2)))))",
                 "ValueError", ["c0", "(1, 3, 6)", "(1, 3, 2)"]),
    "h0_proj_shape": ("expect(lambda: rnncore.LSTM(4, 6, proj_size=2)(np.zeros((5, 3, 4)), (np.zeros((1, 3, 6)), None)))",
                      "ValueError", ["h0", "(1, 3, 2)", "(1, 3, 6)"]),
    "lstm_state_not_tuple": ("expect(lambda: rnncore.LSTM(4, 6)(np.zeros((5, 3, 4)), np.zeros((1, 3, 6))))",
                             "TypeError", ["state", "(h0, c0)"]),
    "complex": ("expect(lambda: rnncore.RNN(2, 3)(np.zeros((3, 1, 2), complex)))", "TypeError",
                ["x", "complex128"]),
    "strings": ("expect(lambda: rnncore.RNN(2, 3)(np.array([[['a', 'b']]])))", "TypeError", ["x", "<U1"]),
    "objects": ("expect(lambda: rnncore.RNN(2, 3)(np.array([[[None, 1]]], dtype=object)))", "TypeError",
                ["x", "object"]),
    "ragged": ("expect(lambda: rnncore.RNN(2, 3)([[[1, 2]], [[1]]]))", "TypeError", ["x"]),
    "lengths_zero": ("expect(lambda: rnncore.LSTM(2, 3)(np.zeros((5, 2, 2)), lengths=[0, 5]))",
                     "ValueError", ["lengths", "[1, 5]", "got 0"]),
    "lengths_too_long": ("expect(lambda: rnncore.GRU(2, 3)(np.zeros((5, 2, 2)), lengths=[6, 5]))",
                         "ValueError", ["lengths", "[1, 5]", "got 6"]),
    "lengths_negative": ("expect(lambda: rnncore.GRU(2, 3)(np.zeros((5, 2, 2)), lengths=[-1, 5]))",
                         "ValueError", ["lengths", "got -1"]),
    "lengths_shape": ("expect(lambda: rnncore.RNN(2, 3)(np.zeros((5, 2, 2)), lengths=[1, 2, 3]))",
                      "ValueError", ["lengths", "(2,)", "(3,)"]),
    "lengths_float": ("expect(lambda: rnncore.RNN(2, 3)(np.zeros((5, 2, 2)), lengths=[1.5, 2]))",
                      "TypeError", ["lengths", "float64"]),
    "backward_first": ("expect(lambda: rnncore.LSTM(2, 3).backward(np.zeros((5, 1, 3))))",
                       "ValueError", ["backward", "forward"]),
    "dy_shape": ("l = rnncore.GRU(2, 3, bidirectional=True); l.forward(np.zeros((5, 2, 2)))\n"
                 "expect(lambda: l.backward(np.zeros((5, 2, 3))))", "ValueError", ["dy", "(5, 2, 6)", "(5, 2, 3)"]),
    "dstate_shape": ("l = rnncore.LSTM(2, 3); l.forward(np.zeros((5, 2, 2)))\n"
                     "expect(lambda: l.backward(None, (np.zeros((1, 2, 3)), np.zeros((2, 2, 3)))))",
                     "ValueError", ["dstate[1]", "(1, 2, 3)", "(2, 2, 3)"]),
    "negative_input_size": ("expect(lambda: rnncore.RNN(-1, 4))", "ValueError", ["input_size", ">= 1", "-1"]),
    "zero_hidden": ("expect(lambda: rnncore.LSTM(3, 0))", "ValueError", ["hidden_size", "0"]),
    "zero_layers": ("expect(lambda: rnncore.GRU(3, 4, num_layers=0))", "ValueError", ["num_layers", "0"]),
    "float_hidden": ("expect(lambda: rnncore.GRU(3, 4.5))", "TypeError", ["hidden_size", "integer", "4.5"]),
    "negative_proj": ("expect(lambda: rnncore.LSTM(3, 4, proj_size=-2))", "ValueError", ["proj_size", "-2"]),
    "proj_too_big": ("expect(lambda: rnncore.LSTM(3, 4, proj_size=4))", "ValueError", ["proj_size", "hidden_size", "4"]),
    "huge": ("expect(lambda: rnncore.LSTM(3, 2**20))", "ValueError", ["sizes", "parameters"]),
    "nonlinearity": ("expect(lambda: rnncore.RNN(3, 4, nonlinearity='sigmoid'))", "ValueError",
                     ["nonlinearity", "'tanh' or 'relu'", "sigmoid"]),
    "dropout": ("expect(lambda: rnncore.LSTM(3, 4, dropout=1.5))", "ValueError", ["dropout", "[0, 1]", "1.5"]),
    "dtype": ("expect(lambda: rnncore.LSTM(3, 4, dtype='int32'))", "TypeError", ["dtype", "int32"]),
    "bool_flag": ("expect(lambda: rnncore.LSTM(3, 4, bidirectional='yes'))", "TypeError", ["bidirectional", "yes"]),
    "state_dict_names": ("l = rnncore.GRU(3, 4); sd = l.state_dict(); sd['weight_x'] = sd.pop('weight_ih_l0')\n"
                         "expect(lambda: l.load_state_dict(sd))", "ValueError",
                         ["missing keys: ['weight_ih_l0']", "unexpected keys: ['weight_x']"]),
    "state_dict_shapes": ("l = rnncore.LSTM(3, 4); sd = l.state_dict(); sd['bias_hh_l0'] = np.zeros(3)\n"
                          "expect(lambda: l.load_state_dict(sd))", "ValueError", ["bias_hh_l0", "(16,)", "(3,)"]),
    "state_dict_type": ("expect(lambda: rnncore.GRU(3, 4).load_state_dict([1, 2]))", "TypeError", ["state_dict"]),
    "step_input": ("expect(lambda: rnncore.LSTM(3, 4).step(np.zeros((2, 5))))", "ValueError", ["x_t", "(B, 3)", "(2, 5)"]),
    "step_state": ("l = rnncore.GRU(3, 4)\nexpect(lambda: l.step(np.zeros((2, 3)), np.zeros((1, 1, 4))))",
                   "ValueError", ["state", "(1, 2, 4)", "(1, 1, 4)"]),
    "cell_state": ("expect(lambda: rnncore.LSTMCell(3, 4)(np.zeros((2, 3)), (np.zeros((2, 4)), np.zeros((2, 5)))))",
                   "ValueError", ["state[1]", "(2, 4)", "(2, 5)"]),
    "param_assign": ("l = rnncore.RNN(3, 4)\ndef f(): l.params['weight_hh_l0'] = np.zeros((2, 2))\nexpect(f)",
                     "ValueError", ["weight_hh_l0", "(4, 4)", "(2, 2)"]),
    # The private core refuses what the Python layer would never pass, without crashing.
    "core_wrong_param_count": ("s = _core.LayerSpec(_core.CellType.LSTM, 3, 4)\n"
                               "expect(lambda: _core.forward(s, [], np.zeros((2, 1, 3), np.float32)))",
                               "ValueError", ["params", "expected 4", "got 0"]),
    "core_wrong_param_shape": ("s = _core.LayerSpec(_core.CellType.GRU, 3, 4)\n"
                               "p = [np.zeros((12, 3), np.float32), np.zeros((12, 5), np.float32), np.zeros(12, np.float32), np.zeros(12, np.float32)]\n"
                               "expect(lambda: _core.forward(s, p, np.zeros((2, 1, 3), np.float32)))",
                               "ValueError", ["weight_hh_l0", "(12, 4)", "(12, 5)"]),
    "core_noncontiguous": ("s = _core.LayerSpec(_core.CellType.RNN_TANH, 3, 4, bias=False)\n"
                           "p = [np.zeros((4, 3), np.float32), np.zeros((4, 8), np.float32)[:, ::2]]\n"
                           "expect(lambda: _core.forward(s, p, np.zeros((2, 1, 3), np.float32)))",
                           "TypeError", ["weight_hh_l0", "C-contiguous"]),
    "core_mixed_dtype": ("s = _core.LayerSpec(_core.CellType.RNN_TANH, 3, 4, bias=False)\n"
                         "p = [np.zeros((4, 3)), np.zeros((4, 4))]\n"
                         "expect(lambda: _core.forward(s, p, np.zeros((2, 1, 3), np.float32)))",
                         "TypeError", ["weight_ih_l0", "float32", "float64"]),
    "core_bad_lengths": ("s = _core.LayerSpec(_core.CellType.RNN_TANH, 3, 4, bias=False)\n"
                         "p = [np.zeros((4, 3), np.float32), np.zeros((4, 4), np.float32)]\n"
                         "expect(lambda: _core.forward(s, p, np.zeros((2, 1, 3), np.float32), None, None, np.array([9])))",
                         "ValueError", ["lengths", "got 9"]),
    "core_bad_packed": ("s = _core.LayerSpec(_core.CellType.RNN_TANH, 3, 4, bias=False)\n"
                        "p = [np.zeros((4, 3), np.float32), np.zeros((4, 4), np.float32)]\n"
                        "expect(lambda: _core.forward(s, p, np.zeros((2, 1, 3), np.float32), packed=5))",
                        "TypeError", ["packed", "PackedWeights or None", "int"]),
    "core_bad_bf16_packed": ("l = rnncore.GRU(3, 4)\n"
                             "expect(lambda: l._stepper.step(np.zeros((1, 3), np.float32), l.initial_state(1), 'x'))",
                             "TypeError", ["bf16_packed", "PackedWeights or None", "str"]),
    "core_cache_mismatch": ("a = rnncore.GRU(3, 4); b = rnncore.GRU(3, 5); a.forward(np.zeros((2, 1, 3)))\n"
                            "expect(lambda: _core.backward(b._spec, b._param_list(), a._ctx[0], None, None, None, list(b.grads.values())))",
                            "ValueError", ["cache", "configuration"]),
    "core_readonly_grads": ("a = rnncore.RNN(3, 4); a.forward(np.zeros((2, 1, 3)))\n"
                            "g = [v.copy() for v in a.grads.values()]\n"
                            "[x.setflags(write=False) for x in g]\n"
                            "expect(lambda: _core.backward(a._spec, a._param_list(), a._ctx[0], None, None, None, g))",
                            "ValueError", ["read-only"]),
    "so_input_size": ("expect(lambda: rnncore.SecondOrderRNN(3, 4)(np.zeros((5, 2, 2))))", "ValueError",
                      ["x", "(T, B, 3)", "(5, 2, 2)"]),
    "so_h0": ("expect(lambda: rnncore.SecondOrderRNN(3, 4, rank=2)(np.zeros((5, 2, 3)), np.zeros((3, 4))))",
              "ValueError", ["h0", "(2, 4)", "(3, 4)"]),
    "so_rank": ("expect(lambda: rnncore.SecondOrderRNN(3, 4, rank=0))", "ValueError", ["rank", "0"]),
    "so_huge": ("expect(lambda: rnncore.SecondOrderRNN(1000, 1000))", "ValueError", ["sizes", "rank"]),
    "so_backward_first": ("expect(lambda: rnncore.SecondOrderRNN(3, 4).backward(np.zeros((2, 1, 4))))",
                          "ValueError", ["backward", "forward"]),
    "so_lengths": ("expect(lambda: rnncore.SecondOrderRNN(3, 4)(np.zeros((5, 2, 3)), lengths=[0, 5]))",
                   "ValueError", ["lengths", "got 0"]),
    "hopfield_shape": ("expect(lambda: rnncore.Hopfield(8).recall(np.ones(7)))", "ValueError",
                       ["probe", "(8,)", "(7,)"]),
    "hopfield_values": ("expect(lambda: rnncore.Hopfield(4).store([[3, 1, 1, 1]]))", "ValueError", ["bipolar"]),
    "online_x_shape": ("m = rnncore.Sequential(rnncore.GRU(2, 3, dtype='float64'), rnncore.Dense(3, 1, dtype='float64'))\n"
                       "l = rnncore.OnlineLearner(m)\nexpect(lambda: l.step(np.zeros(3), [0.0]))", "ValueError",
                       ["x_t", "(2,)", "(3,)"]),
    "core_rtrl_bad_P": ("l = rnncore.GRU(2, 3, dtype='float64')\n"
                        "expect(lambda: _core.rtrl_step(l._spec, l._param_list(), np.zeros(2), np.zeros(3), None, np.zeros((3, 5))))",
                        "ValueError", ["P", "(3, 5)"]),
    "core_hopfield_readonly": ("W = np.zeros((4, 4)); W.setflags(write=False)\n"
                               "expect(lambda: _core.hopfield_store(W, np.ones((1, 4)), 0))", "ValueError", ["read-only"]),
    "core_so_bad_params": ("expect(lambda: _core.second_order_forward(3, 4, 0, [np.zeros((4, 4, 2)), np.zeros(4)], "
                           "np.zeros((2, 1, 3)), None, None, False))", "ValueError", ["weight", "(4, 4, 3)"]),
    "core_bad_spec": ("expect(lambda: _core.LayerSpec(_core.CellType.GRU, 3, 4, proj_size=2))",
                      "ValueError", ["proj_size", "LSTM"]),
    # the training helpers the Dense block, the optimizers, the losses and Embedding call
    "matmul_inner": ("expect(lambda: _core.matmul(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32)))",
                     "ValueError", ["b", "4 rows", "got 5"]),
    "matmul_dtypes": ("expect(lambda: _core.matmul(np.ones((3, 4)), np.ones((4, 2), np.float32)))",
                      "TypeError", ["b", "float64", "float32"]),
    "matmul_out_overlap": ("a = np.ones((4, 4), np.float32)\nexpect(lambda: _core.matmul(a, a, out=a))",
                           "ValueError", ["out", "overlaps"]),
    "matmul_out_shape": ("expect(lambda: _core.matmul(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), "
                         "out=np.zeros((2, 3), np.float32)))", "ValueError", ["out", "(3, 2)", "(2, 3)"]),
    "sum_squares_ints": ("expect(lambda: _core.sum_squares([np.ones(3, np.int8)]))", "TypeError",
                         ["arrays[0]", "int8"]),
    "adam_shapes": ("p = np.ones(8, np.float32)\nexpect(lambda: _core.adam_update(p, np.ones(7, np.float32), "
                    "np.zeros(8, np.float32), np.zeros(8, np.float32), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1))",
                    "ValueError", ["grad", "(8,)", "(7,)"]),
    "scatter_ids_out_of_range": ("expect(lambda: _core.scatter_add_rows(np.zeros((3, 2), np.float32), "
                                 "np.array([0, 2**40]), np.ones((2, 2), np.float32)))",
                                 "ValueError", ["ids", "[0, 3)", str(2**40)]),
    "xent_targets": ("expect(lambda: _core.softmax_xent(np.zeros((2, 3), np.float32), np.array([0, 9]), "
                     "np.ones(2, np.float32)))", "ValueError", ["targets", "[0, 2]", "9"]),
    "xent_loss_targets": ("expect(lambda: rnncore.losses.cross_entropy(np.zeros((2, 3), np.float32), [0, -5]))",
                          "ValueError", ["targets", "[0, 2]", "-5"]),
    "embedding_dy_shape": ("e = rnncore.Embedding(5, 3); y = e.forward(np.array([[1, 2]]))\n"
                           "expect(lambda: e.backward(np.ones((2, 1, 3))))", "ValueError", ["dy", "(1, 2, 3)", "(2, 1, 3)"]),
    "dense_x_shape": ("expect(lambda: rnncore.Dense(4, 2)(np.ones((3, 5))))", "ValueError", ["x", "(..., 4)", "(3, 5)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    code, etype, parts = CASES[case]
    out = run_child(PRELUDE + code)
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith(f"RAISED {etype} |"), line
    for p in parts:
        assert p in line, f"{p!r} not in {line!r}"


def test_nan_and_inf_inputs_do_not_crash():
    out = run_child(PRELUDE + """
x = np.full((4, 2, 3), np.nan); x[0, 0, 0] = np.inf
for l in (rnncore.RNN(3, 4), rnncore.LSTM(3, 4), rnncore.GRU(3, 4, num_layers=2)):
    y, _ = l.forward(x)
    l.backward(np.ones_like(y))
print("DONE")
""")
    assert out.returncode == 0 and out.stdout.strip().endswith("DONE"), out.stderr
