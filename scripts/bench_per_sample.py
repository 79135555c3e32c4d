"""Per-sample gradients and norms: ours against Opacus, torch.func and BackPACK, in one run.

    .venv/bin/python scripts/bench_per_sample.py [--quick] [--rounds N] [--device cpu|cuda] [--only NAME]

The models: an MLP 784→512→512→10 at batch 256, a transformer-style block (embedding,
one TransformerEncoderLayer, a linear head; sequences of 32 at batch 32), two small CNNs
(two 3×3 convolutions and a pooled head; two 5×5 convolutions and a linear head on their flattened
output; 28×28 images at batch 64), and an LSTM with a linear head on its last step at three sizes
(steps T, batch N, width H) = (40, 100, 64), (100, 32, 128), (20, 256, 256).
`--only lstm` runs the models whose name contains "lstm". Each contender does one training step's
worth of work: forward, backward, and every sample's gradient norm, and

    stock step            the stock model's ordinary (non-private) forward and backward: the baseline
                          of the "× stock step" column, beside every per-sample and DP-SGD contender
    ours materialize      manual_backprop.per_sample_grads: p.grad_sample (N, *p.shape) and ps.norms
    ours norms only       materialize=False: ps.norms from the norm identities, no (N, *p.shape)
    ours DP-SGD           the whole private step: per_sample_grads(materialize=False, bookkeeping=True)
                          (backward forms no unclipped weight gradient), then privacy.clip_and_noise_
                          (σ = 1, C = 1): each rule's clipped sum Σₙ cₙ gₙ formed once, plus noise
    opacus DP-SGD         Opacus's private step: GradSampleModule's grad_sample, then DPOptimizer's
                          pre_step (per-sample clipping, the clipped sum, noise; σ = 1, C = 1)
    opacus hooks          GradSampleModule: p.grad_sample, norms from them (Opacus's clipping does this);
                          ModuleValidator.fix first, as Opacus users do: nn.LSTM becomes its DPLSTM with
                          the same weights (DPLSTM names its parameters as torch does, weight_ih_l0 …)
    opacus ghost          GradSampleModuleFastGradientClipping: norms only (ghost clipping's first pass)
    torch.func            vmap(grad(per-sample loss)) on the stock model, norms from them
    backpack              BatchGrad + BatchL2Grad, where backpack-for-pytorch is installed
                          (`make bench-per-sample` installs it without its torchvision dependency)

Contenders alternate within each round (the machine is shared: the ratios, measured in the same
run, are what to read); each figure is the median over rounds. Peak memory: CUDA's
max_memory_allocated on a GPU; on CPU the peak of the allocations torch's profiler records during
one step (above what was allocated before it). A contender that cannot run a model says why.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import manual_backprop


# ------------------------------------------------------------------ models


class Block(nn.Module):
    """Embedding, one pre-norm-free TransformerEncoderLayer (attention, LayerNorm, feed-forward), linear head."""

    def __init__(self, vocab=1000, d=128, heads=4, ff=256, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    """An LSTM over (N, T, H) inputs, a linear head on its last step's output."""

    def __init__(self, width: int, classes=10):
        super().__init__()
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def lstm_model(T: int, N: int, H: int):
    return ("lstm T%d N%d H%d" % (T, N, H), lambda: Recurrent(H), lambda g: torch.randn(N, T, H, generator=g))


