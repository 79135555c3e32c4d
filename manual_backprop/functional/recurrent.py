"""Recurrent layers on the rules of `rules.recurrent`: the functional twins of torch.lstm, torch.gru,
torch.rnn_tanh and torch.rnn_relu (every layer and direction, packed sequences, dropout between layers) and
of their one-step cells."""

from __future__ import annotations

import torch

from manual_backprop import _checks, rules
from manual_backprop._amp import autocast_nested, recurrent_autocast_name
from manual_backprop._checks import InputError, shape
from manual_backprop.functional.dropout import dropout
from manual_backprop.rules._apply import apply_rule


def _recurrent_checks(op: str, x: torch.Tensor, h0: torch.Tensor, params: list, stride: int, layers: int, D: int):
    if len(params) != layers * D * stride:
        raise InputError(
            f"{op}: expected {layers * D * stride} parameter tensors ({layers} layer(s) × {D} direction(s) × "
            f"{stride}), got {len(params)}"
        )
    if h0.dim() != 3 or h0.shape[0] != layers * D:
        raise InputError(f"{op}: hx must have shape ({layers * D}, N, H) for {layers} layer(s) × {D} direction(s), "
                         f"got {shape(h0)}")
    if x.shape[-1] != params[0].shape[1]:
        raise InputError(f"{op}: input's last dimension must equal input_size={params[0].shape[1]}, "
                         f"got input of shape {shape(x)}")
    for p in params:
        if p.dtype != x.dtype:
            _checks.same_dtype(op, input=x, weight=p)


def _recurrent(op: str, input, batch_sizes, hx, params, has_biases, num_layers, dropout_p, train, bidirectional,
               batch_first, feedback=None, between=None):
    """Every layer and direction of torch's `_VF.<op>` on our rules (`rules.recurrent`): layer l + 1 reads
    layer l's output (both directions side by side), with dropout between layers drawn as torch draws it.
    feedback: None (backprop), or a learning rule's B for each weight in `params` (None for biases).
    between: None, or `between(l, x) → x` applied to what layer l + 1 reads (layer l's output after dropout),
    laid out as the call's output is ((T, N, ·), (N, T, ·) if batch_first, or a PackedSequence's data rows):
    where direct feedback alignment sends e B(l) to each inner layer."""
    lstm = op == "lstm"
    h0, c0 = hx if lstm else (hx, None)
    proj = lstm and h0.shape[-1] != c0.shape[-1]
    D, stride, params = 2 if bidirectional else 1, 2 + 2 * bool(has_biases) + proj, list(params)
    _recurrent_checks(op, input, h0, params, stride, num_layers, D)
    if batch_sizes is None:
        if input.dim() != 3:
            raise InputError(f"{op}: input must be 3-D (seq, batch, feature), got shape {shape(input)}")
        x = input.transpose(0, 1) if batch_first else input
        T, N = x.shape[:2]
        sizes, x = (N,) * T, x.reshape(T * N, x.shape[2])
    else:
        sizes, x = tuple(batch_sizes.tolist()), input
    if h0.shape[1] != sizes[0] or (lstm and c0.shape[:2] != h0.shape[:2]):
        raise InputError(f"{op}: hx must have batch size {sizes[0]}, got {shape(h0)}"
                         + (f" and {shape(c0)}" if lstm else ""))
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(D):
            k = layer * D + direction
            W_ih, W_hh, *rest = params[k * stride : (k + 1) * stride]
            b_ih, b_hh = rest[:2] if has_biases else (None, None)
            Bs = None if feedback is None else tuple(B for B in feedback[k * stride : (k + 1) * stride] if B is not None)
            name, reverse = f"_l{layer}" + ("_reverse" if direction else ""), direction == 1
            if lstm:
                out, h, c, _, _ = apply_rule(rules.LSTMLayer, x, h0[k], c0[k], W_ih, W_hh, b_ih, b_hh,
                                             rest[-1] if proj else None, sizes, reverse, name, Bs)
                c_n.append(c)
            elif op == "gru":
                out, h, _ = apply_rule(rules.GRULayer, x, h0[k], W_ih, W_hh, b_ih, b_hh, sizes, reverse, name, Bs)
            else:
                out, h = apply_rule(rules.RNNLayer, x, h0[k], W_ih, W_hh, b_ih, b_hh, op == "rnn_relu", sizes,
                                    reverse, name, Bs)
            outputs.append(out)
            h_n.append(h)
        x = outputs[0] if D == 1 else torch.cat(outputs, 1)
        if dropout_p and train and layer < num_layers - 1:  # torch: at::dropout on the layer's whole output
            x = dropout(x, dropout_p, True)
        if between is not None and layer < num_layers - 1:
            x = _between(between, layer, x, None if batch_sizes is not None else (T, N), batch_first)
    if batch_sizes is None:
        x = x.view(T, N, x.shape[1])
        x = x.transpose(0, 1) if batch_first else x
    return (x, torch.stack(h_n), torch.stack(c_n)) if lstm else (x, torch.stack(h_n))


