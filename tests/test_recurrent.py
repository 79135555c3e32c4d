"""Recurrent layers: RNN, LSTM, GRU and their cells against stock autograd, every option, float64 to 1e-12."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import manual_backprop as mb
import manual_backprop.functional as MF
import manual_backprop.nn as mnn
from manual_backprop._checks import InputError
from manual_backprop.plugins.feedback_alignment import feedback_buffers
from tests.cases import DEVICES

OUR_NODES = {"RNNLayerBackward", "LSTMLayerBackward", "GRULayerBackward"}
I, H, T, N = 3, 5, 6, 4
LENGTHS = [6, 2, 5, 3]  # unequal, unsorted: packing sorts them and must unsort the states


@dataclass(frozen=True)
class Case:
    name: str
    stock: type
    kwargs: dict = field(default_factory=dict)
    input: str = "padded"  # padded | batch_first | unbatched | packed
    hx: bool = True  # pass initial states that require grad
    train: bool = False  # dropout between layers is active only in training

    def __repr__(self) -> str:
        return self.name

    @property
    def cell(self) -> bool:
        return self.stock in (torch.nn.RNNCell, torch.nn.LSTMCell, torch.nn.GRUCell)

    @property
    def nodes(self) -> int:
        """Our rule nodes one forward must create: one per layer and direction."""
        return self.kwargs.get("num_layers", 1) * (1 + self.kwargs.get("bidirectional", False))


nn = torch.nn
CASES = []
for stock, extra in ((nn.RNN, {}), (nn.RNN, dict(nonlinearity="relu")), (nn.LSTM, {}), (nn.LSTM, dict(proj_size=2)), (nn.GRU, {})):
    tag = stock.__name__.lower() + ("_relu" if extra.get("nonlinearity") else "") + ("_proj" if "proj_size" in extra else "")
    CASES += [
        Case(f"{tag}", stock, dict(extra)),
        Case(f"{tag}_no_hx", stock, dict(extra), hx=False),
        Case(f"{tag}_2layers_bidirectional", stock, dict(extra, num_layers=2, bidirectional=True)),
        Case(f"{tag}_3layers_no_bias", stock, dict(extra, num_layers=3, bias=False)),
        Case(f"{tag}_batch_first", stock, dict(extra, batch_first=True, num_layers=2), input="batch_first"),
        Case(f"{tag}_unbatched", stock, dict(extra, bidirectional=True), input="unbatched"),
        Case(f"{tag}_packed", stock, dict(extra), input="packed"),
        Case(f"{tag}_packed_2layers_bidirectional", stock, dict(extra, num_layers=2, bidirectional=True), input="packed"),
        Case(f"{tag}_dropout", stock, dict(extra, num_layers=3, dropout=0.4, bidirectional=True), train=True),
        Case(f"{tag}_packed_dropout", stock, dict(extra, num_layers=2, dropout=0.3), input="packed", train=True),
    ]
for stock, extra in ((nn.RNNCell, {}), (nn.RNNCell, dict(nonlinearity="relu")), (nn.LSTMCell, {}), (nn.GRUCell, {})):
    tag = stock.__name__.lower() + ("_relu" if extra else "")
    CASES += [
        Case(tag, stock, dict(extra)),
        Case(f"{tag}_no_hx", stock, dict(extra), hx=False),
        Case(f"{tag}_no_bias", stock, dict(extra, bias=False)),
        Case(f"{tag}_unbatched", stock, dict(extra), input="unbatched"),
    ]


def ours_of(stock: type) -> type:
    return getattr(mnn, stock.__name__)


def _make(case: Case, module: torch.nn.Module, dtype, device, seed: int = 0):
    """(input as the module takes it, initial states or None, leaves that require grad)."""
    g = torch.Generator().manual_seed(seed)
    # drawn in float64 and rounded, so a float32 run sees the float64 run's values
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()  # noqa: E731
    batched = case.input != "unbatched"
    if case.cell:
        x = rand(N, I) if batched else rand(I)
        state = lambda: rand(N, H) if batched else rand(H)  # noqa: E731
        hx = None if not case.hx else (state(), state()) if case.stock is nn.LSTMCell else state()
    else:
        x = {"padded": lambda: rand(T, N, I), "batch_first": lambda: rand(N, T, I), "unbatched": lambda: rand(T, I),
             "packed": lambda: rand(T, N, I)}[case.input]()
        D = module.num_layers * (1 + module.bidirectional)
        h_size = module.proj_size if getattr(module, "proj_size", 0) else H
        shape = (D, N) if batched else (D,)
        hx = None
        if case.hx:
            hx = (rand(*shape, h_size), rand(*shape, H)) if case.stock is nn.LSTM else rand(*shape, h_size)
    leaves = [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])
    if case.input == "packed":
        x = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    return x, hx, leaves


def _outputs(result) -> list[torch.Tensor]:
    """Every tensor a recurrent module returns: output (a PackedSequence's data), h_n, c_n."""
    if isinstance(result, torch.Tensor):
        return [result]
    out, states = result if not isinstance(result[0], torch.Tensor) or len(result) == 2 and isinstance(result[1], (tuple, torch.Tensor)) else (result, ())
    if isinstance(out, tuple):  # LSTMCell: (h, c)
        return list(out)
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(states if isinstance(states, tuple) else [states])]


def run(case: Case, module: torch.nn.Module, dtype=torch.float64, device="cpu"):
    """Forward with the case's inputs (seeded, so dropout draws alike), then a non-degenerate loss:
    Σ of every output against a fixed random upstream. Returns (result, loss, grads of leaves and parameters)."""
    module.train(case.train)
    x, hx, leaves = _make(case, module, dtype, device)
    torch.manual_seed(7)
    result = module(x) if hx is None else module(x, hx)
    outs = _outputs(result)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return result, outs, loss, grads


