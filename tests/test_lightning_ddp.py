"""DDP on CPU: two processes with batch B train to the weights of one process with batch 2B."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules import DistributedTeardown, MulticlassClassificationTask, SklearnDataModule
from tests.trainers import quiet_trainer


def train(devices: int, batch_size: int, root) -> MulticlassClassificationTask:
    pl.seed_everything(5)
    # iris, 20 % validation, 20 % test: 90 training rows, so 2 × 9 and 1 × 18 both make 5 full global batches.
    data = SklearnDataModule("iris", batch_size=batch_size, val_fraction=0.2, test_fraction=0.2, seed=5)
    # Double before fit too: ddp_spawn copies rank 0's weights back into this (main-process) model.
    model = MulticlassClassificationTask(data.num_features, data.num_classes, hidden_sizes=[8], lr=0.01).double()
    trainer = quiet_trainer(
        root,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",  # float64: the two reduction orders agree to ~1e-15, so the check can be tight
        max_epochs=3,
        limit_val_batches=0,
        callbacks=[DistributedTeardown()],  # as the CLI adds it: a clean gloo exit
    )
    trainer.fit(model, datamodule=data)
    if devices == 1:  # under ddp_spawn the main process's trainer only receives the weights back
        assert trainer.global_step == 15
    return model


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_over_the_same_global_batches(tmp_path):
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()
    single = train(1, 18, tmp_path / "single")
    # ddp_spawn trains in two fresh processes (gloo) and loads rank 0's weights back into `distributed`.
    distributed = train(2, 9, tmp_path / "ddp")
    initial = MulticlassClassificationTask(4, 3, hidden_sizes=[8]).double().net.state_dict()
    for key, value in single.net.state_dict().items():
        torch.testing.assert_close(distributed.net.state_dict()[key], value, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(value, initial[key])  # it trained


def test_ddp_sees_each_training_row_once_per_epoch():
    """Rank r of N gets rows r, r + N, ... of one seeded permutation: together, every row once."""
    data = SklearnDataModule("iris", batch_size=9, val_fraction=0.2, test_fraction=0.2, seed=5)
    single = data.train_dataloader().sampler
    single.set_epoch(2)
    ranks = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(data.split("train"), num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        ranks.append(list(sampler))
    order = list(single)
    assert ranks[0] == order[0::2] and ranks[1] == order[1::2]


def test_distributed_teardown_destroys_the_process_group(tmp_path):
    """One gloo process group of one process, as each DDP process holds: gone after teardown."""
    dist = torch.distributed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        DistributedTeardown().teardown(None, None, "fit")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    DistributedTeardown().teardown(None, None, "fit")  # and a no-op without one
