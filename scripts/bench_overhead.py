"""Fixed per-call cost of the per-layer modules against stock, at a course size (issue 13, part 4).

    python scripts/bench_overhead.py            # 4→8→8→1, batch 32, sigmoid; --rounds, --threads

Times a training step and a forward of `nn.Sequential(mnn.Linear, mnn.Sigmoid, …)` and of torch's,
alternating round by round in one process, with `time.thread_time` (CPU time of this thread, so
other processes on a shared machine disturb it less than wall time). Prints the medians and the
median of the within-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import manual_backprop.nn as mnn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    ours = nn.Sequential(mnn.Linear(4, 8), mnn.Sigmoid(), mnn.Linear(8, 8), mnn.Sigmoid(), mnn.Linear(8, 1))
    ours.load_state_dict(stock.state_dict())
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32, 1)).float()
    loss = nn.BCEWithLogitsLoss()

    def step(model):
        params = list(model.parameters())

        def run():
            for p in params:
                p.grad = None
            loss(model(x), y).backward()

        return run

    for what, pair in (("step", (step(stock), step(ours))), ("forward", (lambda: stock(x), lambda: ours(x)))):
        for _ in range(200):
            pair[0](), pair[1]()
        times = ([], [])
        for _ in range(args.rounds):
            for i, run in enumerate(pair):
                start = time.thread_time()
                for _ in range(50):
                    run()
                times[i].append((time.thread_time() - start) / 50)
        ratio = statistics.median(o / s for s, o in zip(*times))
        print(f"{what}: stock {statistics.median(times[0]) * 1e6:.1f} µs, per-layer {statistics.median(times[1]) * 1e6:.1f} µs, "
              f"per-layer ÷ stock {ratio:.2f}×")


if __name__ == "__main__":
    main()
