"""The `manual-backprop` command: LightningCLI over the tasks and data modules.

    manual-backprop fit  --config lightning_modules/configs/multiclass_digits.yaml
    manual-backprop test --config lightning_modules/configs/multiclass_digits.yaml --ckpt_path PATH
    manual-backprop fit  --config ... --model.init_args.backend=autograd      # stock autograd, for comparison

Model and data are chosen by class_path (subclass mode), so any LightningModule /
LightningDataModule works; the data module's num_features, num_targets and
num_classes are linked into the model, so configs need not repeat them.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_modules.callbacks import TrainingCurves


class ManualBackpropCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always on (the plot at the end of fit); configurable as `curves.filename`.
        parser.add_lightning_class_args(TrainingCurves, "curves")
        # Applied when the data module exists. A link whose source the data module lacks, or whose
        # target the chosen model does not take (num_classes for regression), is skipped.
        parser.link_arguments("data.num_features", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.init_args.out_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


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


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the `manual-backprop` console script (returns None: a console script
    exits with whatever its function returns)."""
    build_cli(args)


if __name__ == "__main__":
    cli_main()
