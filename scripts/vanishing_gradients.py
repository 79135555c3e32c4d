"""Vanishing gradients, seen on the δ tape: the notes' lesson as a runnable example.

    python scripts/vanishing_gradients.py                      # writes docs/vanishing_gradients.{png,md}
    python scripts/vanishing_gradients.py --out /tmp --quick   # fewer epochs: a smoke test

The same network, 64 → 8 hidden layers of 32 → 10, is trained on scikit-learn's digits
three times, with sigmoid, tanh and relu hidden activations (our fused `MLP` rule and our
cross-entropy; the same seed, so the same initial weights). Before and after training,
one backward over the whole training set runs under `manual_backprop.tape`, which keeps
‖δ(l)‖ for every layer. In the notes' numbering a(1) = x, z(l+1) = W(l) a(l) + b(l), and
δ(l) = ∂J/∂z(l): the tape's "layers.k" is δ(k+2), from δ(2) (first hidden layer) to
δ(10) = softmax(z) − y over N (the output).

The notes' recursion δ(l) = (W(l)ᵀ δ(l+1)) ⊙ σ'(z(l)) with σ' ≤ 1/4 for the sigmoid gives
‖δ(l)‖ ≤ ¼ ‖W(l)‖₂ ‖δ(l+1)‖ (‖W‖₂: largest singular value). Chained down from the
recorded output error, that bound is drawn for the sigmoid network: the recorded δ's sit
under it, shrinking about tenfold every two layers. tanh (σ' ≤ 1) and relu (σ' ∈ {0, 1})
have no such factor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import manual_backprop
import manual_backprop.nn as mnn

ACTIVATIONS = ("sigmoid", "tanh", "relu")
HIDDEN, WIDTH = 8, 32


def digits(seed: int = 0):
    """Standardised digits features (1797 × 64) and labels, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (x[:split], y[:split]), (x[split:], y[split:])


def delta_norms(model, loss_fn, x, y) -> dict:
    """‖δ(l)‖ per layer ("layers.k") from one backward over (x, y), recorded by the tape."""
    with manual_backprop.tape(model, keep="delta", reduce="norm") as tape:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return {name: float(value) for name, value in tape.delta.items()}


def sigmoid_bound(model, norms: dict) -> list[float]:
    """Chained bound from the output down: B(L) = ‖δ(L)‖, B(l) = ¼ ‖W(l)‖₂ B(l+1), per layer k = 0 … L−1."""
    L = len(model.layers)
    bound = [0.0] * L
    bound[L - 1] = norms[f"layers.{L - 1}"]
    for k in range(L - 2, -1, -1):  # δ of layer k's output passes back through W of layer k+1
        W = model.layers[k + 1].weight.detach()
        bound[k] = 0.25 * float(torch.linalg.matrix_norm(W, ord=2)) * bound[k + 1]
    return bound


def train(activation: str, train_set, test_set, epochs: int, seed: int = 0) -> dict:
    (x, y), (x_test, y_test) = train_set, test_set
    torch.manual_seed(seed)  # the same initial weights for every activation
    model = mnn.MLP([x.shape[1], *[WIDTH] * HIDDEN, 10], activation=activation)
    loss_fn = mnn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    result = {"start": delta_norms(model, loss_fn, x, y)}
    result["bound_start"] = sigmoid_bound(model, result["start"])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(128):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    result["end"] = delta_norms(model, loss_fn, x, y)
    result["bound_end"] = sigmoid_bound(model, result["end"])
    with torch.no_grad():
        result["accuracy"] = float((model(x_test).argmax(1) == y_test).float().mean())
    return result


def notes_label(k: int) -> str:
    return f"δ({k + 2})"


TITLE = "# Vanishing gradients: ‖δ(l)‖ per layer, measured\n\nWritten by `python scripts/vanishing_gradients.py`."


def table(results: dict) -> str:
    """Markdown: ‖δ(l)‖ per layer and activation, at the start and end of training."""
    L = HIDDEN + 1
    head = "| layer | " + " | ".join(f"{a} start | {a} end" for a in ACTIVATIONS) + " | sigmoid bound (start) |"
    rule = "|---|" + "---:|---:|" * len(ACTIVATIONS) + "---:|"
    rows = []
    for k in range(L):
        cells = [f"{results[a][when][f'layers.{k}']:.2e}" for a in ACTIVATIONS for when in ("start", "end")]
        place = " (output)" if k == L - 1 else " (first hidden)" if k == 0 else ""
        rows.append(f"| {notes_label(k)}{place} | " + " | ".join(cells) + f" | {results['sigmoid']['bound_start'][k]:.2e} |")
    accuracy = "| test accuracy | " + " | ".join(f"– | {results[a]['accuracy']:.3f}" for a in ACTIVATIONS) + " | |"
    return "\n".join([head, rule, *rows, accuracy])


def plot(results: dict, path: Path, epochs: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L = HIDDEN + 1
    layers = list(range(2, L + 2))  # the notes' l of δ(l)
    colors = {"sigmoid": "tab:blue", "tanh": "tab:orange", "relu": "tab:green"}
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"‖δ(l)‖ per layer, recorded by manual_backprop.tape: 64 → {HIDDEN}×{WIDTH} → 10 on digits, same initial weights")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, when, title in ((panels[0], "start", "before training"), (panels[1], "end", f"after {epochs} epochs (Adam)")):
        for activation in ACTIVATIONS:
            values = [results[activation][when][f"layers.{k}"] for k in range(L)]
            axes.plot(layers, values, marker="o", color=colors[activation], label=activation)
        axes.plot(layers, results["sigmoid"][f"bound_{when}"], linestyle="--", color=colors["sigmoid"], alpha=0.6,
                  label="sigmoid bound: ‖δ(l)‖ ≤ ¼‖W(l)‖₂‖δ(l+1)‖ (σ' ≤ 1/4)")
        axes.set_yscale("log")
        axes.set_xticks(layers, [f"δ({l})" for l in layers])
        axes.set_xlabel("layer l (notes' numbering: δ(l) = ∂J/∂z(l); δ(2) first hidden, δ(10) output)")
        axes.set_title(title)
        axes.grid(alpha=0.3, which="both")
    panels[0].set_ylabel("‖δ(l)‖₂ over the training set (log scale)")
    panels[0].legend(fontsize="small", loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                        help="folder for vanishing_gradients.png and vanishing_gradients.md")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke test")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give, and timings stay steady
    started = time.perf_counter()
    train_set, test_set = digits()
    results = {activation: train(activation, train_set, test_set, epochs) for activation in ACTIVATIONS}
    plot(results, args.out / "vanishing_gradients.png", epochs)
    text = table(results)
    (args.out / "vanishing_gradients.md").write_text(f"{TITLE}\n\n{text}\n")
    print(text)
    print(f"\nwrote {args.out / 'vanishing_gradients.png'} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
