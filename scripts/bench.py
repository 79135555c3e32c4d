"""Training-step speed and memory of our rules against stock autograd, in one process.

    python scripts/bench.py                     # full grid, CPU (+ CUDA where available)
    python scripts/bench.py --quick --out /tmp  # tiny grid, few repeats: a smoke test
    python scripts/bench.py --only transformer  # the transformer block alone (converted vs stock)
    python scripts/bench.py --only recurrent    # LSTM and GRU layers: stock, our native loops, our Python rule
    python scripts/bench.py --only per-layer    # Sequential(Linear, act, …) + loss: native per-layer nodes, Python rules
    python scripts/bench.py --only norm         # BatchNorm, LayerNorm, GroupNorm alone: stock, native loops, Python rule
    python scripts/bench.py --only conv         # float32 error of the convolutions' ∂J/∂W, ours and stock's

Contenders, all started from the same parameters and fed the same batch:
    stock      torch.nn.Sequential(Linear, act, …): stock autograd
    per-layer  the same Sequential of manual_backprop.nn modules: two of our nodes per layer
    fused      manual_backprop.nn.MLP: one node for the network
    compiled   the fused step (MLP + loss) under torch.compile
    native     manual_backprop.nn.MLP with its native rule (csrc/mlp.cpp; "fused" is its Python rule)
    native-aten  the native rule on ATen ops only, its direct CPU path (BLAS, plain loops) switched
               off: what that path buys (on CUDA the two are the same)
    peers      a plain per-layer autograd.Function without fusion, in the style of
               peer projects (old-style ctx, saves the inputs, recomputes σ in backward)
    matmuls    the step's matrix products alone (3 per layer: forward, grad-input,
               grad-weight; the first layer's grad-input is left out because x needs
               no gradient and no contender computes it): the roofline

One step = zero grads (set to None), forward, loss, backward. Contenders are timed
in turn, sample by sample, so drifting machine load hits them all alike; each
sample runs enough steps to last about a millisecond. The table reports the median
step time, and each ratio as the median over rounds of the ratio within a round. Loss: BCEWithLogits for one output, CrossEntropy for more; torch's
for every contender, so the ratios compare the networks alone (--our-loss gives our
contenders manual_backprop's losses instead).

Saved bytes: every tensor autograd packs during one forward + loss is seen by a
`torch.autograd.graph.saved_tensors_hooks` pack hook; we sum the sizes of the
distinct storages among them (a tensor and its views count once), leaving out the
parameters' storages (they live anyway and every contender saves the same weights).
Peak memory: CUDA: torch.cuda.max_memory_allocated during one step, above what was
allocated before it. CPU: the CPU build keeps no allocator statistics, so the peak
column is left empty there and the saved bytes stand for the memory a step holds.

Exits non-zero only when a contender's gradients differ from stock autograd's;
a missed speed or memory target prints MISSED.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import manual_backprop.nn as mnn
from manual_backprop.nn.activation import ACTIVATIONS
from manual_backprop.rules import _native

# ------------------------------------------------------------------ the peers' style


class PeerLinear(torch.autograd.Function):
    """The classic hand-written Linear: old-style ctx, saves input, weight and bias."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight, bias)
        return input.mm(weight.t()) + bias

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        return grad_output.mm(weight), grad_output.t().mm(input), grad_output.sum(0)


class PeerActivation(torch.autograd.Function):
    """The classic hand-written activation: saves the input z, recomputes σ'(z) in backward."""

    @staticmethod
    def forward(ctx, z, name):
        ctx.save_for_backward(z)
        ctx.name = name
        return PEER_SIGMA[name](z)

    @staticmethod
    def backward(ctx, grad_output):
        (z,) = ctx.saved_tensors
        return grad_output * PEER_SIGMA_PRIME[ctx.name](z), None


PEER_SIGMA = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
PEER_SIGMA_PRIME = {
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "relu": lambda z: (z > 0).to(z.dtype),
}


class PeerNet(nn.Module):
    def __init__(self, stock: nn.Sequential, activation: str):
        super().__init__()
        self.linears = nn.ModuleList(m for m in stock if isinstance(m, nn.Linear))
        self.activation = activation

    def forward(self, x):
        for k, linear in enumerate(self.linears):
            x = PeerLinear.apply(x, linear.weight, linear.bias)
            if k < len(self.linears) - 1:
                x = PeerActivation.apply(x, self.activation)
        return x


# ------------------------------------------------------------------ the grid

BENCH_ACTIVATIONS = ("sigmoid", "tanh", "relu")  # ACTIVATIONS[name]: our module, .stock torch's

# (sizes, batch, GEMM-bound). GEMM-bound, as the issue names it, is the largest size: there the
# matrix products take about 90% of a stock step (a quarter less at 256→512→512→10).
FULL_GRID = [
    ((4, 8, 8, 1), 32, False),
    ((64, 128, 128, 10), 128, False),
    ((256, 512, 512, 10), 256, False),
    ((784, 1024, 1024, 10), 512, True),
    # course sizes (≤ 64 wide), where per-op overhead dominates
    ((6, 12, 12, 1), 48, False),
    ((20, 64, 64, 64, 3), 64, False),
]
QUICK_GRID = [((4, 8, 8, 1), 8, False), ((16, 32, 10), 16, True)]
CONTENDERS = ["stock", "per-layer", "fused", "compiled", "peers", "native", "native-aten"]


@dataclass(eq=False)
class Case:
    device: str
    sizes: tuple
    batch: int
    activation: str
    gemm_bound: bool
    times: dict = field(default_factory=dict)  # contender -> seconds per step (median)
    rounds: dict = field(default_factory=dict)  # contender -> seconds per step, one per timing round
    saved: dict = field(default_factory=dict)  # contender -> bytes saved for backward
    peak: dict = field(default_factory=dict)  # contender -> peak bytes during a step (CUDA)
    flops: float = 0.0
    conv_error: dict = field(default_factory=dict)  # contender -> worst float32 conv ∂J/∂W error (CNN cases)

    @property
    def network(self) -> str:
        return "→".join(map(str, self.sizes))

    def ratio(self, name: str, to: str = "stock") -> float:
        """Step time of `name` ÷ that of `to`: the median over timing rounds of the ratio within a
        round, so load that drifts between rounds cancels out."""
        if not self.rounds:
            return self.times[name] / self.times[to]
        return statistics.median(t / u for t, u in zip(self.rounds[name], self.rounds[to]))


