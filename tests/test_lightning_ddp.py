"""DDP on CPU: two processes with batch B train to the weights of one process with batch 2B, privately
too; feedback matrices are rank 0's on every process; DeltaMonitor logs once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies import DDPStrategy

from lightning_modules import DeltaMonitor, DistributedTeardown, MulticlassClassificationTask, SklearnDataModule, SmallCNN
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


# ------------------------------------------------------------------ what each process ends with


class Record(pl.Callback):
    """Each process writes what it ends training with to `root/rank{r}.pt` (ddp_spawn hands only rank 0's
    weights back to the main process): the network's parameters and buffers, the logged ε, DeltaMonitor's
    history, and the gradients its first backward left before the task's own hook ran. It also reseeds
    torch at the start of training, so rank 0 of two processes and one process draw the same noise."""

    def __init__(self, root: Path) -> None:
        self.root, self.first = Path(root), None

    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(11)

    def on_after_backward(self, trainer, pl_module) -> None:  # callbacks run before the LightningModule's hook
        if self.first is None:
            self.first = [None if p.grad is None else p.grad.clone() for p in pl_module.net.parameters()]

    def on_train_end(self, trainer, pl_module) -> None:
        epsilon = trainer.callback_metrics.get("train/epsilon")
        monitors = [c for c in trainer.callbacks if isinstance(c, DeltaMonitor)]
        torch.save({
            "params": {n: p.detach().clone() for n, p in pl_module.net.named_parameters()},
            "buffers": {n: b.clone() for n, b in pl_module.net.named_buffers()},
            "epsilon": None if epsilon is None else float(epsilon),
            "first_grads": self.first,
            "delta_history": {k: v for m in monitors for k, v in m.history.items()},
        }, self.root / f"rank{trainer.global_rank}.pt")


def recorded(root: Path, rank: int) -> dict:
    return torch.load(root / f"rank{rank}.pt", weights_only=True)


def fit_recorded(devices: int, batch_size: int, root: Path, data=None, callbacks=(), strategy=None, logger=False,
                 limit_train_batches=None, **task_kwargs) -> dict:
    """`train`'s run (iris unless `data` is given, float64, 2 epochs) with any task arguments, recorded by every
    process; returns the weights before fit."""
    pl.seed_everything(5)
    # fixed-size batches: the global batches of N processes are then one process's (Poisson sampling draws
    # each process's share on its own)
    data = data or SklearnDataModule("iris", batch_size=batch_size, val_fraction=0.2, test_fraction=0.2, seed=5,
                                     sampling="shuffle")
    task_kwargs = {"hidden_sizes": [8], "lr": 0.01, **task_kwargs}
    model = MulticlassClassificationTask(data.num_features, data.num_classes, **task_kwargs).double()
    initial = copy.deepcopy(model.net.state_dict())
    root.mkdir(parents=True, exist_ok=True)
    trainer = quiet_trainer(
        root, devices=devices, strategy=strategy or ("ddp_spawn" if devices > 1 else "auto"), precision="64-true",
        max_epochs=2, limit_val_batches=0, limit_train_batches=limit_train_batches, logger=logger,
        callbacks=[Record(root), *callbacks, DistributedTeardown()],
    )
    trainer.fit(model, datamodule=data)
    return initial


@pytest.mark.slow
def test_private_training_on_two_processes_is_private_training_on_one_over_the_same_global_batches(tmp_path):
    """DP-SGD, σ = 1: each process clips its own samples, the clipped sums are summed, the noise is added once
    and the mean is over the global batch; so the replicas agree, and equal one process with batch 2B that
    draws the same noise, and the ε logged is one process's."""
    private = dict(dp_noise_multiplier=1.0, dp_max_grad_norm=0.3, dp_delta=1e-5)
    initial = fit_recorded(1, 18, tmp_path / "single", **private)
    fit_recorded(2, 9, tmp_path / "ddp", **private)
    one, ranks = recorded(tmp_path / "single", 0), [recorded(tmp_path / "ddp", r) for r in (0, 1)]
    for name, value in one["params"].items():
        assert not torch.allclose(value, initial[name])  # it trained
        for rank in ranks:
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-10, atol=1e-12)
    assert one["epsilon"] > 0 and ranks[0]["epsilon"] == ranks[1]["epsilon"] == one["epsilon"]
    # Book-keeping: backward formed no unclipped gradient, so none crossed the processes, only the clipped sums;
    # DDP's reducer, whose all-reduce is turned off, filled the gradients never formed with zeros.
    for rank in ranks:
        assert all(g is None or not g.any() for g in rank["first_grads"])
    assert one["first_grads"] is not None and all(g is None for g in one["first_grads"])


