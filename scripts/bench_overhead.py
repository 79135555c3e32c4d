"""Fixed per-call cost of the per-layer modules against stock, at a course size.

    python scripts/bench_overhead.py            # 4→8→8→1, batch 32, sigmoid; --rounds, --threads
    python scripts/bench_overhead.py --activation sigmoid tanh relu --floor

Times a training step and a forward of `nn.Sequential(mnn.Linear, mnn.Sigmoid, …)` and of torch's,
alternating round by round in one process, with `time.thread_time` (CPU time of this thread, so
other processes on a shared machine disturb it less than wall time). Prints the medians and the
median of the within-round ratios.

--floor adds a third contender: the same algebra as the smallest Python autograd.Functions can
write it (save a and W, or a; backward δW, δᵀa, Σδ and δ ⊙ σ'(a); no input checks, autocast,
torch.func or compile dispatch, observe; each module calling torch's C++ apply itself, the engine
calling backward itself). What is left between it and stock is Python autograd's own round trip per
node and the Python dispatch of each op, which only native code removes.
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
    parser.add_argument("--activation", nargs="+", choices=sorted(_ACTIVATIONS), default=["sigmoid"])
    parser.add_argument("--floor", action="store_true", help="also time the smallest Python autograd.Functions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.activation:
        run_activation(name, args.rounds, args.floor)


_ACTIVATIONS = {"sigmoid": (nn.Sigmoid, mnn.Sigmoid), "tanh": (nn.Tanh, mnn.Tanh), "relu": (nn.ReLU, mnn.ReLU)}


def run_activation(name: str, rounds: int, floor: bool = False) -> None:
    stock_activation, our_activation = _ACTIVATIONS[name]
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(4, 8), stock_activation(), nn.Linear(8, 8), stock_activation(), nn.Linear(8, 1))
    models = {"per-layer": nn.Sequential(mnn.Linear(4, 8), our_activation(), mnn.Linear(8, 8), our_activation(),
                                         mnn.Linear(8, 1))}
    if floor:
        models["floor"] = nn.Sequential(_FloorLinear(4, 8), _FloorActivation(name), _FloorLinear(8, 8),
                                        _FloorActivation(name), _FloorLinear(8, 1))
    for model in models.values():
        model.load_state_dict(stock.state_dict())
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32, 1)).float()
    loss = nn.BCEWithLogitsLoss()

    def step(model):
        params = list(model.parameters())

        def run():
            for p in params:
                p.grad = None
            loss(model(x), y).backward()

        return run

    for what, timed in (("step", step), ("forward", lambda model: lambda: model(x))):
        runs = [timed(stock)] + [timed(model) for model in models.values()]
        for _ in range(200):
            for run in runs:
                run()
        times = [[] for _ in runs]
        for _ in range(rounds):
            for run, kept in zip(runs, times):
                start = time.thread_time()
                for _ in range(50):
                    run()
                kept.append((time.thread_time() - start) / 50)
        line = f"{name} {what}: stock {statistics.median(times[0]) * 1e6:.1f} µs"
        for label, kept in zip(models, times[1:]):
            ratio = statistics.median(o / s for s, o in zip(times[0], kept))
            line += f", {label} {statistics.median(kept) * 1e6:.1f} µs ({label} ÷ stock {ratio:.2f}×)"
        print(line)


# ------------------------------------------------ --floor: the smallest Python autograd.Functions


class _LinearFloor(torch.autograd.Function):
    @staticmethod
    def forward(a, W, b):
        return torch.nn.functional.linear(a, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, W, _ = inputs
        ctx.save_for_backward(a, W)

    @staticmethod
    def backward(ctx, delta):
        a, W = ctx.saved_tensors
        need_a, need_W, need_b = ctx.needs_input_grad
        return (delta @ W if need_a else None), (delta.T @ a if need_W else None), (delta.sum(0) if need_b else None)


def _activation_floor(sigma, delta_sigma_prime):
    class ActivationFloor(torch.autograd.Function):
        @staticmethod
        def forward(z):
            return sigma(z)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, delta):
            (a,) = ctx.saved_tensors
            return delta_sigma_prime(delta, a)

    return ActivationFloor


_FLOOR_RULES = {
    "sigmoid": _activation_floor(torch.sigmoid, lambda delta, a: torch.rsub(a, 1).mul_(a).mul_(delta)),
    "tanh": _activation_floor(torch.tanh, lambda delta, a: torch.addcmul(delta, delta * a, a, value=-1)),
    "relu": _activation_floor(torch.relu, lambda delta, a: a.sign().mul_(delta)),
}
_c_apply = torch._C._FunctionBase.__dict__["apply"]  # what Function.apply ends in
for _rule in (_LinearFloor, *_FLOOR_RULES.values()):
    _rule._backward_cls.apply = _rule.backward  # the engine calls backward itself


class _FloorLinear(nn.Linear):
    def forward(self, input):
        return _c_apply.__get__(None, _LinearFloor)(input, self.weight, self.bias)


class _FloorActivation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.apply_rule = _c_apply.__get__(None, _FLOOR_RULES[name])

    def forward(self, input):
        return self.apply_rule(input)


if __name__ == "__main__":
    main()
