"""A Trainer for tests: CPU, no logger, checkpoints, progress bar or summary unless asked."""

from __future__ import annotations

import pytorch_lightning as pl


def quiet_trainer(tmp_path, **overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