# ------------------------------------------------------------------ learning rules and the δ tape


class Scramble(pl.Callback):
    """As the `ddp` launcher (not ddp_spawn) would have it: every process built its own model from its own RNG,
    so its own feedback matrices and seeds. Runs in each process before DDP wraps the model."""

    def setup(self, trainer, pl_module, stage) -> None:
        generator = torch.Generator().manual_seed(100 + trainer.global_rank)
        for b in pl_module.net.buffers():
            b.copy_(torch.randint(2**62, b.shape, generator=generator) if b.dtype == torch.int64
                    else torch.rand(b.shape, generator=generator, dtype=b.dtype))


class PerRankLog(Logger):
    """A logger that logs on every process (Lightning's own log on rank 0 only): one file of keys per rank."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)

    name, version = "per_rank", 0

    @property
    def save_dir(self) -> str:
        return str(self.root)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        keys = [key for key in metrics if key.startswith("delta/")]
        if keys:
            with open(self.root / f"log{torch.distributed.get_rank()}.txt", "a") as f:
                f.writelines(f"{key}\n" for key in keys)


LEARNING_RULES = [
    pytest.param({"learning_rule": "feedback_alignment"}, None, ["layers.0.feedback", "layers.1.feedback"], id="fa-mlp"),
    pytest.param({"learning_rule": "direct_feedback_alignment", "net": SmallCNN(1, 10, channels=(2, 2))},
                 dict(dataset="digits", batch_size=16, image_shape=[1, 8, 8], seed=5),
                 ["0.feedback", "0.feedback_seed", "3.feedback"], id="dfa-cnn"),
]


@pytest.mark.slow
@pytest.mark.parametrize("task_kwargs, data_kwargs, buffers", LEARNING_RULES)
def test_feedback_matrices_are_rank_zeros_on_every_process_and_delta_is_logged_once(
        tmp_path, task_kwargs, data_kwargs, buffers):
    """Feedback matrices drawn differently on each process (as separately built models are) become rank 0's at
    fit start, even where DDP broadcasts no buffers; DeltaMonitor records and logs on rank 0 only."""
    data = None if data_kwargs is None else SklearnDataModule(**data_kwargs)
    strategy = DDPStrategy(start_method="spawn", broadcast_buffers=False)
    fit_recorded(2, 9, tmp_path, data=data, strategy=strategy, logger=PerRankLog(tmp_path), limit_train_batches=3,
                 callbacks=[Scramble(), DeltaMonitor(every_n_steps=2)], **task_kwargs)
    ranks = [recorded(tmp_path, r) for r in (0, 1)]
    assert sorted(ranks[0]["buffers"]) == sorted(buffers)
    for name in buffers:
        torch.testing.assert_close(ranks[1]["buffers"][name], ranks[0]["buffers"][name], rtol=0, atol=0)
    assert ranks[0]["delta_history"] and not ranks[1]["delta_history"]
    assert (tmp_path / "log0.txt").read_text() and not (tmp_path / "log1.txt").exists()
    assert (tmp_path / "delta.png").is_file()  # plotted by rank 0, into the folder rank 0 broadcast
