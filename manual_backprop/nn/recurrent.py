"""Recurrent layers on our rules: RNN, LSTM, GRU and their cells.

Each subclasses its torch module and overrides `forward` only, which runs torch's own `forward`
(its checks, default states, unbatched inputs, PackedSequence sorting and packing, exactly as
torch does them) with the one call at its end, `_VF.lstm` / `_VF.gru` / `_VF.rnn_tanh` / … ,
sent to `manual_backprop.functional`'s twin of the same signature. `flatten_parameters` is a
no-op: it packs the weights into one cuDNN buffer, which our rules do not read. Under autocast the
call's tensors are cast as autocast casts torch's (`_amp`'s policy for lstm, gru, rnn_* and the cells).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from manual_backprop import functional as F
from manual_backprop import observe
from manual_backprop._amp import autocast_nested, autocast_on, recurrent_autocast_name

# The calls torch's recurrent modules end in (`torch._VF.x` is `torch.x`), and our twins.
RECURRENT_CALLS = {
    torch.lstm: F.lstm,
    torch.gru: F.gru,
    torch.rnn_tanh: F.rnn_tanh,
    torch.rnn_relu: F.rnn_relu,
    torch.lstm_cell: F.lstm_cell,
    torch.gru_cell: F.gru_cell,
    torch.rnn_tanh_cell: F.rnn_tanh_cell,
    torch.rnn_relu_cell: F.rnn_relu_cell,
}


class _OnOurRules(TorchFunctionMode):
    """While torch's forward runs: its recurrent call goes to ours (`calls`), every other call to torch."""

    def __init__(self, calls: dict) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ours = self.calls.get(func)
        if ours is None:
            return func(*args, **(kwargs or {}))
        if autocast_on():  # cast as autocast casts torch's op (a cast is a no-op on a tensor cast already)
            args = autocast_nested(recurrent_autocast_name(func.__name__, args), args[0].device, args)
        return ours(*args, **(kwargs or {}))


class _Recurrent:
    """forward = torch's forward on our rules; flatten_parameters does nothing (no cuDNN buffer)."""

    def recurrent_calls(self, input) -> dict:
        """torch's recurrent call → ours, for this input (a learning rule's module sends its B along here)."""
        return RECURRENT_CALLS

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):  # which sample each packed row is, for per-sample gradients
            observe.packed_samples(input.sorted_indices)
        with _OnOurRules(self.recurrent_calls(input)):
            return super().forward(input, hx)

    def flatten_parameters(self) -> None:
        return None


class RNN(_Recurrent, torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) whose backward runs through time by the notes' recursion (`rules.RNNLayer`)."""


class LSTM(_Recurrent, torch.nn.LSTM):
    """torch.nn.LSTM (proj_size too) whose backward is `rules.LSTMLayer`'s recursion in time."""


class GRU(_Recurrent, torch.nn.GRU):
    """torch.nn.GRU whose backward is `rules.GRULayer`'s recursion in time."""


class RNNCell(_Recurrent, torch.nn.RNNCell):
    """torch.nn.RNNCell: one step of `rules.RNNLayer`."""


class LSTMCell(_Recurrent, torch.nn.LSTMCell):
    """torch.nn.LSTMCell: one step of `rules.LSTMLayer`."""


class GRUCell(_Recurrent, torch.nn.GRUCell):
    """torch.nn.GRUCell: one step of `rules.GRULayer`."""
