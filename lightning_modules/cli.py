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
task that does not fit the data, a missing checkpoint) is printed as one line,
`manual-backprop: error: ...`, with exit status 2, as argparse reports bad
arguments; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import pytorch_lightning as pl
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
]


class ManualBackpropCLI(LightningCLI):
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
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks += [DistributedTeardown(), _QuietWorkers()]  # no-ops on one process
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


def build_cli(args: ArgsType = None, run: bool = True) -> ManualBackpropCLI:
    """The CLI object, for tests and scripts that want its trainer, model and data module."""
    return ManualBackpropCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
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
    """Spawned DDP processes start a fresh interpreter: quiet them too."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        quiet()


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
    try:
        build_cli(args)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
