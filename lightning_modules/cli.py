"""The `manual-backprop` command: LightningCLI over the tasks and data modules.

    manual-backprop fit     --config lightning_modules/configs/multiclass_digits.yaml
    manual-backprop fit     --config ... --ckpt_path last          # resume the latest run from its last.ckpt
    manual-backprop test    --config ... --ckpt_path last          # score it on the held-out test split
    manual-backprop predict --config ... --ckpt_path last [--data.init_args.predict_path=new.csv]
    manual-backprop fit     --config ... --model.init_args.backend=autograd   # stock autograd, for comparison

Model and data are chosen by class_path (subclass mode), so any LightningModule /
LightningDataModule works; the data module's num_features, num_targets, num_classes
and target_names are linked into the model, so configs need not repeat them.

A mistake in the user's input (a `ConfigError`: a bad CSV cell, a missing column, a
task that does not fit the data, a missing checkpoint; an unknown or misspelt option or
config key, named with its class and the closest valid key) is printed as one line,
`manual-backprop: error: ...`, with exit status 2, as argparse reports bad
arguments; anything else is a bug and keeps its traceback. Options are never
abbreviated: `--trainer.max_epoch` is an error, not `max_epochs`.

`--config` takes a path or the name of a shipped config (`--config mnist1d_cnn`);
`manual-backprop configs` lists those. `--threads N` (or `threads: N` in a config) sets
torch's intra-op threads, printed at start: 1 by default, the fastest for the shipped
configs' small networks (see `DEFAULT_THREADS`).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_modules.callbacks import DistributedTeardown, PredictionWriter, TrainingCurves
from lightning_modules.errors import ConfigError

PROG = "manual-backprop"
DESCRIPTION = (
    "Train, test and predict with the notes' networks on hand-written backprop rules (manual_backprop), "
    "on scikit-learn's bundled datasets or your own CSV. Start from a shipped config: "
    "`manual-backprop fit --config CONFIG.yaml`; `manual-backprop fit --help` lists every option."
)
EVALUATING = ("validate", "test", "predict")

# Messages a user cannot act on (Lightning's advertising, a notice about an optional package,
# a deprecation inside Lightning, the checkpoint folder of a resumed run being a new one).
NOISE = [
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The dirpath has changed from",
    r"LightningCLI's args parameter is intended",  # cli_main hands sys.argv on as args, resolved
]


# Torch's intra-op threads when neither --threads nor a config says: the shipped configs' networks are
# at most a few hundred wide (measured on a 2-core machine, the digits config's fit: idle, 12.2 s with
# 1 thread and 10.7 s with 2; busy, 14 s with 1 and 49–52 s with 2): one thread loses little at best.
DEFAULT_THREADS = 1
CLASS_KEYS = ("model", "data", "optimizer", "lr_scheduler")  # sections whose keys belong to a class_path


class StrictParser(LightningArgumentParser):
    """Options are never abbreviated, and an unknown or misspelt key is one line: the key, its class, the
    closest valid key (instead of the usage text and a nested union error)."""

    argv: list[str] = []  # the command line being parsed, for naming what was wrong in it

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error:  # a nested parser: its parent reports
            return super().error(message, ex)
        print(f"{PROG}: error: {explain_parse_error(self, message, StrictParser.argv)}", file=sys.stderr)
        raise SystemExit(2)


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _subcommand_parser(parser: LightningArgumentParser, argv: list[str]):
    """The parser of the subcommand in argv, and its name (the parser itself when it has no subcommands)."""
    action = getattr(parser, "_subcommands_action", None)
    commands = getattr(action, "_name_parser_map", {}) if action is not None else {}
    for token in argv:
        if token in commands:
            return commands[token], token
    return parser, next((t for t in argv if t in ("fit", "validate", "test", "predict")), "")


def explain_parse_error(parser: LightningArgumentParser, message: str, argv: list[str]) -> str:
    """One line for a parse error: an unknown key names itself, where it was given, its class and the closest key."""
    sub, subcommand = _subcommand_parser(parser, [str(a) for a in argv])
    dests = {a.dest for a in sub._actions if a.dest not in ("help", argparse.SUPPRESS)}
    for token in map(str, argv):  # the command line: --section.key[=value]
        if not token.startswith("--"):
            continue
        key = token[2:].split("=", 1)[0]
        if key in dests or key.split(".")[0] in CLASS_KEYS or any(d.startswith(key + ".") for d in dests):
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        owner = "pytorch_lightning.Trainer" if section == "trainer" else f"the {PROG} {subcommand} command"
        return f"unknown option --{key} for {owner}{_closest(key, dests)}"
    if match := re.search(r"does not accept option '([\w.]+)'", message):
        key = match[1]
        valid = [f"trainer.{p}" for p in inspect.signature(pl.Trainer).parameters] if key.startswith("trainer.") else dests
        owner = "pytorch_lightning.Trainer" if key.startswith("trainer.") else f"the {PROG} {subcommand} command"
        files = _config_files(argv)
        where = f" in {', '.join(map(str, files))}" if files else ""
        return f"unknown key {key!r}{where} for {owner}{_closest(key, valid)}"
    if (match := re.search(r"Option '(\w+)' is not accepted", message)) and (cls := re.search(r"class_path '([\w.]+)'", message)):
        section = re.search(r'Parser key "([\w.]+)"', message)
        where = f"{section[1]}.init_args." if section else ""
        return f"unknown key '{where}{match[1]}' for {cls[1]}" + _closest(match[1], _init_parameters(cls[1]))
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("- ") and "NoneType" not in line]
    return " ".join(lines[:1] + [line[2:] for line in detail[:1]]) or message


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # only for a suggestion: a class that cannot be inspected gets none
        return []


def _config_files(argv: list[str]) -> list[Path]:
    files = []
    for i, token in enumerate(map(str, argv)):
        name, equals, value = token.partition("=")
        if name in ("--config", "-c"):
            value = value if equals else (str(argv[i + 1]) if i + 1 < len(argv) else "")
            if Path(value).is_file():
                files.append(Path(value))
    return files


def resolve_config_names(argv: list) -> list:
    """`--config NAME` (no such file, but a shipped config of that name) becomes the shipped config's path."""
    from lightning_modules import config_path

    argv = list(argv)
    for i, token in enumerate(argv):
        name, equals, value = str(token).partition("=")
        if name not in ("--config", "-c"):
            continue
        value = value if equals else (str(argv[i + 1]) if i + 1 < len(argv) else None)
        if value is None or Path(value).exists() or "/" in value or os.sep in value:
            continue
        try:
            path = str(config_path(value))
        except FileNotFoundError as error:
            raise ConfigError(f"--config {value}: no such file, and {error}") from None
        if equals:
            argv[i] = f"{name}={path}"
        else:
            argv[i + 1] = path
    return argv


