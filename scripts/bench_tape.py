"""What watching δ costs: training-step time with the tape on and off, and with nobody watching.

    python scripts/bench_tape.py                  # CPU (+ CUDA where available), 15 samples
    python scripts/bench_tape.py --quick          # 3 samples, small networks only: a smoke test

Contenders, timed in turn on the same model and batch (one step = zero grads, forward,
our cross-entropy, backward), rotating who goes first so machine load hits all alike:

    off            nobody watches: the rules as they train every day
    no observe     the same, with `observe.keep` replaced by a stub that returns None: what
                   the mechanism costs when nobody watches (one check per parametric rule call)
    tape norm      inside `manual_backprop.tape(model, reduce="norm")` for the whole run
                   (keeps δ(l) and a(l) norms per step: what DeltaMonitor records)
    tape tensors   inside `manual_backprop.tape(model)`: δ and a kept whole
    enter+exit     a tape opened and closed around each step (DeltaMonitor on a recorded step:
                   hooks installed and removed every time)

Reported: median step time per contender, and each contender's ratio to "off" as the
median over rounds of the ratio within a round.

    python scripts/bench_tape.py --against ../old-checkout   # "off" here vs "off" in another checkout

`--against` times the same steps (nobody watching) in child processes importing
manual_backprop from this checkout and from the other one, alternately, round after
round: what the observe mechanism added to ordinary training (e.g. a worktree of the
commit before it: `git worktree add /tmp/base 2287945`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import manual_backprop
import manual_backprop.nn as mnn
from manual_backprop import observe

CONTENDERS = ["off", "no observe", "tape norm", "tape tensors", "enter+exit"]


def networks(device: str, quick: bool) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, model on our rules, input batch)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cases = [
        ("MLP 64→8×32→10 fused, batch 128", mnn.MLP([64, *[32] * 8, 10], "sigmoid"), torch.randn(128, 64, generator=g)),
        ("same, per-layer (converted Sequential)",
         manual_backprop.convert(mnn.MLP([64, *[32] * 8, 10], "sigmoid").to_sequential()), torch.randn(128, 64, generator=g)),
        ("CNN conv-BN-ReLU ×2 → linear, batch 32 × 1×16×16", manual_backprop.convert(nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))),
         torch.randn(32, 1, 16, 16, generator=g)),
    ]
    if not quick:
        cases.insert(1, ("MLP 784→512→512→10 fused, batch 256", mnn.MLP([784, 512, 512, 10], "relu"),
                         torch.randn(256, 784, generator=g)))
    return [(name, model.to(device), x.to(device)) for name, model, x in cases]


def steps(model: nn.Module, x: torch.Tensor) -> dict:
    """One callable per contender, each running one training step."""
    target = torch.randint(10, (len(x),), generator=torch.Generator().manual_seed(1)).to(x.device)
    loss_fn = mnn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()

    keep = observe.keep

    def no_observe():
        observe.keep = lambda ctx, *params: None
        try:
            step()
        finally:
            observe.keep = keep

    # the tapes stay open across steps: entered here, closed by `close`
    norm_tape = manual_backprop.tape(model, reduce="norm", history=False)
    whole_tape = manual_backprop.tape(model)

    def within(tape):
        def run():
            tape.__enter__()
            try:
                step()
            finally:
                tape.__exit__(None, None, None)
        return run

    def enter_exit():
        with manual_backprop.tape(model, reduce="norm"):
            step()

    # a tape's __enter__/__exit__ around each step is what "enter+exit" measures; for the
    # open-for-the-run contenders the hooks stay installed while their sample runs (see `time_all`)
    return {"off": step, "no observe": no_observe, "tape norm": (norm_tape, step), "tape tensors": (whole_tape, step),
            "enter+exit": enter_exit}


def time_all(contenders: dict, device: str, samples: int, target_s: float) -> dict:
    """Per contender: seconds per step of each sample. A (tape, step) pair runs its sample inside the tape."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(entry, n):
        if isinstance(entry, tuple):
            tape, step = entry
            with tape:
                for _ in range(n):
                    step()
        else:
            for _ in range(n):
                entry()

    inner = {}
    for name, entry in contenders.items():  # warm up, then size each sample to last about target_s
        run(entry, 5)
        sync()
        start = time.perf_counter()
        run(entry, 5)
        sync()
        inner[name] = max(1, int(target_s / max((time.perf_counter() - start) / 5, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for sample in range(samples):
        for name in names[sample % len(names):] + names[: sample % len(names)]:
            sync()
            start = time.perf_counter()
            run(contenders[name], inner[name])
            sync()
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def keep_cost_ns(repeats: int = 200_000) -> float:
    """Nanoseconds one `observe.keep` costs when nobody watches (the only work added to a rule)."""

    class Ctx:
        pass

    ctx, W = Ctx(), torch.zeros(1)
    start = time.perf_counter()
    for _ in range(repeats):
        observe.keep(ctx, W, None)
    return (time.perf_counter() - start) / repeats * 1e9


# Runs in a child process whose current folder is a checkout: times "off" steps of the small networks there.
CHILD = r"""
import json, statistics, sys, time, torch, torch.nn as nn
import manual_backprop, manual_backprop.nn as mnn
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0); torch.manual_seed(0)
cases = {
    "fused": (mnn.MLP([64, *[32] * 8, 10], "sigmoid"), torch.randn(128, 64, generator=g)),
    "per-layer": (manual_backprop.convert(mnn.MLP([64, *[32] * 8, 10], "sigmoid").to_sequential()), torch.randn(128, 64, generator=g)),
    "cnn": (manual_backprop.convert(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10))), torch.randn(32, 1, 16, 16, generator=g)),
}
loss_fn = mnn.CrossEntropyLoss()
out = {"package": manual_backprop.__file__}
for name, (model, x) in cases.items():
    target = torch.randint(10, (len(x),), generator=torch.Generator().manual_seed(1))
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
    for _ in range(20):
        step()
    samples = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        for _ in range(10):
            step()
        samples.append((time.perf_counter() - start) / 10)
    out[name] = statistics.median(samples)
print(json.dumps(out))
"""


def against(other: Path, rounds: int, samples: int) -> list[str]:
    """Median step time (nobody watching) here and in `other`, in alternating child processes."""
    import json
    import subprocess

    here = Path(__file__).resolve().parents[1]
    runs: dict[str, list[dict]] = {"here": [], "other": []}
    for r in range(rounds):
        for which in (("here", "other") if r % 2 == 0 else ("other", "here")):
            folder = here if which == "here" else other.resolve()
            done = subprocess.run([sys.executable, "-c", CHILD, str(samples)], cwd=folder, capture_output=True, text=True, check=True)
            runs[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs["other"][0]["package"].startswith(str(other.resolve())), runs["other"][0]["package"]
    lines = [f"Nobody watching, this checkout vs {other} ({rounds} alternating child processes, cpu, 1 thread):", "",
             "| network | this ms | other ms | this / other |", "|---|---:|---:|---:|"]
    for name in ("fused", "per-layer", "cnn"):
        mine = [run[name] for run in runs["here"]]
        theirs = [run[name] for run in runs["other"]]
        ratio = statistics.median(a / b for a, b in zip(mine, theirs))
        lines.append(f"| {name} | {statistics.median(mine) * 1e3:.3f} | {statistics.median(theirs) * 1e3:.3f} | {ratio:.3f} |")
    return lines


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 samples, small networks only")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--samples", type=int, default=None, help="timing samples per contender (default 15, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout of manual-backprop: compare steps with nobody watching, here vs there")
    parser.add_argument("--rounds", type=int, default=6, help="--against: child processes per checkout")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.against is not None:
        text = "\n".join(against(args.against, args.rounds, args.samples or 15) + ["", f"cpu: {machine('cpu')}, torch {torch.__version__}"])
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    samples = args.samples or (3 if args.quick else 15)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    lines = [f"observe.keep with nobody watching: {keep_cost_ns(20_000 if args.quick else 200_000):.0f} ns per parametric rule call", ""]
    lines += ["| device | network | " + " | ".join(f"{c} ms" for c in CONTENDERS) + " | " + " | ".join(f"{c} ×" for c in CONTENDERS[1:]) + " |",
              "|---|---|" + "---:|" * (2 * len(CONTENDERS) - 1)]
    for device in devices:
        for name, model, x in networks(device, args.quick):
            times = time_all(steps(model, x), device, samples, target_s=0.005 if args.quick else 0.05)
            medians = {c: statistics.median(t) * 1e3 for c, t in times.items()}
            ratios = {c: statistics.median(a / b for a, b in zip(times[c], times["off"])) for c in CONTENDERS[1:]}
            lines.append(f"| {device} | {name} | " + " | ".join(f"{medians[c]:.3f}" for c in CONTENDERS)
                         + " | " + " | ".join(f"{ratios[c]:.2f}" for c in CONTENDERS[1:]) + " |")
        lines.append(f"\n{device}: {machine(device)}, torch {torch.__version__}, {samples} samples")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