def stock_and_per_layer(sizes, act: str, device) -> tuple[nn.Sequential, nn.Sequential]:
    """A stock Sequential(Linear, act, …, Linear) seeded with 0, and the same network of our modules, same parameters."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(sizes) - 2:
            layers.append(ACTIVATIONS[act].stock())
    stock = nn.Sequential(*layers).to(device)
    ours = nn.Sequential(*[mnn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear)
                           else ACTIVATIONS[act].module() for m in stock]).to(device)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def build(case: Case, compile_backend: str, our_loss_for_ours: bool = False):
    """Every contender's step function and parameters, all from one stock network's parameters."""
    device, sizes, act = case.device, case.sizes, case.activation
    stock, per_layer = stock_and_per_layer(sizes, act, device)
    fused = mnn.MLP.from_sequential(stock)
    compiled_model = mnn.MLP.from_sequential(stock)
    peers = PeerNet(copy.deepcopy(stock), act)  # its own copy of the parameters

    x = torch.randn(case.batch, sizes[0], device=device)
    if sizes[-1] == 1:
        y = torch.randint(0, 2, (case.batch, 1), device=device).float()
        stock_loss, our_loss = nn.BCEWithLogitsLoss(), mnn.BCEWithLogitsLoss()
    else:
        y = torch.randint(0, sizes[-1], (case.batch,), device=device)
        stock_loss, our_loss = nn.CrossEntropyLoss(), mnn.CrossEntropyLoss()
    if not our_loss_for_ours:  # one loss for all: the ratios then compare the networks alone
        our_loss = stock_loss

    compiled_forward = torch.compile(lambda x, y: our_loss(compiled_model(x), y), backend=compile_backend)
    forwards = {
        "stock": (lambda: stock_loss(stock(x), y), stock),
        "per-layer": (lambda: our_loss(per_layer(x), y), per_layer),
        "fused": (lambda: our_loss(fused(x), y), fused),
        "compiled": (lambda: compiled_forward(x, y), compiled_model),
        "peers": (lambda: stock_loss(peers(x), y), peers),
    }
    # native: "fused" runs the Python rule, "native" its C++ twin, on their own copies of the parameters
    forwards["fused"] = (python_rule(forwards["fused"][0]), fused)
    native = mnn.MLP.from_sequential(stock)
    forwards["native"] = (lambda: our_loss(native(x), y), native)
    native_aten = mnn.MLP.from_sequential(stock)
    forwards["native-aten"] = (aten_path(lambda: our_loss(native_aten(x), y)), native_aten)
    steps, params = {}, {}
    for name, (forward, model) in forwards.items():
        params[name] = list(model.parameters())
        steps[name] = make_step(forward, params[name])
    steps["matmuls"], case.flops = matmul_step(stock, x)
    return forwards, steps, params


def python_rule(forward):
    """`forward` with the fused MLP on its Python rule (`rules._native.python_rule`), whatever is built."""

    def run():
        with _native.python_rule():
            return forward()

    return run


def native_layers(forward):
    """`forward` with the per-layer native rules switched on (`rules._native.native_layers`), even where the
    environment switched them off (MANUAL_BACKPROP_NATIVE_LAYERS=0)."""

    def run():
        with _native.native_layers():
            return forward()

    return run


def aten_path(forward):
    """`forward` with the native rule's direct CPU path off (`rules._native.direct_path`); backward follows
    the path forward took."""

    def run():
        with _native.direct_path(False):
            return forward()

    return run if _native.load() is not None else forward


def make_step(forward, params):
    def step():
        for p in params:
            p.grad = None
        forward().backward()

    return step


def matmul_step(stock: nn.Sequential, x: torch.Tensor):
    """The step's matrix products alone, on tensors of the step's shapes; and their FLOPs."""
    products = []
    n = x.shape[0]
    for k, linear in enumerate(m for m in stock if isinstance(m, nn.Linear)):
        W = linear.weight.detach()
        a = torch.randn(n, linear.in_features, device=x.device)
        delta = torch.randn(n, linear.out_features, device=x.device)
        products.append((a, W.t()))  # forward: a Wᵀ
        products.append((delta.t(), a))  # grad-weight: δᵀ a
        if k > 0:
            products.append((delta, W))  # grad-input: δ W (not for the first layer: x needs no grad)
    flops = sum(2 * p.shape[0] * p.shape[1] * q.shape[1] for p, q in products)

    def step():
        for p, q in products:
            torch.mm(p, q)

    return step, flops


# ------------------------------------------------------------------ measurements


def check_gradients(case: Case, forwards, params) -> list[str]:
    """Each contender's loss and gradients against stock autograd's, from the same parameters."""
    errors = []
    reference = None
    for name, (forward, _) in forwards.items():
        for p in params[name]:
            p.grad = None
        loss = forward()
        loss.backward()
        got = [loss.detach()] + [p.grad for p in params[name]]
        if reference is None:
            reference = got
            continue
        for i, (g, r) in enumerate(zip(got, reference)):
            if g is None or not torch.allclose(g, r, rtol=1e-4, atol=1e-5):
                worst = float("nan") if g is None else (g - r).abs().max().item()
                errors.append(f"{case.device} {case.network} {case.activation} {name}: tensor {i} differs (max |Δ| {worst:.3g})")
    return errors


def count_saved_bytes(forward, params) -> int:
    parameter_storages = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in parameter_storages:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(storages.values())


def peak_bytes(step, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_all(steps: dict, device: str, samples: int, target_s: float = 1e-3) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = {}
    for name, step in steps.items():  # warm up (compiles too; 3 steps and at least 50 ms) and size each sample
        start, done = time.perf_counter(), 0
        while done < 3 or time.perf_counter() - start < 0.05:
            step()
            done += 1
        sync()
        start = time.perf_counter()
        step()
        sync()
        inner[name] = max(1, min(200, int(target_s / max(time.perf_counter() - start, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for sample in range(samples):
        for name in names[sample % len(names) :] + names[: sample % len(names)]:  # rotate who goes first
            step, n = steps[name], inner[name]
            sync()
            start = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / n)
    return times


# ------------------------------------------------------------------ report


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def table(cases: list[Case]) -> str:
    lines = [
        "| device | network | batch | act | contender | step ms | × stock | GFLOP/s | roofline / step | saved KiB | peak KiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        for name in CONTENDERS + ["matmuls"]:
            t = c.times[name]
            saved = c.saved.get(name)
            peak = c.peak.get(name)
            lines.append(
                f"| {c.device} | {c.network} | {c.batch} | {c.activation} | {name} | {t * 1e3:.3f} | {c.ratio(name):.2f} "
                f"| {c.flops / t / 1e9:.1f} | {c.ratio('matmuls', name):.2f} | {'' if saved is None else f'{saved / 1024:.1f}'} "
                f"| {'' if peak is None else f'{peak / 1024:.1f}'} |"
            )
    return "\n".join(lines)


def summary(cases: list[Case]) -> str:
    """Step time ÷ stock per size, geometric mean over the activations."""
    names = [n for n in CONTENDERS if n != "stock"] + ["matmuls"]
    lines = ["| device | network | batch | stock ms | " + " | ".join(names) + " |",
             "|---|---|---|---:|" + "---:|" * len(names)]
    for group in dict.fromkeys((c.device, c.network, c.batch) for c in cases):
        on = [c for c in cases if (c.device, c.network, c.batch) == group]
        ratios = [geomean(c.ratio(n) for c in on) for n in names]
        stock = geomean(c.times["stock"] for c in on)
        lines.append(f"| {group[0]} | {group[1]} | {group[2]} | {stock * 1e3:.3f} | "
                     + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    return "\n".join(lines)


def targets(cases: list[Case]) -> list[tuple[bool, str]]:
    results = []
    for device in dict.fromkeys(c.device for c in cases):
        on = [c for c in cases if c.device == device]
        ratio = {name: {c: c.ratio(name) for c in on} for name in ("fused", "per-layer")}
        fused = ratio["fused"]
        worst = max(on, key=lambda c: fused[c])
        results.append((geomean(fused.values()) <= 1.00,
                        f"{device}: fused ≤ 1.00× stock, geomean over the grid: {geomean(fused.values()):.2f}×"))
        results.append((fused[worst] <= 1.05,
                        f"{device}: fused ≤ 1.05× stock at every size: worst {fused[worst]:.2f}× "
                        f"({worst.network} {worst.activation})"))
        smallest = [c for c in on if c.sizes == on[0].sizes]
        gemm = [c for c in on if c.gemm_bound]
        per_layer_gemm = max((ratio["per-layer"][c] for c in gemm), default=float("nan"))
        per_layer_small = max(ratio["per-layer"][c] for c in smallest)
        results.append((per_layer_gemm <= 1.10, f"{device}: per-layer ≤ 1.10× stock at GEMM-bound sizes: worst {per_layer_gemm:.2f}×"))
        results.append((per_layer_small <= 1.5, f"{device}: per-layer ≤ 1.5× stock at the smallest size: worst {per_layer_small:.2f}×"))
        roofline = max((c.ratio("fused", "matmuls") for c in gemm), default=float("nan"))
        stock_roofline = max((c.ratio("stock", "matmuls") for c in gemm), default=float("nan"))
        results.append((roofline <= 1.10, f"{device}: fused within 1.10× of the matmul roofline at GEMM-bound sizes: "
                                          f"worst {roofline:.2f}× (stock autograd: {stock_roofline:.2f}×)"))
        over = [f"{c.network} {c.activation} {name}" for c in on for name in ("per-layer", "fused")
                if c.saved.get(name) is not None and c.saved[name] > c.saved["stock"]]
        results.append((not over, f"{device}: saved bytes never above stock: {'ok' if not over else 'above in ' + ', '.join(over)}"))
        compiled = max(c.ratio("compiled") for c in smallest)
        results.append((compiled < 1.0, f"{device}: compiled fused faster than eager stock at the smallest size: worst {compiled:.2f}×"))
    return results


def native_targets(cases: list[Case]) -> list[tuple[bool, str]]:
    """The native rule's targets, per size the geometric mean over the activations."""
    results = []
    for device in dict.fromkeys(c.device for c in cases if "native" in c.times):
        on = [c for c in cases if c.device == device]
        sizes = list(dict.fromkeys((c.sizes, c.batch) for c in on))
        per_size = {s: geomean(c.ratio("native") for c in on if (c.sizes, c.batch) == s) for s in sizes}
        name = lambda s: f"{'→'.join(map(str, s[0]))} b{s[1]}"  # noqa: E731
        worst = max(sizes, key=per_size.get)
        course = [s for s in sizes if max(s[0]) <= 64]
        worst_course = max(course, key=per_size.get, default=None)
        overall = geomean(c.ratio("native") for c in on)
        results.append((overall <= 0.80, f"{device}: native ≤ 0.80× stock, geomean over the grid: {overall:.2f}×"))
        results.append((per_size[worst] <= 1.00, f"{device}: native ≤ 1.00× stock at every size: worst "
                                                 f"{per_size[worst]:.2f}× ({name(worst)})"))
        if worst_course is not None:
            results.append((per_size[worst_course] <= 0.75, f"{device}: native ≤ 0.75× stock at course sizes "
                                                             f"(≤ 64 wide): worst {per_size[worst_course]:.2f}× "
                                                             f"({name(worst_course)})"))
        over = [f"{c.network} {c.activation}" for c in on
                if c.saved.get("native") is not None and c.saved["native"] > c.saved["stock"]]
        results.append((not over, f"{device}: native saved bytes never above stock: "
                                  f"{'ok' if not over else 'above in ' + ', '.join(over)}"))
    return results