def list_configs() -> str:
    """The shipped configs, one a line: name and the first line of its leading comment."""
    from lightning_modules import CONFIG_DIR

    rows = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        rows.append((path.stem, first))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {about}" for name, about in rows) + \
        f"\n\nrun one with: {PROG} fit --config NAME  (these files are in {CONFIG_DIR})"


class ManualBackpropCLI(LightningCLI):
    announce = False  # the command prints its thread count; scripts that build the CLI print their own output

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("prog", PROG)
        kwargs.setdefault("description", DESCRIPTION)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always on (the plot at the end of fit, predictions.csv of predict); configurable as
        # `curves.filename` and `predictions.filename`.
        parser.add_lightning_class_args(TrainingCurves, "curves")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument(
            "--threads",
            type=int,
            default=DEFAULT_THREADS,
            help=f"torch's intra-op threads (torch.set_num_threads), printed at start; default {DEFAULT_THREADS}: "
            "the fastest for small networks, where threads wait on each other more than they compute",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict: run without --ckpt_path on the model as built (untrained weights); "
            "without this flag that is refused",
        )
        # Applied when the data module exists. A link whose source the data module lacks, or whose
        # target the chosen model does not take (num_classes for regression), is skipped.
        parser.link_arguments("data.num_features", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.init_args.out_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.target_names", "model.init_args.target_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        # A backend given on the command line wins over the checkpoint's (LightningCLI rebuilds the
        # model from the checkpoint's hyperparameters): a manual run's checkpoint tests on autograd.
        argv = sys.argv[1:] if args is None else args
        self._backend = _option_value(argv, ("--model.init_args.backend", "--model.backend")) if isinstance(argv, list) else None
        # `--ckpt_path last` becomes the path itself now, so LightningCLI reads that checkpoint's
        # hyperparameters as it does for a path, and the saved config.yaml says which checkpoint.
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        root = Path(config.get("trainer.default_root_dir") or os.getcwd())
        if ckpt_path == "last":
            found = latest_last_checkpoint(root)
            if found is None and subcommand in EVALUATING:
                raise ConfigError(
                    f"--ckpt_path last: no last.ckpt under {root / 'lightning_logs'}/version_*/checkpoints/; "
                    "train first (`fit`), or pass --ckpt_path=PATH/TO.ckpt"
                )
            if found is not None:
                config["ckpt_path"] = str(found)
        elif (
            ckpt_path is not None
            and not Path(ckpt_path).is_file()
            and not str(ckpt_path).startswith(("best", "hpc", "registry"))
            and "://" not in str(ckpt_path)  # remote checkpoints are Lightning's to find
        ):
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file")

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        root = Path(config.get("trainer.default_root_dir") or os.getcwd())
        threads = config.get("threads", DEFAULT_THREADS)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer; got {threads!r}")
        torch.set_num_threads(threads)
        self._threads = threads
        if getattr(self, "_backend", None) and config.get("model.init_args.backend") is not None:
            config["model.init_args.backend"] = self._backend
        if self.subcommand in EVALUATING and config.get("ckpt_path") is None and not config.get("allow_untrained"):
            raise ConfigError(
                f"{self.subcommand} needs --ckpt_path: without a checkpoint it would score a freshly built, untrained "
                "model. Pass --ckpt_path=PATH/TO.ckpt, or --ckpt_path last for the latest run's last.ckpt "
                "(or --allow_untrained=true to run the model as built)"
            )
        if config.get("trainer.logger") is False:
            # No logger: no log folder to put curves, predictions and config.yaml in; Lightning would
            # write them into default_root_dir (by default the current folder). Say where they go.
            print(f"{PROG}: --trainer.logger=false: writing config.yaml, checkpoints and plots under {root}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        # Model and data module exist: a task that does not fit the data fails now, before the Trainer.
        if hasattr(self.model, "check_datamodule") and self.datamodule is not None:
            self.model.check_datamodule(self.datamodule)
        threads = getattr(self, "_threads", DEFAULT_THREADS)
        if self.announce:  # said once model and data exist (an error in them stays the only line), on stdout
            print(f"{PROG}: {threads} torch thread{'s' if threads > 1 else ''} (--threads)")
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks += [DistributedTeardown(), _QuietWorkers(getattr(self, "_threads", DEFAULT_THREADS))]
        return trainer

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run:
            return
        folder, last = Path(self.trainer.log_dir or self.trainer.default_root_dir), None
        checkpoint = self.trainer.checkpoint_callback
        # The checkpoint's folder is the run's, also under ddp_spawn, where only best_model_path
        # comes back to this process and its own logger would name the next version.
        saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        if saved:
            checkpoints = Path(saved).parent
            folder = checkpoints.parent if checkpoints.name == "checkpoints" else folder
            last = checkpoints / "last.ckpt" if (checkpoints / "last.ckpt").is_file() else None
        print(f"{PROG}: run folder {folder}" + (f"; resume with --ckpt_path last ({last})" if last else ""))

    def after_predict(self) -> None:
        writer = next((cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter)), None)
        if writer is not None and writer.path is not None:
            print(f"{PROG}: predictions written to {writer.path}")


def _option_value(argv: list, names: tuple[str, ...]) -> Optional[str]:
    """The last value given to any of `names` in argv (`--name=value` or `--name value`)."""
    value = None
    for i, token in enumerate(map(str, argv)):
        name, equals, given = token.partition("=")
        if name in names:
            value = given if equals else (str(argv[i + 1]) if i + 1 < len(argv) else None)
    return value


def latest_last_checkpoint(root: Path) -> Optional[Path]:
    """The newest `last*.ckpt` of the runs under `root`/lightning_logs (what `--ckpt_path last` resumes)."""
    candidates = [
        path
        for version in (root / "lightning_logs").glob("version_*")
        for path in (version / "checkpoints").glob("last*.ckpt")
        if re.fullmatch(r"last(-v\d+)?\.ckpt", path.name)
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def build_cli(args: ArgsType = None, run: bool = True, announce: bool = False) -> ManualBackpropCLI:
    """The CLI object, for tests and scripts that want its trainer, model and data module.
    announce: print what the command prints at start (the thread count)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list):
        argv = resolve_config_names(argv)
        StrictParser.argv = argv
    cls = type("ManualBackpropCommand", (ManualBackpropCLI,), {"announce": True}) if announce else ManualBackpropCLI
    return cls(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        parser_class=StrictParser,
        # Rerunning a config into the same log folder replaces its saved config.yaml.
        save_config_kwargs={"overwrite": True},
    )


def user_error(error: BaseException) -> Optional[BaseException]:
    """The user-input error behind `error`, if any. jsonargparse wraps an error raised while it
    instantiates a class in a "Does not validate against any of the Union subtypes" ValueError
    whose cause chain holds ours."""
    for link in _chain(error):
        if isinstance(link, (ConfigError, MisconfigurationException)):
            return link
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def quiet() -> None:
    """Hide what a user cannot act on: Lightning's tips and a few warnings (see NOISE)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logger = logging.getLogger(name)
        for handler in [logger, *logger.handlers]:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())


class _QuietWorkers(pl.Callback):
    """Spawned DDP processes start a fresh interpreter: quiet them too, with the same number of threads."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self.threads = threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        quiet()
        torch.set_num_threads(self.threads)


class _DropTips(logging.Filter):
    """Lightning's advertising, and "Seed set to N" (config.yaml records the seed): an error comes alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("💡 Tip", "Seed set to"))


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the `manual-backprop` console script (returns None: a console script
    exits with whatever its function returns). A user-input error exits with status 2."""
    # As `python -m` does: modules next to the user's config (`net: {class_path: mynet.MyNet}`) import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    quiet()
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["configs"]:
        try:
            print(list_configs())
        except BrokenPipeError:  # `manual-backprop configs | head`
            sys.stderr.close()
        return
    try:
        build_cli(argv, announce=True)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