def pair(case: Case, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    stock = case.stock(I, H, **case.kwargs).to(device, dtype)
    ours = ours_of(case.stock)(I, H, **case.kwargs).to(device, dtype)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if b.numel() else 0.0


def graph_nodes(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float64_parity_with_stock(case, device):
    """Outputs, loss and every gradient (input, h0/c0, each weight) within 1e-12 relative of stock autograd."""
    stock, ours = pair(case, device=device)
    r_stock, o_stock, l_stock, g_stock = run(case, stock, device=device)
    r_ours, o_ours, l_ours, g_ours = run(case, ours, device=device)
    assert [o.shape for o in o_ours] == [o.shape for o in o_stock]
    for a, b in zip(o_ours, o_stock):
        assert relative(a, b) <= 1e-12
    assert relative(l_ours, l_stock) <= 1e-12
    names = ["input", "h0", "c0"][: len(g_ours) - len(list(stock.parameters()))] + [n for n, _ in stock.named_parameters()]
    for name, a, b in zip(names, g_ours, g_stock):
        assert relative(a, b) <= 1e-12, f"gradient of {name}: {relative(a, b):.2e}"
    nodes = [n for n in graph_nodes(l_ours) if n in OUR_NODES]
    assert len(nodes) == case.nodes, f"expected {case.nodes} of our rule nodes, got {nodes}"
    if case.input == "packed":  # the packing is torch's: sizes and both permutations
        for a, b in zip(r_ours[0][1:], r_stock[0][1:]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "rnn_2layers_bidirectional", "rnn_relu_packed", "lstm_2layers_bidirectional", "lstm_proj_packed_2layers_bidirectional",
    "gru_2layers_bidirectional", "gru_packed", "lstmcell", "grucell", "rnncell")], ids=repr)
def test_float32_no_further_from_the_float64_truth_than_stock(case):
    stock, ours = pair(case)
    _, _, l_true, g_true = run(case, ours)
    err = {}
    for who, module in (("stock", stock), ("ours", ours)):
        module.float()
        _, _, loss, grads = run(case, module, dtype=torch.float32)
        err[who] = max(relative(a.double(), b) for a, b in zip((loss, *grads), (l_true, *g_true)))
    # the same float32 operations in another order: at these few ulps rounding differs case by case, never
    # by more than 2× (the test below holds ours to 1.2× where sums are long enough to tell orders apart)
    assert err["ours"] <= 2 * err["stock"], err


