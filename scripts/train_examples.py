"""`make train`: train the example tasks on our rules and check their test metrics.

For each shipped config (regression on diabetes, binary on breast_cancer, multi-class
on digits, digits as 1×8×8 images through a small CNN, `SmallCNN` converted to our
rules, private training on breast_cancer, and MNIST-1D's published CNN) this runs the `manual-backprop` CLI's fit with backend manual (the network
is `manual_backprop.nn.MLP`, one fused rule; with --backend autograd the stock
nn.Sequential), tests the final model on the held-out test split, prints one table of
test metrics, and exits non-zero when a metric misses its floor. Logs, checkpoints and
each run's training_curves.png go under lightning_logs/examples/<config>/.

    .venv/bin/python scripts/train_examples.py [--backend autograd] [--max_epochs N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

# (config, metric, floor): the metric each task must reach on its test split with the shipped seeds.
EXAMPLES = [
    ("regression_diabetes", "r2", 0.30),
    ("binary_breast_cancer", "accuracy", 0.95),
    ("multiclass_digits", "accuracy", 0.95),
    ("multiclass_digits_cnn", "accuracy", 0.97),  # digits as 1×8×8 images, a small CNN
    # DP-SGD on our per-sample norms: σ = 1.5, C = 1, 20 epochs, ε ≈ 4.6 at δ = 1e-5; test accuracy
    # 0.921 with the shipped seed and Poisson sampling (non-private 0.965): floor 0.90
    ("binary_breast_cancer_dp", "accuracy", 0.90),
    # MNIST-1D (generated, not downloaded), the authors' CNN and settings (6,000 steps of Adam 1e-2, batch 100):
    # published 94 %, their notebook's run 92.3 %; ours 92.4 % with the shipped seed. Floor: 2 points under
    # the notebook's figure, as docs/mnist1d.md's reproduction target.
    ("mnist1d_cnn", "accuracy", 0.903),
]


def train_and_test(
    config: str, backend: str, root: Path, max_epochs: int | None, threads: int = 1
) -> tuple[dict[str, float], float, Path, str]:
    from lightning_modules import config_path
    from lightning_modules.cli import build_cli

    args = [
        "--config", str(config_path(config)),
        f"--model.init_args.backend={backend}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root / config}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--threads={threads}",  # as the command's --threads: make train and manual-backprop agree
    ]  # fmt: skip
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    start = time.perf_counter()
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    epsilon = cli.trainer.callback_metrics.get("train/epsilon")  # DP-SGD's privacy spent
    (results,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if epsilon is not None:
        results["epsilon"] = float(epsilon)
    seconds = time.perf_counter() - start
    curves = next(cb.path for cb in cli.trainer.callbacks if hasattr(cb, "history"))
    network = type(cli.model.net).__name__  # MLP on backend manual, Sequential on autograd
    return {k.removeprefix("test/"): float(v) for k, v in results.items()}, seconds, curves, network


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="manual", choices=["manual", "autograd"])
    parser.add_argument("--max_epochs", type=int, default=None, help="override the configs' max_epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny networks)")
    parser.add_argument("--root", type=Path, default=Path("lightning_logs/examples"))
    options = parser.parse_args(argv)

    import torch
    import pytorch_lightning  # noqa: F401  (sets its loggers' levels on import; quieted below)

    # One table is the output: keep Lightning's start-up notices, hints and warnings out of it.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    # These networks are at most 64 wide: one intra-op thread beats several (no sync per tiny matmul).
    torch.set_num_threads(options.threads)

    rows, failures, networks, total = [], [], set(), time.perf_counter()
    for config, metric, floor in EXAMPLES:
        if config.endswith("_dp") and options.backend != "manual":  # per-sample norms need our rules
            print(f"skipping {config}: DP-SGD needs backend manual", file=sys.stderr)
            continue
        print(f"training {config} (backend {options.backend}) ...", file=sys.stderr, flush=True)
        results, seconds, curves, network = train_and_test(config, options.backend, options.root, options.max_epochs, options.threads)
        networks.add(network)
        value = results[metric]
        ok = value >= floor
        if not ok:
            failures.append(f"{config}: test {metric} = {value:.4f} < {floor}")
        others = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k not in (metric, "loss"))
        rows.append((config, f"{metric} {value:.4f}", f">= {floor:g}", "ok" if ok else "FAIL",
                     f"{results['loss']:.4f}", others, f"{seconds:.0f}s", str(curves)))  # fmt: skip

    header = ("task", "main test metric", "floor", "", "test loss", "other test metrics", "time", "curves")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(
        f"total {time.perf_counter() - total:.0f}s; backend {options.backend} (network: {', '.join(sorted(networks))}); "
        "regression metrics in the target's units; test loss is the training loss "
        "(regression: MSE on standardized targets, not the mse column)"
    )
    for failure in failures:
        print(f"FLOOR MISSED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
