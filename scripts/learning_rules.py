"""Backprop and the rules that replace it, side by side: an MLP and a small CNN on sklearn's digits.

Every rule trains the same networks from the same initial weights (one torch seed per run,
set before the network is built and again before `convert` draws its feedback matrices),
on the same split and batches, with Adam. Per rule and network it reports the test
accuracy after the last epoch (mean ± half the range over the seeds), and per epoch the test
accuracy and the alignment angle: the mean over hidden layers of the angle between the
rule's weight update and backprop's on a fixed batch (`manual_backprop.alignment`).

    .venv/bin/python scripts/learning_rules.py            # docs/learning_rules.{md,png}, a few minutes on 2 cores
    .venv/bin/python scripts/learning_rules.py --quick --out /tmp/lr   # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

RULES = [
    ("backprop", "BP"),
    ("feedback_alignment", "FA"),
    ("direct_feedback_alignment", "DFA"),
    ("sign_symmetry", "uSF"),
    ("batchwise_random_sign_symmetry", "brSF"),
    ("fixed_random_sign_symmetry", "frSF"),
]
ROOT = Path(__file__).resolve().parents[1]
LR = {"mlp": 1e-3, "cnn": 5e-3}  # Adam; the CNN's as in configs/multiclass_digits_cnn.yaml


def digits(seed: int = 0):
    """Standardised digits (statistics of the training split), 80/20 stratified split: x (N, 64), y (N,)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return (as_tensor((x_train - mean) / std, torch.float32), as_tensor(y_train, torch.long),
            as_tensor((x_test - mean) / std, torch.float32), as_tensor(y_test, torch.long))


def build(kind: str) -> torch.nn.Module:
    """Torch modules (convert puts them on a rule): the MLP as the fused mnn.MLP; the CNN two conv →
    ReLU → max-pool blocks, then a hidden Linear layer (so DFA has a hidden layer to reach) and the output."""
    import manual_backprop.nn as mnn

    nn = torch.nn
    if kind == "mlp":
        return mnn.MLP([64, 128, 128, 10], activation="tanh")
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 × 4 × 4
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 × 2 × 2
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def run(kind: str, rule: str, seed: int, data, epochs: int, batch_size: int, lr: float) -> dict:
    import manual_backprop as mb

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    network = build(kind)
    torch.manual_seed(seed + 1000)  # the feedback matrices: drawn the same for every rule that has them
    model = mb.convert(network, registry=None if rule == "backprop" else rule)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.functional.cross_entropy
    probe = (x_train[:256], y_train[:256])  # the fixed batch the alignment angle is measured on
    order = torch.Generator().manual_seed(seed)
    history = {"accuracy": [], "angle": []}

    def evaluate():
        with torch.no_grad():
            history["accuracy"].append(float((model(x_test).argmax(1) == y_test).float().mean()))
        rows = mb.alignment(model, *probe, loss_fn)
        hidden = [r.update for name, r in list(rows.items())[:-1]]  # every weight but the output layer's
        history["angle"].append(float(np.nanmean(hidden)))

    evaluate()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        evaluate()
    return history


TITLE = "# Learning rules on digits, measured\n\nWritten by `python scripts/learning_rules.py`."


def table(results: dict, seeds: list[int], epochs: dict) -> str:
    lines = [
        f"Test accuracy on sklearn digits' test split after training, mean ± half-range over seeds {seeds}; "
        "angle: the hidden layers' mean angle between the rule's update and backprop's, at the end.",
        "",
        "| rule | | MLP accuracy (%) | MLP angle (°) | CNN accuracy (%) | CNN angle (°) |",
        "|---|---|---|---|---|---|",
    ]
    for rule, short in RULES:
        cells = []
        for kind in ("mlp", "cnn"):
            runs = results[kind][rule]
            acc = np.array([r["accuracy"][-1] for r in runs]) * 100
            angle = np.array([r["angle"][-1] for r in runs])
            cells += [f"{acc.mean():.1f} ± {(acc.max() - acc.min()) / 2:.1f}", f"{angle.mean():.0f}"]
        lines.append(f"| {short} | `{rule}` | " + " | ".join(cells) + " |")
    lines += ["", f"MLP: 64-128-128-10 tanh (fused MLP), {epochs['mlp']} epochs; CNN: conv 8 → pool → conv 16 → pool → "
              f"Linear 64 → Linear 10 (ReLU), {epochs['cnn']} epochs; Adam (lr {LR['mlp']:g} MLP, {LR['cnn']:g} CNN), batch 64. DFA: every hidden layer, convolutions included, gets e "
              "through its own B."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, kind in enumerate(("mlp", "cnn")):
        for rule, short in RULES:
            runs = results[kind][rule]
            for row, key in enumerate(("accuracy", "angle")):
                curves = np.array([r[key] for r in runs]) * (100 if key == "accuracy" else 1)
                epochs = np.arange(curves.shape[1])
                (line,) = axes[row, col].plot(epochs, curves.mean(0), label=short)
                axes[row, col].fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
        axes[0, col].set_title({"mlp": "MLP 64-128-128-10 (tanh)", "cnn": "CNN: 2 conv blocks, 2 Linear"}[kind])
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("angle to backprop's update (°)")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].set_ylim(50, 100)
    axes[0, 0].legend(loc="lower right")
    fig.suptitle("Learning rules on sklearn digits: mean and range over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="MLP epochs (the CNN trains half as many)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch on 256 images: a smoke run")
    args = parser.parse_args(argv)
    seeds, epochs = args.seeds, {"mlp": args.epochs, "cnn": max(1, args.epochs // 2)}
    data = digits()
    if args.quick:
        seeds, epochs = seeds[:1], {"mlp": 1, "cnn": 1}
        data = (data[0][:256], data[1][:256], data[2][:100], data[3][:100])
    torch.set_num_threads(1)  # tiny networks: one thread beats two on a shared machine
    results: dict = {"mlp": {}, "cnn": {}}
    start = time.perf_counter()
    for kind in ("mlp", "cnn"):
        for rule, short in RULES:
            results[kind][rule] = [run(kind, rule, s, data, epochs[kind], 64, LR[kind]) for s in seeds]
            accs = [r["accuracy"][-1] * 100 for r in results[kind][rule]]
            print(f"{kind} {short:5s} {np.mean(accs):5.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results, seeds, epochs)
    (args.out / "learning_rules.md").write_text(f"{TITLE}\n\n{text}")
    plot(results, args.out / "learning_rules.png")
    print(text)
    print(f"wrote {args.out / 'learning_rules.md'} and {args.out / 'learning_rules.png'}")
    bad = [f"{kind}/{rule}" for kind in results for rule in results[kind]
           if not all(math.isfinite(r["accuracy"][-1]) for r in results[kind][rule])]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