@pytest.mark.parametrize("stock_cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_float32_error_at_a_realistic_size_within_1_2x_stock(stock_cls):
    """T = 50 steps, batch 32, width 32, 2 layers, bidirectional: the largest relative error of the output
    and of every gradient against the float64 truth is at most 1.2× stock's float32 one (measured: LSTM
    0.3–0.6×, its weight and bias sums over all steps at once; GRU 0.9–1.0×; RNN 0.9–1.1×, over seeds)."""
    T, N, H = 50, 32, 32
    torch.manual_seed(0)
    stock = stock_cls(H, H, num_layers=2, bidirectional=True).double()
    ours = ours_of(stock_cls)(H, H, num_layers=2, bidirectional=True).double()
    ours.load_state_dict(stock.state_dict())
    x, upstream = torch.randn(T, N, H, dtype=torch.float64), torch.randn(T, N, 2 * H, dtype=torch.float64)

    def outputs_and_grads(module, dtype):
        x_ = x.to(dtype).requires_grad_()
        out, _ = module.to(dtype)(x_)
        return [out, *torch.autograd.grad((out * upstream.to(dtype)).sum(), [x_, *module.parameters()])]

    truth = outputs_and_grads(copy.deepcopy(stock), torch.float64)
    err = {who: max(relative(a.double(), b) for a, b in zip(outputs_and_grads(m, torch.float32), truth))
           for who, m in (("stock", stock), ("ours", ours))}
    assert OUR_NODES & set(graph_nodes(outputs_and_grads(ours, torch.float32)[0]))
    assert err["ours"] <= 1.2 * err["stock"], err


# ------------------------------------------------------------------ drop-in


@pytest.mark.parametrize("stock", [nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell], ids=lambda c: c.__name__)
def test_drop_in_module(stock):
    kwargs = dict(num_layers=2, bidirectional=True) if stock in (nn.RNN, nn.LSTM, nn.GRU) else {}
    torch.manual_seed(0)
    theirs = stock(I, H, **kwargs)
    ours = ours_of(stock)(I, H, **kwargs)
    assert isinstance(ours, stock) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.flatten_parameters() is None
    converted = mb.convert(torch.nn.Sequential(stock(I, H, **kwargs)))
    assert type(converted[0]) is ours_of(stock)


def test_convert_and_report_every_recurrent_module():
    model = torch.nn.ModuleDict(dict(rnn=nn.RNN(I, H), lstm=nn.LSTM(I, H, proj_size=2), gru=nn.GRU(I, H),
                                     cells=torch.nn.ModuleList([nn.RNNCell(I, H), nn.LSTMCell(I, H), nn.GRUCell(I, H)])))
    assert mb.report(model).manual_parameters == 0
    model = mb.convert(model)
    assert all(type(m).__module__ == "manual_backprop.nn.recurrent" for m in
               (model["rnn"], model["lstm"], model["gru"], *model["cells"]))
    report = mb.report(model)
    assert report.stock_parameters == 0 and report.manual_parameters == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------- functional


def _lstm_args(dtype=torch.float64, layers=2, bidirectional=True, proj=0, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional, proj_size=proj, bias=bias).to(dtype)
    D, Hr = layers * (1 + bidirectional), proj or H
    x = torch.randn(T, N, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(D, N, Hr, dtype=dtype, requires_grad=True)
    c0 = torch.randn(D, N, H, dtype=dtype, requires_grad=True)
    return m, x, h0, c0


def test_manual_functions_routes_a_stock_lstm_and_gru():
    m, x, h0, c0 = _lstm_args()
    gru = nn.GRU(I, H).double()
    with mb.manual_functions() as calls:
        out, (h, c) = m(x, (h0, c0))
        out2, _ = gru(x)
    assert calls.routed["lstm"] == 1 and calls.routed["gru"] == 1
    assert {"LSTMLayerBackward"} <= set(graph_nodes(out.sum() + h.sum() + c.sum()))
    stock_out, (stock_h, stock_c) = m(x, (h0, c0))
    for a, b in zip((out, h, c), (stock_out, stock_h, stock_c)):
        assert relative(a, b) <= 1e-12


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("op", ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"])
def test_gradcheck_and_gradgradcheck(op, packed):
    """Finite differences, first and second order, through every input of the functional form."""
    torch.manual_seed(0)
    kind = op.removesuffix("_proj")
    module = {"lstm": lambda: nn.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2 if op == "lstm_proj" else 0),
              "gru": lambda: nn.GRU(2, 3, bidirectional=True), "rnn_tanh": lambda: nn.RNN(2, 3, num_layers=2),
              "rnn_relu": lambda: nn.RNN(2, 3, nonlinearity="relu", bidirectional=True)}[kind]().double()
    weights = [p.detach().clone().requires_grad_() for p in module._flat_weights]
    D, Hr = module.num_layers * (1 + module.bidirectional), getattr(module, "proj_size", 0) or 3
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(D, 2, Hr, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(D, 2, 3, dtype=torch.float64, requires_grad=True)
    states = (h0, c0) if kind == "lstm" else (h0,)

    def f(x, *rest):
        hx = rest[:2] if kind == "lstm" else rest[0]
        params = list(rest[len(states):])
        fn = getattr(MF, kind)
        if packed:
            return fn(x.reshape(6, 2)[:5], torch.tensor([2, 2, 1]), hx, params, True, module.num_layers, 0.0, False,
                      module.bidirectional)
        return fn(x, hx, params, True, module.num_layers, 0.0, False, module.bidirectional, False)

    inputs = (x, *states, *weights)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("op", ["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"])
def test_cell_functionals_match_torch(op):
    torch.manual_seed(0)
    G = {"lstm_cell": 4, "gru_cell": 3}.get(op, 1) * H
    args = [torch.randn(N, I), torch.randn(N, H), torch.randn(G, I), torch.randn(G, H), torch.randn(G), torch.randn(G)]
    args = [a.double().requires_grad_() for a in args]
    hx = (args[1], torch.randn(N, H, dtype=torch.float64, requires_grad=True)) if op == "lstm_cell" else args[1]
    ours, stock = getattr(MF, op)(args[0], hx, *args[2:]), getattr(torch, op)(args[0], hx, *args[2:])
    ours, stock = (ours, stock) if op == "lstm_cell" else ((ours,), (stock,))
    leaves = args + ([hx[1]] if op == "lstm_cell" else [])
    g = [torch.autograd.grad(sum((o * o.new_tensor(range(o.numel())).view(o.shape)).sum() for o in out), leaves)
         for out in (ours, stock)]
    for a, b in zip(g[0], g[1]):
        assert relative(a, b) <= 1e-12
    assert type(ours[0].grad_fn).__name__ in OUR_NODES


def test_func_vmap_grad_per_sample_gradients():
    """torch.func.grad inside vmap runs our rules per sample; compared with stock autograd sample by sample."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    stock = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).double()
    ours = mnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).double()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(N, T, I, dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(params, sample):
        out, (h, c) = functional_call(ours, params, (sample.unsqueeze(0),))
        return out.square().sum() + h.sum() * c.sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for n in range(N):
        out, (h, c) = stock(x[n : n + 1])
        expected = torch.autograd.grad(out.square().sum() + h.sum() * c.sum(), list(stock.parameters()))
        for (name, got), want in zip(per_sample.items(), expected):
            assert relative(got[n], want) <= 1e-12, name


def test_saved_bytes_never_above_stock():
    """What our rules keep for backward, against what stock autograd keeps, for each kind of layer."""

    def saved_bytes(module, x, hx):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, hx)
        return sum(storages.values())

    for stock_cls, kwargs in ((nn.LSTM, dict(num_layers=2)), (nn.LSTM, dict(proj_size=3)), (nn.GRU, dict(bidirectional=True)),
                              (nn.RNN, {}), (nn.RNN, dict(nonlinearity="relu"))):
        torch.manual_seed(0)
        stock = stock_cls(8, 16, **kwargs).double()
        ours = ours_of(stock_cls)(8, 16, **kwargs).double()
        x = torch.randn(20, 8, 8, dtype=torch.float64, requires_grad=True)
        assert saved_bytes(ours, x, None) <= saved_bytes(stock, x, None), stock_cls


def test_bad_input_is_named():
    m, x, h0, c0 = _lstm_args()
    with pytest.raises(InputError, match="input_size=3"):
        MF.lstm(torch.randn(T, N, 7, dtype=torch.float64), (h0, c0), m._flat_weights, True, 2, 0.0, False, True, False)
    with pytest.raises(InputError, match=r"expected 16 parameter tensors"):
        MF.lstm(x, (h0, c0), m._flat_weights[:-1], True, 2, 0.0, False, True, False)
    with pytest.raises(InputError, match=r"batch size 4"):
        MF.lstm(x, (h0[:, :2], c0[:, :2]), m._flat_weights, True, 2, 0.0, False, True, False)
    with pytest.raises(InputError, match=r"input \(3, 7\)"):
        MF.gru_cell(torch.randn(3, 7), torch.randn(3, H), torch.randn(3 * H, I), torch.randn(3 * H, H))
    ours = mnn.GRU(I, H)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        ours(torch.randn(T, N, 7))  # torch's own module check runs first, as in the stock module


# ------------------------------------------------- torch.compile
# (torch's own ModuleInfo samples for these modules and the cells: tests/test_module_db.py)

@pytest.mark.parametrize("stock_cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_compile_aot_eager_same_gradients(stock_cls):
    """torch.compile traces our forward and backward into one graph (dynamo traces recurrent modules only
    with its allow_rnn switch; without it, it runs them eagerly, on our rules all the same)."""
    torch.manual_seed(0)
    stock = stock_cls(I, H, num_layers=2, bidirectional=True).double()
    ours = ours_of(stock_cls)(I, H, num_layers=2, bidirectional=True).double()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(T, N, I, dtype=torch.float64)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        results = [torch.compile(ours, backend="aot_eager", fullgraph=True)(x), stock(x)]
    for out, h in results:
        (out.square().sum() + (h[0] if isinstance(h, tuple) else h).sum()).backward()
    for (name, a), b in zip(ours.named_parameters(), stock.parameters()):
        assert relative(a.grad, b.grad) <= 1e-12, name


# ------------------------------------------------- per-sample gradients, DP-SGD, the tape


class Sequence(torch.nn.Module):
    """A recurrent layer (or a cell run over time) read out by a Linear at the last step: samples on dim 0."""

    def __init__(self, stock: type, **kwargs):
        super().__init__()
        self.cell = stock in (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
        self.rnn = stock(I, H, **kwargs) if self.cell else stock(I, H, batch_first=True, **kwargs)
        width = (kwargs.get("proj_size") or H) * (1 + kwargs.get("bidirectional", False))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        if not self.cell:
            return self.head(self.rnn(x)[0][:, -1])
        state = None
        for t in range(x.shape[1]):  # one module called T times: its per-sample gradient sums the calls
            state = self.rnn(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


PER_SAMPLE = [
    ("rnn_tanh_2layers_bidirectional", nn.RNN, dict(num_layers=2, bidirectional=True)),
    ("rnn_relu", nn.RNN, dict(nonlinearity="relu")),
    ("lstm_2layers_bidirectional", nn.LSTM, dict(num_layers=2, bidirectional=True)),
    ("lstm_proj", nn.LSTM, dict(proj_size=3)),
    ("gru_2layers_bidirectional", nn.GRU, dict(num_layers=2, bidirectional=True)),
    ("gru_no_bias", nn.GRU, dict(bias=False)),
    ("rnncell", nn.RNNCell, {}),
    ("lstmcell", nn.LSTMCell, {}),
    ("grucell", nn.GRUCell, {}),
]


def _per_sample_reference(stock: torch.nn.Module, x, y) -> dict:
    """{name: (N, *p.shape)}: each sample's own gradient, by stock autograd one sample at a time."""
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(stock(x[n : n + 1]), y[n : n + 1]),
                                 list(stock.parameters())) for n in range(x.shape[0])]
    return {name: torch.stack([g[i] for g in grads]) for i, (name, _) in enumerate(stock.named_parameters())}


def assert_per_sample_equal(model, ps, expected: dict, materialize: bool) -> None:
    """ps.norms, each p.grad_sample (materialized) and p.grad (the mean: loss_reduction "mean") against the
    per-sample gradients `expected` (name -> (N, *p.shape)), float64 to 1e-12."""
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    assert relative(ps.norms, norms) <= 1e-12
    for pname, p in model.named_parameters():
        if materialize:
            assert relative(p.grad_sample, expected[pname]) <= 1e-12, pname
        assert relative(p.grad, expected[pname].mean(0)) <= 1e-12, pname


@pytest.mark.parametrize("materialize", [True, False], ids=["materialize", "norms_only"])
@pytest.mark.parametrize("name,stock_cls,kwargs", PER_SAMPLE, ids=[c[0] for c in PER_SAMPLE])
def test_per_sample_grads_match_stock_sample_by_sample(name, stock_cls, kwargs, materialize):
    """Each sample's gradient is its outer products summed over its time steps; norms by the Gram identity."""
    torch.manual_seed(0)
    stock = Sequence(stock_cls, **kwargs).double()
    model = mb.convert(stock)
    x, y = torch.randn(N, T, I, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    expected = _per_sample_reference(stock, x, y)
    with mb.per_sample_grads(model, materialize=materialize) as ps:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert_per_sample_equal(model, ps, expected, materialize)


class PackedReadout(torch.nn.Module):
    """A recurrent layer on a PackedSequence (or on one padded sequence, (L, 1, I)), read out by a Linear from
    its output summed over time and its last layer's h_n: every step's δ comes from above and from t + 1."""

    def __init__(self, stock: type, **kwargs):
        super().__init__()
        self.rnn = stock(I, H, **kwargs)
        width = kwargs.get("proj_size") or H
        self.head = nn.Linear(width * (2 + kwargs.get("bidirectional", False)), 2)

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0] if isinstance(out, PackedSequence) else out
        return self.head(torch.cat((out.sum(0), h[-1]), 1))


PACKED_PER_SAMPLE = [
    ("rnn_tanh", nn.RNN, {}),
    ("lstm_2layers_bidirectional", nn.LSTM, dict(num_layers=2, bidirectional=True)),
    ("lstm_proj_bidirectional", nn.LSTM, dict(proj_size=3, bidirectional=True)),
    ("gru_2layers_bidirectional", nn.GRU, dict(num_layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("materialize", [True, False], ids=["materialize", "norms_only"])
@pytest.mark.parametrize("name,stock_cls,kwargs", PACKED_PER_SAMPLE, ids=[c[0] for c in PACKED_PER_SAMPLE])
def test_per_sample_grads_of_packed_sequences_of_unequal_lengths(name, stock_cls, kwargs, materialize):
    """Sequences of unequal lengths, packed unsorted: sample n's gradient sums over its own steps only (δ is
    zero past its end), in the batch's order, equal to stock autograd run on that sequence alone; the norms
    from the Gram identity equal the materialised gradients' norms."""
    torch.manual_seed(0)
    stock = PackedReadout(stock_cls, **kwargs).double()
    model = mb.convert(stock)
    x, y = torch.randn(T, N, I, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(stock(x[: LENGTHS[n], n : n + 1]), y[n : n + 1]),
                                 list(stock.parameters())) for n in range(N)]
    expected = {name: torch.stack([g[i] for g in grads]) for i, (name, _) in enumerate(stock.named_parameters())}
    with mb.per_sample_grads(model, materialize=materialize) as ps:
        packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        torch.nn.functional.cross_entropy(model(packed), y).backward()
    assert OUR_NODES & set(graph_nodes(model(packed)))
    assert_per_sample_equal(model, ps, expected, materialize)


@pytest.mark.parametrize("stock_cls,kwargs", [(nn.LSTM, dict(proj_size=3)), (nn.GRU, {}), (nn.RNN, {})],
                         ids=["lstm_proj", "gru", "rnn"])
def test_tape_keeps_each_weights_output(stock_cls, kwargs):
    """keep="output": each weight's Linear output over time, (T, N, ·): x_t W_ihᵀ + b_ih, h_{t−1} W_hhᵀ + b_hh
    (h_0 = 0) and, with proj_size, h_t = W_hr m_t itself, from stock's forward."""
    torch.manual_seed(0)
    stock = Sequence(stock_cls, **kwargs).double()
    model = mb.convert(stock)
    x, y = torch.randn(N, T, I, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with mb.tape(model, keep=("output",)) as tape:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    p = dict(stock.rnn.named_parameters())
    h = stock.rnn(x)[0].transpose(0, 1).detach()  # (T, N, ·)
    h_prev = torch.cat((torch.zeros_like(h[:1]), h[:-1]))
    want = {"rnn.ih_l0": torch.nn.functional.linear(x.transpose(0, 1), p["weight_ih_l0"], p["bias_ih_l0"]),
            "rnn.hh_l0": torch.nn.functional.linear(h_prev, p["weight_hh_l0"], p["bias_hh_l0"])}
    if "proj_size" in kwargs:
        want["rnn.hr_l0"] = h
    for key, value in want.items():
        assert relative(tape.output[key], value) <= 1e-12, key


def test_dp_sgd_step_on_an_lstm_clips_each_sample():
    """DP-SGD without noise: the update is Σₙ cₙ gₙ / N with cₙ from each sample's norm, computed without
    forming any per-sample gradient, equal to clipping stock's sample-by-sample gradients."""
    from manual_backprop import privacy

    torch.manual_seed(0)
    stock = Sequence(nn.LSTM, num_layers=2).double()
    model = mb.convert(stock)
    x, y = torch.randn(N, T, I, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    expected = _per_sample_reference(stock, x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    C = norms.median().item()
    with mb.per_sample_grads(model, materialize=False) as ps:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    factors = privacy.clip_and_noise_(ps, max_grad_norm=C, noise_multiplier=0.0)
    assert relative(factors, privacy.clip_factors(norms, C)) <= 1e-12
    for pname, p in model.named_parameters():
        want = torch.tensordot(privacy.clip_factors(norms, C), expected[pname], dims=1) / N
        assert relative(p.grad, want) <= 1e-12, pname


def test_tape_records_each_layer_and_direction_over_time():
    """Keys name the weight, layer and direction ("rnn.ih_l1_reverse"); δ is (T, N, gates) over time, and
    Σ_t Σ_n δz_t h_{t−1}ᵀ from the tape is the weight's gradient."""
    torch.manual_seed(0)
    model = mb.convert(Sequence(nn.LSTM, num_layers=2, bidirectional=True)).double()
    x, y = torch.randn(N, T, I, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with mb.tape(model) as tape:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    layers = [f"rnn.{w}_l{l}{d}" for l in (0, 1) for d in ("", "_reverse") for w in ("ih", "hh")]
    assert set(layers) <= set(tape.names)
    for key in layers:
        assert tape.delta[key].shape == (T, N, 4 * H)
        weight = dict(model.named_parameters())[key.replace("rnn.", "rnn.weight_")]
        a = tape.input[key]
        torch.testing.assert_close(torch.einsum("tng,tni->gi", tape.delta[key], a), weight.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ learning rules


def _unrolled(module: torch.nn.Module, x: torch.Tensor, Bs: dict) -> torch.Tensor:
    """One-layer, one-direction reference: the cell written out step by step with autograd for the gates and
    the feedback family's Linear rule (δ through B, `feedback_linear`) for each of x W_ihᵀ and h W_hhᵀ."""
    from manual_backprop.plugins.feedback_alignment import feedback_linear

    Hs = module.hidden_size
    h = c = x.new_zeros(x.shape[1], Hs)
    outs = []
    for x_t in x:
        zx = feedback_linear(x_t, module.weight_ih_l0, module.bias_ih_l0, Bs["ih_l0"])
        zh = feedback_linear(h, module.weight_hh_l0, module.bias_hh_l0, Bs["hh_l0"])
        if isinstance(module, nn.LSTM):
            i, f, g, o = (zx + zh).chunk(4, 1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
        elif isinstance(module, nn.GRU):
            r, u = (zx[:, : 2 * Hs] + zh[:, : 2 * Hs]).sigmoid().chunk(2, 1)
            n = (zx[:, 2 * Hs :] + r * zh[:, 2 * Hs :]).tanh()
            h = (1 - u) * n + u * h
        else:
            h = (zx + zh).tanh()
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("rule_set", ["feedback_alignment", "sign_symmetry", "fixed_random_sign_symmetry"])
@pytest.mark.parametrize("stock_cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_feedback_rules_send_delta_through_B_in_time_and_to_the_input(stock_cls, rule_set):
    torch.manual_seed(0)
    model = mb.convert(torch.nn.Sequential(stock_cls(I, H)).double(), registry=rule_set)
    layer = model[0]
    Bs = {name.removeprefix("weight_"): B for name, _, B in layer.feedback_pairs()}
    assert set(Bs) == {"ih_l0", "hh_l0"}
    if rule_set == "sign_symmetry":
        assert torch.equal(Bs["hh_l0"], layer.weight_hh_l0.detach().sign())
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(T, N, H, dtype=torch.float64)
    ours = torch.autograd.grad((layer(x)[0] * upstream).sum(), [x, *layer.parameters()])
    ref = torch.autograd.grad((_unrolled(layer, x, Bs) * upstream).sum(), [x, *layer.parameters()])
    for name, a, b in zip(["input"] + [n for n, _ in layer.named_parameters()], ours, ref):
        assert relative(a, b) <= 1e-12, name
    backprop = torch.autograd.grad((mb.restore(model)[0](x)[0] * upstream).sum(), [x])[0]
    assert relative(ours[0], backprop) > 1e-3  # δ really went through B
    assert list(layer.state_dict()) == list(stock_cls(I, H).state_dict())  # B is no part of the checkpoint
    assert set(feedback_buffers(model)) == {f"0.{name}" for name, _ in layer.named_buffers()}  # what DDP gets rank 0's of
    assert rule_set != "feedback_alignment" or set(feedback_buffers(model)) == {"0.feedback_ih_l0", "0.feedback_hh_l0"}


class Stacked(torch.nn.Module):
    """Linear → recurrent layer → Linear, read out at every step or at each sequence's last step. The recurrent
    layer reads a padded batch (batch_first), one unbatched sequence, or a PackedSequence of LENGTHS."""

    def __init__(self, stock: type, every_step: bool, layout: str = "padded", **kwargs):
        super().__init__()
        self.every_step, self.layout = every_step, layout
        self.inp = nn.Linear(4, I)
        self.rnn = stock(I, H, batch_first=True, **kwargs)
        self.head = nn.Linear((kwargs.get("proj_size") or H) * (1 + kwargs.get("bidirectional", False)), 3)

    def forward(self, x):
        a = self.inp(x)
        if self.layout != "packed":
            out = self.rnn(a)[0]
            return self.head(out if self.every_step else out[..., -1, :])
        out = self.rnn(pack_padded_sequence(a, LENGTHS, batch_first=True, enforce_sorted=False))[0]
        if self.every_step:
            return self.head(out.data)
        padded = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        return self.head(padded[torch.arange(N), torch.tensor(LENGTHS) - 1])


def _one_layer_each(stock: nn.RNNBase) -> list[nn.RNNBase]:
    """A stacked stock recurrent module as one single-layer stock module per layer, with its weights."""
    options = dict(hidden_size=stock.hidden_size, bias=stock.bias, batch_first=stock.batch_first,
                   bidirectional=stock.bidirectional)
    options.update(dict(proj_size=stock.proj_size) if isinstance(stock, nn.LSTM) else {})
    options.update(dict(nonlinearity=stock.nonlinearity) if type(stock) is nn.RNN else {})
    width = (stock.proj_size or stock.hidden_size) * (1 + stock.bidirectional)
    layers = []
    for layer in range(stock.num_layers):
        one = type(stock)(stock.input_size if layer == 0 else width, **options).to(stock.weight_ih_l0.dtype)
        own = {re.sub(rf"_l{layer}(_reverse)?$", r"_l0\1", name): p for name, p in stock.state_dict().items()
               if re.search(rf"_l{layer}(_reverse)?$", name)}
        one.load_state_dict(own)
        layers.append(one)
    return layers


def _eB_like(stock: Stacked, e: torch.Tensor, B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """e B laid out like `like` (a padded output, or packed rows): row for row, or each sample's row at its steps
    (on packed rows: the sample of each row, step by step, the sequences still running, longest first)."""
    eB = e @ B
    if stock.every_step:
        return eB.reshape(*like.shape[:-1], B.shape[1])
    if stock.layout == "packed":
        longest_first = sorted(range(N), key=lambda n: -LENGTHS[n])
        return eB[torch.tensor([n for t in range(T) for n in longest_first if LENGTHS[n] > t])]
    return eB.unsqueeze(-2).expand(*like.shape[:-1], B.shape[1])


def _dfa_expected(stock: Stacked, x: torch.Tensor, e: torch.Tensor, Bs: list, train: bool, seed: int) -> list[torch.Tensor]:
    """Stock autograd's gradients of the recurrent layer's weights (in its parameter order) when the output of
    its layer l gets δ = e Bs[l] at every step (after the dropout layer l + 1 reads it through), the top layer
    e Bs[-1], and no δ passes from a layer to the one below: DFA, one layer at a time. Dropout is drawn as torch
    draws it between layers (on the sequence-first output), from torch's RNG seeded with `seed`."""
    packed = stock.layout == "packed"

    def dropped(h):  # torch's dropout between layers, drawn on the sequence-first layout
        if not train or packed or h.dim() == 2:
            return torch.nn.functional.dropout(h, stock.rnn.dropout, train)
        return torch.nn.functional.dropout(h.transpose(0, 1).contiguous(), stock.rnn.dropout, True).transpose(0, 1)

    a = stock.inp(x).detach()
    inp = pack_padded_sequence(a, LENGTHS, batch_first=True, enforce_sorted=False) if packed else a
    grads = {}
    layers = _one_layer_each(stock.rnn)
    torch.manual_seed(seed)  # after the layers' own initialisation drew from it
    for layer, (one, B) in enumerate(zip(layers, Bs)):
        h = one(inp)[0]
        h = h.data if packed else h
        top = layer == len(layers) - 1
        read = h if top else dropped(h)
        own = torch.autograd.grad(read, list(one.parameters()), _eB_like(stock, e, B, h))
        for (name, _), g in zip(one.named_parameters(), own):
            grads[name.replace("_l0", f"_l{layer}")] = g
        nxt = read.detach()
        inp = inp._replace(data=nxt) if packed else nxt
    return [grads[name] for name, _ in stock.rnn.named_parameters()]


DFA_CASES = [  # (recurrent layer, its options, layout, dropout active)
    (nn.LSTM, dict(num_layers=2, bidirectional=True), "padded", False),
    (nn.GRU, {}, "padded", False),
    (nn.RNN, dict(nonlinearity="relu"), "padded", False),
    (nn.GRU, dict(num_layers=3, dropout=0.4), "padded", True),
    (nn.RNN, dict(num_layers=2, bidirectional=True), "unbatched", False),
    (nn.LSTM, dict(num_layers=2, proj_size=2), "unbatched", False),
    (nn.LSTM, dict(num_layers=2, bidirectional=True), "packed", False),
    (nn.GRU, {}, "packed", False),
    (nn.LSTM, dict(num_layers=3, proj_size=2, dropout=0.3), "packed", True),
]


@pytest.mark.parametrize("every_step", [False, True], ids=["last_step", "every_step"])
@pytest.mark.parametrize("stock_cls,kwargs,layout,train", DFA_CASES,
                         ids=[f"{c.__name__.lower()}_{k.get('num_layers', 1)}layers{'_bi' if k.get('bidirectional') else ''}"
                              f"{'_proj' if 'proj_size' in k else ''}_{layout}{'_dropout' if train else ''}"
                              for c, k, layout, train in DFA_CASES])
def test_direct_feedback_alignment_sends_e_B_to_every_step_of_every_layer(stock_cls, kwargs, layout, train, every_step):
    """Each layer of the recurrent module gets δ = e B(l) at its output at every step (the top layer e B), its
    input e B(below); inside each layer δ runs back in time through W_hh. On a PackedSequence each packed row's
    δ is its own row of e B, or its sample's row at that sample's steps (none past its end). Expected gradients
    from stock autograd fed exactly those δs, one layer at a time."""
    torch.manual_seed(0)
    stock = Stacked(stock_cls, every_step, layout, **kwargs).double()
    stock.train(train)
    model = mb.convert(stock, registry="direct_feedback_alignment")
    assert type(model.rnn).__module__.endswith("direct_feedback_alignment")
    layers = kwargs.get("num_layers", 1)
    Bs = [getattr(model.rnn, f"feedback_l{layer}") for layer in range(layers - 1)] + [model.rnn.feedback]
    assert all(B.shape == Bs[-1].shape for B in Bs)  # (K, each layer's output width)
    assert {name for name, _ in model.rnn.named_buffers()} == {"feedback"} | {f"feedback_l{k}" for k in range(layers - 1)}
    assert set(feedback_buffers(model)) == {"inp.feedback", "rnn.feedback"} | {f"rnn.feedback_l{k}" for k in range(layers - 1)}
    x = torch.randn(*(() if layout == "unbatched" else (N,)), T, 4, dtype=torch.float64)
    torch.manual_seed(1)
    out = model(x)
    e = torch.randn_like(out)  # the output layer's δ
    out.backward(e)
    want_rnn = _dfa_expected(stock, x, e, Bs, train, seed=1)
    for (name, p), want in zip(model.rnn.named_parameters(), want_rnn):
        assert relative(p.grad, want) <= 1e-12, name
    torch.manual_seed(1)
    h = stock.rnn(stock.inp(x) if layout != "packed" else
                  pack_padded_sequence(stock.inp(x), LENGTHS, batch_first=True, enforce_sorted=False))[0]
    if layers > 1:  # and not backprop's through the layers: its gradients of layer 0 differ
        h = h.data if layout == "packed" else h
        backprop = torch.autograd.grad(h, stock.rnn.weight_ih_l0, _eB_like(stock, e, Bs[-1], h))[0]
        assert relative(model.rnn.weight_ih_l0.grad, backprop) > 1e-3
    assert list(model.rnn.state_dict()) == list(stock.rnn.state_dict())  # the Bs are no part of the checkpoint
    x_rows = x.reshape(-1, 4) if layout != "packed" else pack_padded_sequence(x, LENGTHS, batch_first=True,
                                                                               enforce_sorted=False).data
    delta_inp = _eB_like(stock, e, model.inp.feedback, h if layout != "packed" else x_rows)
    assert relative(model.inp.weight.grad, delta_inp.reshape(-1, I).T @ x_rows) <= 1e-12
    restored = mb.restore(model)
    assert not any(name.startswith("feedback") for name, _ in restored.rnn.named_buffers())


class FlattenedOverTime(torch.nn.Module):
    """A recurrent layer whose output at every step, flattened over time, feeds one Linear (as MNIST-1D's GRU
    does), run batch-first or sequence-first. Input: (N, T, I)."""

    def __init__(self, stock: type, batch_first: bool, **kwargs):
        super().__init__()
        self.rnn = stock(I, H, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(T * H * (1 + kwargs.get("bidirectional", False)), 3)

    def forward(self, x):
        out = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.rnn.batch_first else out.transpose(0, 1)).flatten(1))


@pytest.mark.parametrize("stock_cls,kwargs,batch_first", [(nn.GRU, dict(bidirectional=True), True), (nn.LSTM, {}, False),
                                                          (nn.RNN, {}, False)], ids=["gru_bi_batch_first", "lstm", "rnn"])
def test_direct_feedback_alignment_through_an_output_flattened_over_time(stock_cls, kwargs, batch_first):
    """B covers every step, (K, T · width): step t of sample n gets its own slice of e_n B, laid out as
    flatten(1) read it. Expected gradients from stock autograd fed exactly that δ."""
    torch.manual_seed(0)
    stock = FlattenedOverTime(stock_cls, batch_first, **kwargs).double()
    model = mb.convert(stock, registry="direct_feedback_alignment")
    B = model.rnn.feedback
    assert B.shape == (3, stock.head.in_features)
    x = torch.randn(N, T, I, dtype=torch.float64)
    out = model(x)
    e = torch.randn_like(out)
    out.backward(e)
    h = stock.rnn(x if batch_first else x.transpose(0, 1))[0]
    eB = (e @ B).reshape(N, T, -1)  # sample n's steps, in flatten(1)'s order
    want = torch.autograd.grad(h, list(stock.rnn.parameters()), eB if batch_first else eB.transpose(0, 1))
    for (name, p), w in zip(model.rnn.named_parameters(), want):
        assert relative(p.grad, w) <= 1e-12, name


def test_mnist1d_gru_trains_by_direct_feedback_alignment():
    """MNIST-1D's GRU (every step's output flattened into its Linear) converts to DFA; one step lowers the loss."""
    from lightning_modules.mnist1d import MNIST1DGRU

    torch.manual_seed(0)
    model = mb.convert(MNIST1DGRU(), registry="direct_feedback_alignment")
    assert model.gru.feedback.shape == (10, 480)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert mb.testing.rule_nodes(model(x).sum()).get("DirectFeedbackErrorBackward", 0) == 1


def test_direct_feedback_alignment_refuses_a_recurrent_output_layer():
    from manual_backprop.convert import ConversionError
    from manual_backprop.plugins import direct_feedback_alignment as dfa

    with pytest.raises(ConversionError, match="the output '1' is a recurrent layer"):
        mb.convert(torch.nn.Sequential(nn.Linear(2, I), nn.GRU(I, H)), registry=dfa.registry(output="1"))


# ------------------------------------------------------------------ the native loops


def _native_or_skip():
    from manual_backprop.rules import _native_recurrent

    if _native_recurrent.load() is None:
        pytest.skip("the native recurrent loops could not be built here (no compiler): the Python rule runs")


NATIVE = [c for c in CASES if c.stock in (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)]


@pytest.mark.parametrize("case", NATIVE, ids=repr)
def test_native_loops_equal_the_python_loops(case):
    """The C++ loops over time (csrc/recurrent.cpp) give what the Python loops give, to 1e-12; the Python
    loops are switched off while the native run goes, so the native ones ran."""
    from manual_backprop.rules import _native, recurrent

    _native_or_skip()
    _, ours = pair(case)
    with _native.python_rule():
        _, o_python, l_python, g_python = run(case, ours)
    saved = {name: getattr(recurrent.PythonLoops, name) for name in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward")}

    def refuse(*args, **kwargs):
        raise AssertionError("the Python loop ran where the native one should")

    try:
        for name in saved:
            setattr(recurrent.PythonLoops, name, staticmethod(refuse))
        _, o_native, l_native, g_native = run(case, ours)
    finally:
        for name, fn in saved.items():
            setattr(recurrent.PythonLoops, name, fn)
    for a, b in zip([*o_native, l_native, *g_native], [*o_python, l_python, *g_python]):
        assert relative(a, b) <= 1e-12


@pytest.mark.parametrize("stock_cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_native_loops_carry_feedback_and_float32(stock_cls):
    """A learning rule's B goes through the native loop too; float32 runs natively as well."""
    from manual_backprop.rules import _native

    _native_or_skip()
    torch.manual_seed(0)
    kwargs = dict(proj_size=2) if stock_cls is nn.LSTM else {}
    model = mb.convert(torch.nn.Sequential(stock_cls(I, H, num_layers=2, **kwargs)), registry="sign_symmetry")
    x = torch.randn(T, N, I, requires_grad=True)
    grads = []
    for python in (True, False):
        with _native.python_rule() if python else torch.enable_grad():
            out = model(x)[0]
            grads.append(torch.autograd.grad(out.square().sum(), [x, *model.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_alignment_measures_each_recurrent_weight_on_its_own():
    torch.manual_seed(0)
    gru = nn.GRU(3, 5, batch_first=True, bidirectional=True).double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 10, dtype=torch.float64)
    loss = lambda out, target: (out[0] - target).square().sum()  # noqa: E731
    backprop = mb.alignment(mb.convert(gru), x, y, loss)
    feedback = mb.alignment(mb.convert(gru, registry="feedback_alignment"), x, y, loss)
    names = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse"]
    assert list(backprop) == list(feedback) == names
    assert all(backprop[n].update < 1e-5 for n in names)  # backprop against itself
    assert feedback["weight_hh_l0"].update > 1.0  # δ back through time goes through B, not W_hh


AUTOCAST_CASES = [c for c in CASES if not c.train and "no_bias" not in c.name]


@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=repr)
def test_autocast_cpu_bfloat16_matches_stock_dtypes_and_accuracy(case):
    """Under CPU autocast every output comes back in stock's dtype (bfloat16 for lstm and rnn_*, whose
    kernels autocast lists; float32 for gru and the GRU and LSTM cells; lstm with proj_size: h in bfloat16,
    c_n in float32, as torch's non-oneDNN LSTM gives them), gradients in float32, on our
    rules; every output and gradient within 2× stock's autocast error from the float64 truth, in norm (an
    all-bfloat16 LSTM runs in float32 inside and every backward runs in float32, as oneDNN's LSTM does:
    within 1.7× stock's over eight seeds, the GRU's within 1.2×). The tanh RNN's within 3×: stock runs it
    op by op in bfloat16, and on an unbatched bias gradient of five numbers the two roundings land up to
    2.8× apart over eight seeds.
    The relu RNN's values are not compared: wherever bfloat16 rounds a relu's input across 0 its gradient
    changes by O(1), and through layers and steps that leaves stock's and our gradients 10–40% from the
    truth, each by its own rounding."""
    truth_module, _ = pair(case, torch.float64)
    _, truth, _, truth_grads = run(case, truth_module, torch.float64)
    stock, ours = pair(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected_outs, _, expected = run(case, stock, torch.float32)
        _, outs, _, grads = run(case, ours, torch.float32)
    assert [o.dtype for o in outs] == [o.dtype for o in expected_outs]
    assert [g.dtype for g in grads] == [g.dtype for g in expected] == [torch.float32] * len(grads)
    assert OUR_NODES & set(graph_nodes(outs[0]))
    if "relu" in case.name:
        return
    bound = 3 if case.stock in (nn.RNN, nn.RNNCell) else 2
    for got, want, true in zip(outs + list(grads), expected_outs + list(expected), truth + list(truth_grads)):
        true = true.double()  # (a PackedSequence also returns its integer batch sizes)
        ours_error, stock_error = (got.double() - true).norm(), (want.double() - true).norm()
        assert ours_error <= bound * stock_error, (ours_error, stock_error)