def chart(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((c.device, c.network, c.batch) for c in cases))
    names = [n for n in CONTENDERS if n != "stock"] + ["matmuls"]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [geomean(c.ratio(name) for c in cases if (c.device, c.network, c.batch) == g)
                  for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{d}\n{n}\nbatch {b}" for d, n, b in groups], fontsize=8)
    ax.set_ylabel("step time ÷ stock autograd")
    ax.set_title("One training step against stock autograd (geometric mean over activations)", fontsize=9)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ convolutional networks

CNN_CONTENDERS = ["stock", "converted", "compiled"]


@dataclass(frozen=True)
class CnnSpec:
    """A CNN case: `build(zoo)` gives the stock model; inputs (batch, *shape); classifiers take a cross-entropy loss."""

    name: str
    build: object
    shape: tuple
    batch: int
    classifier: bool = True


def _basic_block(zoo, inplanes: int, planes: int):
    """A resnet BasicBlock with its downsampling shortcut, as resnet18's layer2.0."""
    return zoo.BasicBlock(inplanes, planes, 2, nn.Sequential(zoo.conv1x1(inplanes, planes, 2), nn.BatchNorm2d(planes)))


def _small_cnn(zoo):
    """Two conv → BatchNorm → ReLU → max-pool stages (3 → 16 → 32 channels, 3×3) and a Linear classifier."""
    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*stage(3, 16), *stage(16, 32), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


CNN_FULL = [
    CnnSpec("small-cnn", _small_cnn, (3, 32, 32), 16),
    CnnSpec("basic-block", lambda zoo: _basic_block(zoo, 64, 128), (64, 16, 16), 32, classifier=False),
    CnnSpec("resnet18", lambda zoo: zoo.resnet18(num_classes=10), (3, 32, 32), 32),
    CnnSpec("mobilenet_v3_small", lambda zoo: zoo.mobilenet_v3_small(num_classes=10), (3, 32, 32), 32),
]
CNN_QUICK = [CnnSpec("basic-block", lambda zoo: _basic_block(zoo, 8, 16), (8, 8, 8), 4, classifier=False)]


def load_zoo():
    """scripts/zoo_cnn.py, the faithful copies of torchvision's models, imported beside this script."""
    import importlib.util

    if "zoo_cnn" in sys.modules:
        return sys.modules["zoo_cnn"]
    spec = importlib.util.spec_from_file_location("zoo_cnn", Path(__file__).with_name("zoo_cnn.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_cnn"] = module
    spec.loader.exec_module(module)
    return module


def build_cnn(case: Case, spec: CnnSpec, compile_backend: str):
    """stock (torch autograd), converted (manual_backprop.convert) and converted + torch.compile, same parameters."""
    import manual_backprop as mb

    # Dropout under inductor draws its masks from inductor's own RNG unless told to fall back to eager's,
    # so without this stock compiled and ours compiled would drop different units and their gradients differ.
    torch._inductor.config.fallback_random = True
    torch.manual_seed(0)
    stock = spec.build(load_zoo()).to(case.device).train()
    converted, compiled_model = mb.convert(stock), mb.convert(stock)
    compiled = torch.compile(compiled_model, backend=compile_backend, dynamic=False)
    x = torch.randn(spec.batch, *spec.shape, device=case.device)
    if spec.classifier:
        y = torch.randint(0, 10, (spec.batch,), device=case.device)
        criterion = nn.CrossEntropyLoss()
        loss = lambda out: criterion(out, y)  # noqa: E731
    else:
        loss = lambda out: out.square().mean()  # noqa: E731
    forwards = {
        "stock": (lambda: loss(stock(x)), stock),
        "converted": (lambda: loss(converted(x)), converted),
        "compiled": (lambda: loss(compiled(x)), compiled_model),
    }
    params = {name: list(model.parameters()) for name, (_, model) in forwards.items()}
    steps = {name: make_step(forward, params[name]) for name, (forward, _) in forwards.items()}
    # The compiled contender's reference: stock under the same compiler (checked, not timed). Inductor
    # reorders float32 reductions, and on resnet18's last stage (batch norm over 32 values per channel)
    # stock compiled itself differs from stock eager by up to 22% of a gradient's largest element.
    stock_compiled = copy.deepcopy(stock)
    compiled_stock = torch.compile(stock_compiled, backend=compile_backend, dynamic=False)
    references = {"compiled": (lambda: loss(compiled_stock(x)), stock_compiled)}
    x64 = x.double()  # float64 holds the float32 batch exactly
    return forwards, steps, params, references, lambda model: loss(model(x64))


def check_cnn_gradients(case: Case, forwards, params, references=None) -> list[str]:
    """Loss and every parameter gradient against stock's, each contender from the same seed (dropout masks):
    eager contenders against stock eager, a contender named in `references` against that (stock compiled)."""
    def run(forward, parameters):
        for p in parameters:
            p.grad = None
        torch.manual_seed(1)
        loss = forward()
        loss.backward()
        return [loss.detach()] + [p.grad for p in parameters]

    errors, stock = [], None
    for name, (forward, _) in forwards.items():
        got = run(forward, params[name])
        if stock is None:
            stock = got
            continue
        reference = stock
        if references and name in references:
            ref_forward, ref_model = references[name]
            reference = run(ref_forward, list(ref_model.parameters()))
        compiled = bool(references and name in references)
        for i, (g, r) in enumerate(zip(got, reference)):
            scale = r.abs().max().item() if r.numel() else 0.0
            atol = (1e-3 if compiled else 1e-4) * scale + 1e-7
            if compiled:  # inductor's own float32 spread here: stock compiled against stock eager, times two
                # (train-mode BatchNorm over few values per channel amplifies rounding: mobilenet's 1×1 stages)
                atol += 2 * (r - stock[i]).abs().max().item() if r.numel() else 0.0
            if g is None or not torch.allclose(g, r, rtol=1e-3, atol=atol):
                worst = float("nan") if g is None else (g - r).abs().max().item()
                errors.append(f"{case.device} {case.network} {name}: tensor {i} differs (max |Δ| {worst:.3g}, max |stock| {scale:.3g})")
    return errors


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got − exact| / max |exact|: a float32 result's error against the float64 one."""
    return ((got.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-300)).item()


def conv_weight_error(forwards, exact_loss) -> dict:
    """Per eager contender: the worst, over the model's convolutions, float32 ∂J/∂W error against the exact
    gradient (the stock model in float64 from the same float32 parameters, on the same batch; same seed)."""
    _, stock = forwards["stock"]
    exact_model = copy.deepcopy(stock).double()
    exact = _conv_grads(lambda: exact_loss(exact_model), exact_model)
    return {name: max(_relative_error(g, e) for g, e in zip(_conv_grads(*forwards[name]), exact))
            for name in ("stock", "converted")}


def _conv_grads(forward, model) -> list[torch.Tensor]:
    """The convolutions' ∂J/∂W after one forward + backward (seeded: dropout draws alike)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(1)
    forward().backward()
    return [m.weight.grad for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def run_cnn_cases(devices, specs, samples: int, backend: str) -> tuple[list[Case], list[str]]:
    cases, errors = [], []
    for device in devices:
        for spec in specs:
            case = Case(device, (spec.name,), spec.batch, "", False)
            torch._dynamo.reset()
            forwards, steps, params, references, exact_loss = build_cnn(case, spec, backend)
            found = check_cnn_gradients(case, forwards, params, references)
            # The compiled contender is reported, not failed: on mobilenet_v3_small's last stages (train-mode
            # BatchNorm over few values) float32 under inductor is so ill-conditioned that stock compiled is
            # itself off from float64 by orders of magnitude on near-zero gradients; eager is checked strictly.
            errors += [e for e in found if " compiled:" not in e]
            spread = [e for e in found if " compiled:" in e]
            if spread:
                print(f"{device} {spec.name}: compiled gradients outside the check's tolerance in {len(spread)} tensors "
                      f"(reported, not failed; the first: {spread[0]})", flush=True)
            case.conv_error = conv_weight_error(forwards, exact_loss)
            for name, (forward, _) in forwards.items():
                try:
                    case.saved[name] = count_saved_bytes(forward, params[name])
                except Exception:  # saved-tensor hooks under torch.compile may be refused: leave it blank
                    case.saved[name] = None
                case.peak[name] = peak_bytes(steps[name], device)
            case.rounds = time_all(steps, device, samples)
            case.times = {name: statistics.median(ts) for name, ts in case.rounds.items()}
            cases.append(case)
            print(f"{device} {spec.name} batch {spec.batch}: "
                  + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in case.times.items()), flush=True)
    return cases, errors


def cnn_table(cases: list[Case]) -> str:
    lines = ["| device | model | batch | contender | step ms | × stock | saved MiB | peak MiB | conv ∂J/∂W f32 error |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        for name in CNN_CONTENDERS:
            saved, peak, error = c.saved.get(name), c.peak.get(name), c.conv_error.get(name)
            lines.append(f"| {c.device} | {c.network} | {c.batch} | {name} | {c.times[name] * 1e3:.2f} | {c.ratio(name):.2f} "
                         f"| {'' if saved is None else f'{saved / 2**20:.2f}'} | {'' if peak is None else f'{peak / 2**20:.2f}'} "
                         f"| {'' if error is None else f'{error:.2e}'} |")
    return "\n".join(lines)


CNN_TARGETS = {"small-cnn": 1.15, "resnet18": 1.05, "mobilenet_v3_small": 1.15}  # converted ÷ stock, at most


def cnn_targets(cases: list[Case]) -> list[tuple[bool, str]]:
    results = []
    for device in dict.fromkeys(c.device for c in cases):
        on = [c for c in cases if c.device == device]
        for c in on:
            if c.network in CNN_TARGETS:
                bound = CNN_TARGETS[c.network]
                results.append((c.ratio("converted") <= bound,
                                f"{device}: converted ≤ {bound}× stock on {c.network}: {c.ratio('converted'):.2f}×"))
        over = [c.network for c in on if c.saved.get("converted") is not None and c.saved["converted"] > c.saved["stock"]]
        results.append((not over, f"{device}: CNN saved bytes never above stock: {'ok' if not over else 'above in ' + ', '.join(over)}"))
    return results
# ------------------------------------------------------------------ convolution ∂J/∂W in float32

CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_accuracy() -> tuple[list[str], list[str]]:
    """Float32 ∂J/∂W error of stock autograd and of our rule against the exact gradient, on every sample torch's
    own module tests run for the convolution classes (`torch.testing._internal.common_modules.module_db`; the
    upstream gradient a fixed ramp, as tests/test_module_db.py). Exact: stock in float64 on the same float32
    weights, input and δ. Returns the report lines and any errors (none: accuracy is reported, not failed)."""
    import manual_backprop as mb
    from torch.testing._internal.common_modules import module_db

    lines = ["Convolution ∂J/∂W in float32 against float64 (max |error| / max |exact|), torch's module samples:", "",
             "| module | sample | input | stock error | ours error | ours ÷ stock |", "|---|---|---|---:|---:|---:|"]
    ratios = []
    for info in module_db:
        if info.module_cls not in CONV_CLASSES:
            continue
        samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False, training=True)
        for i, sample in enumerate(samples):
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            torch.manual_seed(0)
            stock = info.module_cls(*args, **kwargs)
            x = sample.forward_input.args[0].detach()
            out = stock(x)
            delta = torch.linspace(-1, 2, out.numel()).view(out.shape)
            exact_model = copy.deepcopy(stock).double()
            exact = torch.autograd.grad(exact_model(x.double()), [exact_model.weight], delta.double())[0]
            errors = {}
            for name, model in (("stock", stock), ("ours", mb.convert(copy.deepcopy(stock)))):
                (grad,) = torch.autograd.grad(model(x), [model.weight], delta)
                errors[name] = _relative_error(grad, exact)
            ratio = errors["ours"] / errors["stock"] if errors["stock"] else (1.0 if not errors["ours"] else math.inf)
            ratios.append(ratio)
            lines.append(f"| {info.name} | {i} {kwargs or ''} | {tuple(x.shape)} | {errors['stock']:.2e} | "
                         f"{errors['ours']:.2e} | {ratio:.2f} |")
    worst = max(ratios)
    lines += ["", f"- {'met' if worst <= 1.0 else 'MISSED'}: ours no further from float64 than stock on every sample: "
                  f"worst {worst:.2f}× stock's error"]
    return lines, []


# ------------------------------------------------------------------ normalisation layers alone

NORM_LAYERS = [("BatchNorm2d(64)", lambda: nn.BatchNorm2d(64), (32, 64, 16, 16)),
               ("LayerNorm(256)", lambda: nn.LayerNorm(256), (16, 128, 256)),
               ("GroupNorm(8, 64)", lambda: nn.GroupNorm(8, 64), (32, 64, 16, 16))]
NORM_QUICK = [("BatchNorm2d(4)", lambda: nn.BatchNorm2d(4), (2, 4, 4, 4)), ("LayerNorm(8)", lambda: nn.LayerNorm(8), (2, 3, 8)),
              ("GroupNorm(2, 4)", lambda: nn.GroupNorm(2, 4), (2, 4, 4, 4))]


def stock_native_python(forwards: dict, stock, ours, x, device: str, samples: int, label: str, errors: list):
    """Stock against ours on its native loops and on its Python rule (`forwards`: name -> loss closure): the
    gradients checked against stock first (a mismatch is appended to `errors`), then timed in alternating
    rounds. Returns (median time per contender, median within-round ratio to stock for native and python)."""
    models = {"stock": stock, "native": ours, "python": ours}
    grads = {name: torch.autograd.grad(forward(), [x, *models[name].parameters()]) for name, forward in forwards.items()}
    for name in ("native", "python"):
        if not all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(grads[name], grads["stock"])):
            errors.append(f"{label} {name}: gradients differ from stock")
    steps = {name: make_step(forwards[name], [x, *models[name].parameters()]) for name in forwards}
    rounds = time_all(steps, device, samples)
    times = {name: statistics.median(ts) for name, ts in rounds.items()}
    ratio = {name: statistics.median(t / u for t, u in zip(rounds[name], rounds["stock"])) for name in ("native", "python")}
    return times, ratio


def norm_layers(device: str, quick: bool, samples: int) -> tuple[list[str], list[str]]:
    """One training step (forward, Σ out·r with r a fixed random tensor, backward) of a normalisation layer alone:
    stock against ours with the native loops (csrc/norm.cpp) and with the Python rule (`_native.python_rule()`).
    Returns the report lines and any gradient errors."""
    import manual_backprop as mb
    from manual_backprop.rules import _native_norm

    built = _native_norm.load() is not None
    lines = [f"Normalisation layers on {device}, train mode" + ("" if built else " (native loops not built)"), "",
             "| layer | input | stock ms | native ms | python ms | native × stock | python × stock |",
             "|---|---|---:|---:|---:|---:|---:|"]
    errors, worst = [], 0.0
    for label, make, shape in NORM_QUICK if quick else NORM_LAYERS:
        torch.manual_seed(0)
        stock = make().to(device)
        ours = mb.convert(copy.deepcopy(stock))
        x = torch.randn(shape, device=device, requires_grad=True)
        r = torch.randn(shape, device=device)  # Σ out² would give LayerNorm a zero gradient

        def python(m=ours):
            with _native.python_rule():
                return (m(x) * r).sum()

        forwards = {"stock": lambda: (stock(x) * r).sum(), "native": lambda: (ours(x) * r).sum(), "python": python}
        times, ratio = stock_native_python(forwards, stock, ours, x, device, samples, f"{device} {label}", errors)
        worst = max(worst, ratio["native"])
        lines.append(f"| {label} | {'×'.join(map(str, shape))} | {times['stock'] * 1e3:.2f} | {times['native'] * 1e3:.2f} | "
                     f"{times['python'] * 1e3:.2f} | {ratio['native']:.2f} | {ratio['python']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"- {'met' if worst <= 1.5 else 'MISSED'}: every layer ≤ 1.5× stock (native): worst {worst:.2f}×"]
    return lines, errors


# ------------------------------------------------------------------ a transformer block

# (d_model, heads, T, batch): the block, and a tiny one for --quick
TRANSFORMER_FULL = (256, 4, 128, 16)
TRANSFORMER_QUICK = (16, 2, 8, 2)
TRANSFORMER_CONTENDERS = ["stock", "converted", "stock compiled", "converted compiled"]


def transformer_block(device: str, dims: tuple, backend: str, samples: int) -> tuple[list[str], list[str]]:
    """One training step of torch.nn.TransformerEncoderLayer (pre-norm, GELU, feed-forward 4d), stock against
    `manual_backprop.convert` of it, eager and compiled. Returns the report lines and any gradient errors."""
    import manual_backprop as mb

    d, heads, T, batch = dims
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True).to(device)
    converted = mb.convert(stock)
    x = torch.randn(batch, T, d, device=device)
    target = torch.randn(batch, T, d, device=device)
    loss = nn.MSELoss()
    torch._dynamo.reset()
    forwards = {
        "stock": lambda: loss(stock(x), target),
        "converted": lambda: loss(converted(x), target),
        "stock compiled": torch.compile(lambda: loss(stock(x), target), backend=backend),
        "converted compiled": torch.compile(lambda: loss(converted(x), target), backend=backend),
    }
    models = {"stock": stock, "converted": converted, "stock compiled": stock, "converted compiled": converted}
    steps = {name: make_step(forward, list(models[name].parameters())) for name, forward in forwards.items()}
    errors, reference = [], None
    for name, forward in forwards.items():
        params = list(models[name].parameters())
        for p in params:
            p.grad = None
        value = forward()
        value.backward()
        got = [value.detach()] + [p.grad for p in params]
        if reference is None:
            reference = got
        elif not all(g is not None and torch.allclose(g, r, rtol=1e-4, atol=1e-5) for g, r in zip(got, reference)):
            errors.append(f"{device} transformer block {name}: gradients differ from stock")
    rounds = time_all(steps, device, samples)
    times = {name: statistics.median(ts) for name, ts in rounds.items()}

    def ratio(name, to):
        return statistics.median(t / u for t, u in zip(rounds[name], rounds[to]))

    saved = {}
    for name in ("stock", "converted"):
        saved[name] = count_saved_bytes(forwards[name], list(models[name].parameters()))
    conversion = mb.report(converted)
    share = 100 * conversion.manual_parameters / (conversion.manual_parameters + conversion.stock_parameters)
    lines = [f"Transformer block on {device}: nn.TransformerEncoderLayer(d={d}, {heads} heads, feed-forward {4 * d}, "
             f"GELU, pre-norm), T={T}, batch {batch}; converted: {share:.1f}% of parameters on manual rules", "",
             "| contender | step ms | × stock (same mode) | saved KiB |", "|---|---:|---:|---:|"]
    for name in TRANSFORMER_CONTENDERS:
        base = "stock compiled" if "compiled" in name else "stock"
        kib = f"{saved[name] / 1024:.0f}" if name in saved else ""
        lines.append(f"| {name} | {times[name] * 1e3:.3f} | {ratio(name, base):.2f} | {kib} |")
    for name, base in (("converted", "stock"), ("converted compiled", "stock compiled")):
        r = ratio(name, base)
        lines.append(f"- transformer block {'met' if r <= 1.2 else 'MISSED'} on {device}: {name} ≤ 1.2× {base}: {r:.2f}×")
    return lines, errors


# (T, N, H) and layer settings of the recurrent grid: every shape with 1 and 2 layers, bidirectional once
RECURRENT_SHAPES = [(40, 100, 64), (100, 32, 128), (20, 256, 256)]
RECURRENT_QUICK = [(4, 3, 8)]
RECURRENT_SETTINGS = [dict(num_layers=1), dict(num_layers=2), dict(num_layers=1, bidirectional=True)]
RECURRENT_CONTENDERS = ["stock", "native", "python"]


def recurrent_layers(device: str, quick: bool, samples: int) -> tuple[list[str], list[str]]:
    """One training step (forward, Σ output², backward) of nn.LSTM and nn.GRU: stock against ours, with the
    native loops over time (csrc/recurrent.cpp) and with the Python rule's loops (`_native.python_rule()`).
    Input size = hidden size H, sequence-first (T, N, H). Returns the report lines and any gradient errors."""
    from manual_backprop.rules import _native_recurrent

    shapes = RECURRENT_QUICK if quick else RECURRENT_SHAPES
    settings = RECURRENT_SETTINGS[:1] if quick else RECURRENT_SETTINGS
    built = _native_recurrent.load() is not None
    lines = [f"Recurrent layers on {device}" + ("" if built else " (native loops not built: both run the Python rule)"), "",
             "| layer | T, N, H | layers | stock ms | native ms | python ms | native × stock | python × stock "
             "| saved KiB stock | saved KiB ours |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    errors, ratios, saved_ok = [], {"native": [], "python": []}, True
    for kind in ("LSTM", "GRU"):
        for T, N, H in shapes:
            for setting in settings:
                torch.manual_seed(0)
                stock = getattr(nn, kind)(H, H, **setting).to(device)
                ours = getattr(mnn, kind)(H, H, **setting).to(device)
                ours.load_state_dict(stock.state_dict())
                x = torch.randn(T, N, H, device=device, requires_grad=True)

                def python(m=ours):
                    with _native.python_rule():
                        return m(x)[0].square().sum()

                forwards = {"stock": lambda: stock(x)[0].square().sum(), "native": lambda: ours(x)[0].square().sum(),
                            "python": python}
                times, ratio = stock_native_python(forwards, stock, ours, x, device, samples,
                                                   f"{device} {kind} {(T, N, H)} {setting}", errors)
                for name in ratios:
                    ratios[name].append(ratio[name])
                saved = {name: count_saved_bytes(forwards[name], list(model.parameters()))
                         for name, model in (("stock", stock), ("native", ours))}
                saved_ok &= saved["native"] <= saved["stock"]
                layers = f"{setting['num_layers']}" + (" bidirectional" if setting.get("bidirectional") else "")
                lines.append(f"| {kind} | {T}, {N}, {H} | {layers} | {times['stock'] * 1e3:.2f} | "
                             f"{times['native'] * 1e3:.2f} | {times['python'] * 1e3:.2f} | {ratio['native']:.2f} | "
                             f"{ratio['python']:.2f} | {saved['stock'] / 1024:.0f} | {saved['native'] / 1024:.0f} |")
                print(lines[-1], flush=True)
    worst, mean = max(ratios["native"]), geomean(ratios["native"])
    lines += ["",
              f"- native {'met' if worst <= 1.2 else 'MISSED'}: every case ≤ 1.2× stock: worst {worst:.2f}×",
              f"- native {'met' if mean <= 1.0 else 'MISSED'}: geomean ≤ 1.0× stock: {mean:.2f}×",
              f"- python rule (measured): geomean {geomean(ratios['python']):.2f}× stock, worst {max(ratios['python']):.2f}×",
              f"- saved bytes {'met' if saved_ok else 'MISSED'}: ours never saves more than stock"]
    return lines, errors


# (sizes, batch) of the per-layer rows: the course size, then 256, 512 and 1024 wide
PER_LAYER_SIZES = [((4, 8, 8, 1), 32), ((256, 256, 256, 10), 256), ((512, 512, 512, 10), 256),
                   ((1024, 1024, 1024, 10), 256)]
PER_LAYER_QUICK = [((4, 8, 8, 1), 8)]


def per_layer_rows(device: str, quick: bool, samples: int, activations) -> tuple[list[str], list[str]]:
    """One training step (forward, loss, backward) of a Sequential of manual_backprop.nn modules, loss included
    (BCEWithLogits for one output, CrossEntropy for more), against the stock Sequential and loss: "native" with the
    per-layer native nodes (csrc/layers.cpp, switched on), "python" with the Python rules (`_native.python_rule()`), one model.
    Returns the report lines and any gradient errors."""
    sizes_list = PER_LAYER_QUICK if quick else PER_LAYER_SIZES
    built = _native.load() is not None
    lines = [f"Per-layer modules with their loss on {device}" + ("" if built else " (native rules not built: both "
                                                                  "run the Python rules)"), "",
             "| network | batch | act | stock ms | native ms | python ms | native × stock | python × stock |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    errors, ratios = [], {}
    for sizes, batch in sizes_list:
        for act in activations:
            case = Case(device, sizes, batch, act, False)
            stock, ours = stock_and_per_layer(sizes, act, device)
            x = torch.randn(batch, sizes[0], device=device)
            if sizes[-1] == 1:
                y = torch.randint(0, 2, (batch, 1), device=device).float()
                stock_loss, our_loss = nn.BCEWithLogitsLoss(), mnn.BCEWithLogitsLoss()
            else:
                y = torch.randint(0, sizes[-1], (batch,), device=device)
                stock_loss, our_loss = nn.CrossEntropyLoss(), mnn.CrossEntropyLoss()
            forwards = {"stock": (lambda: stock_loss(stock(x), y), stock),
                        "native": (native_layers(lambda: our_loss(ours(x), y)), ours),
                        "python": (python_rule(lambda: our_loss(ours(x), y)), ours)}
            params = {name: list(model.parameters()) for name, (_, model) in forwards.items()}
            errors += check_gradients(case, forwards, params)
            steps = {name: make_step(forward, params[name]) for name, (forward, _) in forwards.items()}
            case.rounds = time_all(steps, device, samples)
            case.times = {name: statistics.median(ts) for name, ts in case.rounds.items()}
            ratios[case] = {name: case.ratio(name) for name in ("native", "python")}
            lines.append(f"| {case.network} | {batch} | {act} | {case.times['stock'] * 1e3:.3f} | "
                         f"{case.times['native'] * 1e3:.3f} | {case.times['python'] * 1e3:.3f} | "
                         f"{ratios[case]['native']:.2f} | {ratios[case]['python']:.2f} |")
            print(lines[-1], flush=True)
    course = [c for c in ratios if max(c.sizes) <= 64]
    wide = [c for c in ratios if max(c.sizes) >= 256]
    lines.append("")
    for group, limit, what in ((course, 1.15, "at course sizes (≤ 64 wide)"), (wide, 1.05, "at 256 wide and up")):
        if group:
            worst = max(group, key=lambda c: ratios[c]["native"])
            r = ratios[worst]["native"]
            lines.append(f"- per-layer native {'met' if r <= limit else 'MISSED'}: ≤ {limit:.2f}× stock {what}: "
                         f"worst {r:.2f}× ({worst.network} {worst.activation}); Python rules "
                         f"{max(ratios[c]['python'] for c in group):.2f}× there")
    return lines, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, few samples: checks correctness, not speed")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: cpu, and cuda where available (default)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="folder for bench.md and bench.png")
    parser.add_argument("--samples", type=int, default=None, help="timing samples per contender (default 15, quick 3)")
    parser.add_argument("--activations", nargs="+", default=None, choices=sorted(BENCH_ACTIVATIONS))
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor, quick aot_eager)")
    parser.add_argument("--our-loss", action="store_true",
                        help="per-layer, fused and compiled use manual_backprop's loss (default: torch's, for all)")
    parser.add_argument("--only", choices=["all", "mlp", "transformer", "recurrent", "per-layer", "norm", "conv"],
                        default="all",
                        help="which benchmark: the MLP grid, the transformer block, or both (default); "
                             "recurrent: LSTM and GRU layers alone; per-layer: Sequential of our modules with "
                             "their loss, native and Python rules; norm: the normalisation layers alone; "
                             "conv: float32 accuracy of the convolutions' ∂J/∂W (these four not part of all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--cnn", choices=["include", "skip", "only"], default="include",
                        help="the convolutional networks (resnet block, resnet18, mobilenet_v3_small; quick: a tiny block)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        parser.error("--device cuda: CUDA is not available")
    grid = QUICK_GRID if args.quick else FULL_GRID
    activations = args.activations or (["sigmoid", "relu"] if args.quick else list(BENCH_ACTIVATIONS))
    samples = args.samples or (3 if args.quick else 15)
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")

    start = time.perf_counter()
    cases, errors = [], []
    run_mlp = args.cnn != "only" and args.only in ("all", "mlp")
    run_transformer = args.cnn != "only" and args.only in ("all", "transformer")
    for device in devices if run_mlp else []:
        for sizes, batch, gemm_bound in grid:
            for act in activations:
                case = Case(device, sizes, batch, act, gemm_bound)
                torch._dynamo.reset()  # one compiled graph per case; never hit the recompile limit
                forwards, steps, params = build(case, backend, args.our_loss)
                errors += check_gradients(case, forwards, params)
                for name, (forward, _) in forwards.items():
                    try:
                        case.saved[name] = count_saved_bytes(forward, params[name])
                    except Exception:  # saved-tensor hooks under torch.compile may be refused: leave it blank
                        case.saved[name] = None
                    case.peak[name] = peak_bytes(steps[name], device)
                case.rounds = time_all(steps, device, samples)
                case.times = {name: statistics.median(ts) for name, ts in case.rounds.items()}
                cases.append(case)
                print(f"{device} {case.network} batch {batch} {act}: "
                      + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in case.times.items()), flush=True)

    cnn_cases: list[Case] = []
    if args.cnn != "skip" and args.only == "all":
        cnn_cases, cnn_errors = run_cnn_cases(devices, CNN_QUICK if args.quick else CNN_FULL, samples, backend)
        errors += cnn_errors

    environment = (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                   f"compile backend {backend}, {samples} samples per contender, "
                   f"{'our' if args.our_loss else 'torch'} loss for our contenders; "
                   + ("CUDA: " + torch.cuda.get_device_name() if "cuda" in devices else "CPU only"))
    block_lines = []
    for device in devices if run_transformer else []:
        lines, block_errors = transformer_block(device, TRANSFORMER_QUICK if args.quick else TRANSFORMER_FULL,
                                                backend, samples)
        block_lines += ["", *lines]
        errors += block_errors
        print("\n".join(lines), flush=True)
    for device in devices if args.only == "recurrent" and args.cnn != "only" else []:
        lines, recurrent_errors = recurrent_layers(device, args.quick, samples)
        block_lines += ["", *lines]
        errors += recurrent_errors
    for device in devices if args.only == "per-layer" and args.cnn != "only" else []:
        lines, per_layer_errors = per_layer_rows(device, args.quick, samples, activations)
        block_lines += ["", *lines]
        errors += per_layer_errors
    for device in devices if args.only == "norm" and args.cnn != "only" else []:
        lines, norm_errors = norm_layers(device, args.quick, samples)
        block_lines += ["", *lines]
        errors += norm_errors
    if args.only == "conv" or (args.cnn != "skip" and args.only == "all"):
        lines, conv_errors = conv_accuracy()
        block_lines += ["", *lines]
        errors += conv_errors
    report = [f"Benchmark ({environment}); wall time {time.perf_counter() - start:.0f} s"]
    if cases:
        report += ["", "Step time ÷ stock autograd, geometric mean over the activations:", "", summary(cases), "",
                   "Every case:", "", table(cases)]
    if cnn_cases:  # convolutional networks: their own table
        report += ["", "Convolutional networks (train mode; stock autograd, convert(), convert() + torch.compile):", "",
                   cnn_table(cnn_cases)]
    if cases or cnn_cases:
        report += ["", "Targets:"]
        for met, text in targets(cases) + native_targets(cases) + cnn_targets(cnn_cases):
            report.append(f"- {'met' if met else 'MISSED'}: {text}")
    markdown = "\n".join(report + block_lines)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(markdown + "\n")
    if cases:
        chart(cases, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.md'}" + (f" and {args.out / 'bench.png'}" if cases else ""))
    if errors:
        print("WRONG GRADIENTS:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
