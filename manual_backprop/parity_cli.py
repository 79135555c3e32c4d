"""`manual-backprop-parity`: check a model of yours on our rules against stock autograd.

    manual-backprop-parity mypkg.models:make_mlp --input-shape 8,20 --loss ce
    manual-backprop-parity path/to/models.py:make_mlp --input-shape 8,20 --loss ce
    manual-backprop-parity mypkg.models:Net --kwargs '{"hidden": 64}' --input-shape 4,16,32 --loss mse --via manual_functions

Loads the factory (called with no arguments, or with --kwargs), makes random inputs of
each --input-shape and a random target for --loss, runs `testing.grad_parity`, prints
what runs where and the per-tensor table, and exits 1 if any tensor differs (2 on bad usage).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from manual_backprop.registry import resolve
from manual_backprop.testing import VIAS, grad_parity

# Loss modules, so convert puts the loss on our rules too (and the mode catches their F call).
LOSSES = {
    "mse": torch.nn.MSELoss,
    "bce": torch.nn.BCELoss,  # the model's output must be probabilities (e.g. it ends in Sigmoid)
    "bce-logits": torch.nn.BCEWithLogitsLoss,
    "ce": torch.nn.CrossEntropyLoss,
}


def load_object(path: str):
    """'pkg.module:attr.attr' or 'path/to/file.py:attr' → the object.

    A module name imports from sys.path and the current folder (as under `python -m`); a file path
    (absolute, or relative to the current folder) loads that file, from any folder, with its own
    folder on sys.path while it loads, so it imports its neighbours. Raises ValueError naming what
    was tried when the module, file or attribute is not there."""
    target, sep, attribute = path.rpartition(":")
    if not sep or not target or not attribute:
        raise ValueError(f"expected an import path 'pkg.module:factory' or 'path/to/file.py:factory', got {path!r}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        obj = module = _import_file(Path(target))
    else:
        obj = module = _import_module(target)
    parts = attribute.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            raise ValueError(f"{target} ({module.__file__}) has no attribute {'.'.join(parts[: i + 1])!r}")
        obj = getattr(obj, part)
    return obj


def _import_module(name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
            raise ImportError(f"module {name} was found, but importing it failed: {error}") from error
        raise ValueError(
            f"no module named {name!r} on sys.path or in the current folder ({os.getcwd()}); "
            f"for a file elsewhere give its path: path/to/{name.replace('.', '/')}.py:factory"
        ) from None


def _import_file(file: Path):
    if file.suffix != ".py":
        hint = f": {file}.py?" if file.with_name(file.name + ".py").is_file() else " (path/to/file.py:factory)"
        raise ValueError(f"a file path ends in .py, got {str(file)!r}{hint}")
    resolved = file.resolve()
    if not resolved.is_file():
        raise ValueError(f"no such file: {file} (looked for {resolved})")
    # A name of its own (one per file), so a file called json.py or models.py shadows no module of that name.
    name = f"_parity_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so dataclasses and pickling find the classes defined there
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:  # something it imports is not there
        del sys.modules[name]
        raise ImportError(f"importing {file} ({resolved}) failed: {error}") from error
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(folder)
    return module


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 8,20, got {text!r}") from None
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers like 8,20, got {text!r}")
    return shape


def make_target(loss: str, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        if output.dim() < 1:
            raise ValueError(f"--loss ce needs outputs with a class dimension, got shape {tuple(output.shape)}")
        class_dim = 0 if output.dim() == 1 else 1
        shape = output.shape[:class_dim] + output.shape[class_dim + 1 :]
        return torch.randint(output.shape[class_dim], shape, generator=generator).to(output.device)
    if loss in ("bce", "bce-logits"):
        return torch.randint(2, output.shape, generator=generator).to(output.device, output.dtype)
    return torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manual-backprop-parity", description="Compare a model's gradients on manual rules with stock autograd."
    )
    parser.add_argument(
        "factory", help="'pkg.module:factory' or 'path/to/file.py:factory': a model factory, class or instance"
    )
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    parser.add_argument(
        "--input-shape", type=parse_shape, action="append", required=True, help="e.g. 8,20; repeat for several inputs"
    )
    parser.add_argument("--loss", choices=sorted(LOSSES), default="mse")
    parser.add_argument("--via", choices=VIAS, default="convert")
    parser.add_argument("--registry", default=None, help="a rule set name, e.g. feedback_alignment")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--atol", type=float, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        factory = load_object(args.factory)
        resolve(args.registry)  # an unknown rule set name fails here, naming the known ones
    except (ValueError, ImportError, AttributeError) as error:
        parser.error(str(error))
    except KeyError as error:
        parser.error(error.args[0])
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if isinstance(factory, torch.nn.Module):
        if kwargs:
            parser.error(f"{args.factory} is a module instance; --kwargs needs a factory or class")
        model = factory
    else:
        model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        parser.error(f"{args.factory} returned {type(model).__name__}, not a torch.nn.Module")
    model = model.to(device=args.device, dtype=dtype)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = [torch.randn(shape, generator=generator, dtype=dtype).to(args.device) for shape in args.input_shape]
    try:
        with torch.no_grad():
            output = model(*inputs)
    except (RuntimeError, ValueError, TypeError) as error:  # inputs that do not fit the model
        shapes = " and ".join(",".join(map(str, shape)) for shape in args.input_shape)
        parser.error(f"the model fails on random inputs of shape {shapes}: {error}")
    if args.loss == "bce" and not bool(((output >= 0) & (output <= 1)).all()):
        parser.error(
            f"--loss bce takes probabilities in [0, 1], but the model's outputs lie in "
            f"[{float(output.min()):.3g}, {float(output.max()):.3g}]: use --loss bce-logits for logits "
            "(or end the model in a Sigmoid)"
        )
    target = make_target(args.loss, output, generator)
    result = grad_parity(
        model,
        inputs,
        target,
        LOSSES[args.loss](),
        rtol=args.rtol,
        atol=args.atol,
        registry=args.registry,
        via=args.via,
        seed=args.seed,
    )
    if result.conversion is not None:
        print(result.conversion, end="\n\n")
    if result.routed:
        print("routed to manual rules: " + ", ".join(f"{n}×{k}" for n, k in sorted(result.routed.items())), end="\n\n")
    print(result)
    verdict = "OK" if result.ok else f"FAIL: {len(result.failures)} tensor(s) differ" if result.failures else "FAIL: no manual rule ran"
    print(verdict)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