def _between(between, layer: int, x: torch.Tensor, steps_and_batch: tuple | None, batch_first: bool):
    """`between(layer, x)` on x laid out as the call's output (rows of a PackedSequence's data as they are)."""
    if steps_and_batch is None:
        return between(layer, x)
    T, N = steps_and_batch
    y = x.view(T, N, x.shape[1])
    y = between(layer, y.transpose(0, 1) if batch_first else y)
    return (y.transpose(0, 1) if batch_first else y).reshape(T * N, y.shape[-1])


def _recurrent_overloads(op: str):
    def call(*args, **kwargs):
        # torch's two overloads: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
        # batch_first) and, for a PackedSequence, (data, batch_sizes, hx, params, has_biases, num_layers,
        # dropout, train, bidirectional); the fourth argument (has_biases or params) tells them apart.
        packed = not isinstance(args[3], bool)
        args = autocast_nested(recurrent_autocast_name(op, args), args[0].device, args)  # torch's autocast policy for the op
        if not packed:
            return _recurrent(op, args[0], None, *args[1:], **kwargs)
        return _recurrent(op, *args, False, **kwargs)

    call.__name__ = call.__qualname__ = op
    call.__doc__ = (
        f"torch.{op} on our rules: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, "
        "batch_first), or (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, "
        "bidirectional) for a PackedSequence's data. params: per layer and direction W_ih, W_hh[, b_ih, b_hh]"
        + ("[, W_hr]; hx = (h0, c0). Returns (output, h_n, c_n)." if op == "lstm" else "; hx = h0. Returns (output, h_n).")
    )
    return call


lstm = _recurrent_overloads("lstm")
gru = _recurrent_overloads("gru")
rnn_tanh = _recurrent_overloads("rnn_tanh")
rnn_relu = _recurrent_overloads("rnn_relu")


def _cell_checks(op: str, input: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor) -> None:
    if input.dim() != 2 or h.dim() != 2 or h.shape[0] != input.shape[0] or input.shape[1] != w_ih.shape[1]:
        raise InputError(f"{op}: input must be (N, input_size={w_ih.shape[1]}) and hx (N, hidden_size), "
                         f"got input {shape(input)} and hx {shape(h)}")


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
    """One LSTM step (`rules.LSTMLayer` with T = 1). input: (N, in); hx = (h, c), each (N, H). Returns (h', c').
    feedback: None (backprop) or a learning rule's (B_ih, B_hh)."""
    _cell_checks("lstm_cell", input, hx[0], w_ih)
    input, hx, w_ih, w_hh, b_ih, b_hh = autocast_nested("lstm_cell", input.device, (input, hx, w_ih, w_hh, b_ih, b_hh))
    _, h, c, _, _ = apply_rule(rules.LSTMLayer, input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, None,
                               (input.shape[0],), False, "", feedback)
    return h, c


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
    """One GRU step (`rules.GRULayer` with T = 1). input: (N, in); hx: (N, H). Returns h'.
    feedback: None (backprop) or a learning rule's (B_ih, B_hh)."""
    _cell_checks("gru_cell", input, hx, w_ih)
    input, hx, w_ih, w_hh, b_ih, b_hh = autocast_nested("gru_cell", input.device, (input, hx, w_ih, w_hh, b_ih, b_hh))
    return apply_rule(rules.GRULayer, input, hx, w_ih, w_hh, b_ih, b_hh, (input.shape[0],), False, "", feedback)[1]


def _rnn_cell(op: str, relu: bool):
    def cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, feedback=None):
        _cell_checks(op, input, hx, w_ih)
        input, hx, w_ih, w_hh, b_ih, b_hh = autocast_nested(op, input.device, (input, hx, w_ih, w_hh, b_ih, b_hh))
        return apply_rule(rules.RNNLayer, input, hx, w_ih, w_hh, b_ih, b_hh, relu, (input.shape[0],), False, "",
                          feedback)[1]

    cell.__name__ = cell.__qualname__ = op
    cell.__doc__ = f"One RNN step, h' = {'relu' if relu else 'tanh'}(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh) (`rules.RNNLayer`, T = 1)."
    return cell


rnn_tanh_cell = _rnn_cell("rnn_tanh_cell", relu=False)
rnn_relu_cell = _rnn_cell("rnn_relu_cell", relu=True)