def models(quick: bool):
    """(name, stock model factory, input maker)."""
    s = 4 if quick else 1
    mlp = ("mlp 784-512-512-10, batch %d" % (256 // s),
           lambda: nn.Sequential(nn.Linear(784, 512 // s), nn.ReLU(), nn.Linear(512 // s, 512 // s), nn.ReLU(),
                                 nn.Linear(512 // s, 10)),
           lambda g: torch.randn(256 // s, 784, generator=g))
    block = ("transformer block d128 seq32, batch %d" % (32 // s),
             lambda: Block(d=128 // s, ff=256 // s),
             lambda g: torch.randint(0, 1000, (32 // s, 32 // s), generator=g))
    cnn = ("cnn 2 conv 28x28, batch %d" % (64 // s),
           lambda: nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
           lambda g: torch.randn(64 // s, 1, 28, 28, generator=g))
    side = 14 if quick else 28
    cnn5 = ("cnn 2 conv5 + linear %dx%d, batch %d" % (side, side, 64 // s),
            lambda: nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(32 * (side - 8) ** 2, 10)),
            lambda g: torch.randn(64 // s, 1, side, side, generator=g))
    lstms = [lstm_model(5, 8, 16)] if quick else [lstm_model(*size) for size in LSTM_SIZES]
    return [mlp, block, cnn, cnn5, *lstms]


LSTM_SIZES = [(40, 100, 64), (100, 32, 128), (20, 256, 256)]


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


# ------------------------------------------------------------------ contenders: each returns a step function


def ours(materialize: bool):
    def build(stock, x, y):
        model = manual_backprop.convert(copy.deepcopy(stock))

        def step():
            with manual_backprop.per_sample_grads(model, materialize=materialize) as ps:
                loss_fn(model(x), y).backward()
            return ps.norms

        return step, lambda: _clear(model)

    return build


def stock_step(stock, x, y):
    """The baseline: the stock model's ordinary training step, no per-sample anything."""
    model = copy.deepcopy(stock)

    def step():
        loss_fn(model(x), y).backward()

    step.comparable, step.note = False, "n/a (no norms: not private)"
    return step, lambda: _clear(model)


MAX_GRAD_NORM, NOISE_MULTIPLIER = 1.0, 1.0


def ours_dp(stock, x, y):
    model = manual_backprop.convert(copy.deepcopy(stock))

    def step():
        with manual_backprop.per_sample_grads(model, materialize=False, bookkeeping=True) as ps:
            loss_fn(model(x), y).backward()
        manual_backprop.privacy.clip_and_noise_(ps, MAX_GRAD_NORM, NOISE_MULTIPLIER)
        return ps.norms

    return step, lambda: _clear(model)


def opacus_dp(stock, x, y):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(_opacus_ready(stock))
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=NOISE_MULTIPLIER,
                            max_grad_norm=MAX_GRAD_NORM, expected_batch_size=len(x))

    def step():
        loss_fn(model(x), y).backward()
        optimizer.pre_step()  # clip each sample, sum, add noise, average: the step's gradient in p.grad

    step.comparable, step.note = False, "n/a (DPOptimizer keeps its norms)"
    return step, lambda: optimizer.zero_grad(set_to_none=True)


def _clear(model):
    """Drop the last step's gradients (so a step's own allocations are what gets measured)."""
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "grad_sample"):
            p.grad_sample = None


def _norms_from_grad_samples(params):
    return torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)


def _opacus_ready(stock):
    """The model as Opacus users run it: ModuleValidator.fix swaps nn.MultiheadAttention for its DPMultiheadAttention."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(copy.deepcopy(stock))


def _swapped(model, stock) -> bool:
    """Whether ModuleValidator.fix changed the model's weights (its DPMultiheadAttention has other parameters,
    not loaded from the original's): its norms are then not comparable with the others'. Its DPLSTM has
    torch's names (in another order) and is loaded with the LSTM's weights: comparable."""
    return sorted(n for n, _ in model.named_parameters()) != sorted(n for n, _ in stock.named_parameters())


def opacus_hooks(stock, x, y):
    from opacus import GradSampleModule

    model = GradSampleModule(_opacus_ready(stock))

    def step():
        loss_fn(model(x), y).backward()
        return _norms_from_grad_samples([p for p in model.parameters() if p.requires_grad])

    step.comparable = not _swapped(model._module, stock)
    return step, lambda: _clear(model)


def opacus_ghost(stock, x, y):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = GradSampleModuleFastGradientClipping(_opacus_ready(stock), max_grad_norm=1.0, use_ghost_clipping=True)

    def step():
        loss_fn(model(x), y).backward()
        return model.get_norm_sample()

    step.comparable = not _swapped(model._module, stock)
    return step, lambda: _clear(model)


def torch_func(stock, x, y):
    model = copy.deepcopy(stock)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(params, xn, yn):
        return loss_fn(functional_call(model, params, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        grads = per_sample(params, x, y)
        return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)

    return step, lambda: None


def backpack(stock, x, y):
    from backpack import backpack as bp
    from backpack import extend
    from backpack.extensions import BatchGrad, BatchL2Grad

    model, criterion = extend(copy.deepcopy(stock)), extend(nn.CrossEntropyLoss())

    def step():
        with bp(BatchGrad(), BatchL2Grad()):
            criterion(model(x), y).backward()
        missing = [n for n, p in model.named_parameters() if not hasattr(p, "batch_l2")]
        if missing:
            raise NotImplementedError(f"BackPACK has no per-sample extension for {missing[0]} ({len(missing)} params)")
        return torch.stack([p.batch_l2 for p in model.parameters()]).sum(0).sqrt() * len(x)  # undo the mean's 1/N

    return step, lambda: _clear(model)


CONTENDERS = [
    ("stock step", stock_step),
    ("ours materialize", ours(True)),
    ("ours norms only", ours(False)),
    ("opacus hooks", opacus_hooks),
    ("opacus ghost", opacus_ghost),
    ("torch.func vmap(grad)", torch_func),
    ("backpack", backpack),
    ("ours DP-SGD", ours_dp),
    ("opacus DP-SGD", opacus_dp),
]


# ------------------------------------------------------------------ measuring


def peak_bytes(step, reset, device: str) -> int:
    """Peak memory one step allocates above what was allocated before it (the last step's results dropped first)."""
    reset()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def timed(step, reset, device: str) -> float:
    reset()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(quick: bool, rounds: int, device: str, only: str = "") -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, make, inputs in models(quick):
        if only not in name:
            continue
        torch.manual_seed(0)
        stock = make().to(device)
        x = inputs(g).to(device)
        y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
        steps, reference = {}, None
        for contender, build in CONTENDERS:
            try:
                step, reset = build(stock, x, y)
                norms = step()  # warm-up, and the answer every contender must agree on
            except Exception as error:  # noqa: BLE001 (a peer that cannot run this model: say why)
                rows.append(dict(model=name, contender=contender, error=f"{type(error).__name__}: {str(error)[:80]}"))
                continue
            agrees = None  # a different model (Opacus's swapped attention), or no norms: nothing to compare
            if getattr(step, "comparable", True):
                reference = norms if reference is None else reference
                agrees = torch.allclose(norms.float(), reference.float(), rtol=1e-3, atol=1e-5)
            steps[contender] = (step, reset, agrees, peak_bytes(step, reset, device))  # before the next is built
        times = {c: [] for c in steps}
        for _ in range(rounds):  # alternate: every contender once per round
            for contender, (step, reset, *_) in steps.items():
                times[contender].append(timed(step, reset, device))
        for contender, (step, reset, agrees, peak) in steps.items():
            rows.append(dict(model=name, contender=contender, seconds=statistics.median(times[contender]),
                             peak=peak, agrees=agrees, note=getattr(step, "note", "n/a (DPMultiheadAttention)")))
    return rows


def _agreement(row) -> str:
    return row["note"] if row["agrees"] is None else "yes" if row["agrees"] else "NO"


def table(rows: list[dict]) -> str:
    """Markdown: per model, each contender's time and peak memory, as ratios to Opacus's hooks, and its time
    as a ratio to the stock (non-private) step."""
    lines = ["| model | contender | step ms | × opacus hooks | × stock step | peak MiB | × opacus hooks | norms agree |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        order = [c for c, _ in CONTENDERS]
        group = sorted((r for r in rows if r["model"] == model), key=lambda r: order.index(r["contender"]))
        base = next((r for r in group if r["contender"] == "opacus hooks" and "error" not in r), None)
        stock = next((r for r in group if r["contender"] == "stock step" and "error" not in r), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {model} | {r['contender']} | n/a | | | | | {r['error']} |")
                continue
            t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else ""
            s_ratio = f"{r['seconds'] / stock['seconds']:.2f}" if stock else ""
            m_ratio = f"{r['peak'] / base['peak']:.2f}" if base and base["peak"] > 0 else ""
            lines.append(f"| {model} | {r['contender']} | {r['seconds'] * 1e3:.1f} | {t_ratio} | {s_ratio} | "
                         f"{r['peak'] / 2**20:.1f} | {m_ratio} | {_agreement(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, one round (the test runs this)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="run only the models whose name contains this (e.g. lstm)")
    options = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = run(options.quick, 1 if options.quick else options.rounds, options.device, options.only)
    machine = torch.cuda.get_device_name() if options.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"per-sample gradients and norms, {machine}, torch {torch.__version__}, median of "
          f"{1 if options.quick else options.rounds} rounds")
    print(table(rows))
    return 0 if all(r.get("agrees", True) is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
