"""The notes' three problems as LightningModules sharing one base.

    RegressionTask              y ∈ ℝᵘ       MSE on standardized targets     δ(L) = 2 (ŷ − y) / N
    BinaryClassificationTask    y ∈ {0, 1}   BCE on logits                   δ(L) = σ(z) − y = ŷ − y
    MulticlassClassificationTask y ∈ {0..K−1} cross-entropy on logits        δ(L) = softmax(z) − y

With backend="manual" the network and the loss run on `manual_backprop` (every
backward is ours; the built-in network is the fused `manual_backprop.nn.MLP`); with
backend="autograd" the same network (an `nn.Sequential`) and loss come from stock
torch, for comparison. A checkpoint of either backend loads into either.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
import torchmetrics
from torchmetrics import classification, regression
from torchmetrics.wrappers.abstract import WrapperMetric

import manual_backprop
import manual_backprop.nn as mnn
import manual_backprop.plugins.feedback_alignment  # noqa: F401  (its feedback matrices, broadcast under DDP)
import manual_backprop.privacy  # noqa: F401  (DP-SGD; Opacus only for its accountant, imported when used)
from lightning_modules.errors import ConfigError
from lightning_modules.network import build_network, check_backend, check_learning_rule, state_dict_for_backend

Batch = tuple[torch.Tensor, torch.Tensor]
EMPTY_BATCH = object()  # DP-SGD's marker for a Poisson-sampled batch with no rows


class TaskModule(pl.LightningModule):
    """What the three tasks share: network, loss, per-stage metrics, logging, optimizer.

    Subclasses set `task` and `main_metric` and supply the loss, the metric collection
    and how network outputs become loss inputs, metric inputs and predictions.

    The network is built from in_features, hidden_sizes, activation and backend
    (`build_network`: an MLP on backend "manual", an nn.Sequential on "autograd"), unless
    `net` (any torch.nn.Module) is given: then it is used as is for backend "autograd"
    and through `manual_backprop.convert` (a converted copy) for backend "manual".
    `net` may also be a config, {"class_path": "pkg.Net", "init_args": {...}}: the CLI
    records a `net` given by class path this way, so its checkpoints reload on their own.

    `allow_stock` (backend "manual", a `net` given): a module with parameters and no rule of ours stays
    on stock autograd instead of raising a ConfigError that names it (the default: no silent fall-back).

    `learning_rule` (backend "manual"): "backprop", or any registered rule set that trains the
    network another way (`manual_backprop.learning_rule_names()`: "feedback_alignment",
    "sign_symmetry", "batchwise_random_sign_symmetry", "fixed_random_sign_symmetry",
    "direct_feedback_alignment"); the network is converted with `registry=learning_rule`.
    """

    task: str = ""
    main_metric: str = "loss"  # the metric plotted next to the loss
    loss_label: str = "loss"  # what the logged loss is, for plots and tables

    def __init__(
        self,
        in_features: Optional[int],
        out_features: int,
        hidden_sizes: Sequence[int],
        activation: str,
        backend: str,
        lr: float,
        weight_decay: float,
        net: Optional[torch.nn.Module],
        dp_noise_multiplier: Optional[float] = None,
        dp_max_grad_norm: float = 1.0,
        dp_delta: float = 1e-5,
        learning_rule: str = "backprop",
        allow_stock: bool = False,
    ) -> None:
        super().__init__()
        self._save_plain_hparams(inspect.currentframe().f_back, net)
        _check_dp(backend, dp_noise_multiplier, dp_max_grad_norm, dp_delta)
        self._private = None  # the per-sample context of the running training step (DP-SGD)
        self._accountant = None
        if isinstance(net, Mapping):
            net = instantiate_net(net)
        check_backend(backend)
        registry = check_learning_rule(learning_rule, backend)
        if lr <= 0:
            raise ConfigError(f"lr must be positive; got {lr!r}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0; got {weight_decay!r}")
        self._builtin_network = net is None
        if net is None:
            if in_features is None:
                raise ConfigError(
                    f"{type(self).__name__} needs in_features to build its network (or a `net` module); "
                    "the CLI links it from the data module's num_features"
                )
            self.net = build_network(in_features, hidden_sizes, out_features, activation, backend)
            if registry is not None:
                self.net = manual_backprop.convert(self.net, registry=registry, inplace=True)
        elif not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        elif backend == "manual":
            try:
                self.net = manual_backprop.convert(net, registry=registry, strict=not allow_stock)
            except manual_backprop.ConversionError as error:
                raise ConfigError(
                    f"backend 'manual' trains every parameter on our rules, but {error}\n"
                    "Use backend 'autograd', register rules for these modules, or pass allow_stock=true to "
                    "train them on stock autograd beside our rules"
                ) from None
        else:
            self.net = net
        self.loss_fn = self.make_loss(backend)
        metrics = self.make_metrics()
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _save_plain_hparams(self, subclass_frame: Any, net: Any) -> None:
        """Save the subclass's init arguments, all plain values, so a checkpoint loads with
        weights_only=True. A `net` module passed from Python is not saved (pass `net` again to
        load_from_checkpoint); a `net` config (class path and init args, as the CLI records a
        `net` given by class_path) is, so such a checkpoint reloads on its own."""
        with warnings.catch_warnings():  # a `net` module is dropped just below
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters(frame=subclass_frame)
        hparams = self.hparams
        if "net" in hparams and not isinstance(hparams["net"], Mapping):
            del hparams["net"]
        if isinstance(hparams.get("net"), Mapping):
            hparams["net"] = dict(hparams["net"])
            # load_from_checkpoint then calls this class with net=<config>, which __init__ builds
            # (LightningCLI's instantiator would build it first and its config would be lost).
            hparams.pop("_instantiator", None)
        if net is not None:  # the built-in network's arguments: unused when `net` is given
            for key in ("hidden_sizes", "activation"):
                hparams.pop(key, None)
        # LightningCLI records every applied link, also ones this class does not take
        # (num_targets → out_features on a classifier); keep only real arguments.
        accepted = inspect.signature(type(self).__init__).parameters
        for key in [k for k in hparams if k not in accepted and not k.startswith("_")]:
            del hparams[key]
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers record (hparams.yaml)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The built-in network's keys depend on the backend (MLP `net.layers.{k}.` vs Sequential
        # `net.{2k}.`): rename them to ours, so a checkpoint of either backend loads here.
        # Lightning calls this before it loads checkpoint["state_dict"], on every load path.
        if self._builtin_network:
            checkpoint["state_dict"] = state_dict_for_backend(checkpoint["state_dict"], self.hparams.backend, "net.")
        own = self.state_dict()
        for key, value in checkpoint["state_dict"].items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ConfigError(
                    f"the checkpoint's {key} has shape {tuple(value.shape)}, this model's {tuple(own[key].shape)}: "
                    "it was trained with other data columns or network settings"
                )

    # ------------------------------------------------------------ per task

    def make_loss(self, backend: str) -> torch.nn.Module:
        raise NotImplementedError

    def make_metrics(self) -> torchmetrics.MetricCollection:
        raise NotImplementedError

    def loss_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output, y

    def metric_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """Network output → predictions in the target's units."""
        raise NotImplementedError

    def check_data(self, datamodule: Any) -> None:
        """Raise before training when the data module's shapes do not fit this model."""

    # ------------------------------------------------------------ shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup and before any batch: mismatches fail here, not mid-epoch.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.check_datamodule(datamodule)

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise a ConfigError when `datamodule` does not fit this task (the CLI calls this as soon
        as both exist, before building the Trainer; `setup` calls it again)."""
        data_task = getattr(datamodule, "task", None)
        if data_task is not None and data_task != self.task:
            raise ConfigError(
                f"{type(self).__name__} trains on {self.task} data, but {type(datamodule).__name__} "
                f"holds a {data_task} task; pick the matching task class"
            )
        self.check_data(datamodule)

    def _step(self, batch: Batch, metrics: torchmetrics.MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        output = self(x)
        loss = self.loss_fn(*self.loss_inputs(output, y))
        metrics.update(*self.metric_inputs(output.detach(), y))
        on_step = stage == "train"  # a per-step loss in the progress bar while training; epoch means everywhere
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(x))
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.get("dp_noise_multiplier") is None:
            return self._step(batch, self.train_metrics, "train")
        # DP-SGD: the forward runs watched, so that backward hands each rule's δ and a to the context and
        # forms no unclipped weight gradient (book-keeping); `on_after_backward` then forms each parameter's
        # clipped sum Σₙ cₙ gₙ once, from δ and a, and adds noise.
        if len(batch[0]) == 0:  # Poisson sampling drew no row: the step is the noise alone (on_after_backward)
            self._private = EMPTY_BATCH
            return torch.stack([p.sum() for p in self.net.parameters()]).sum() * 0.0  # .grad for every parameter
        with manual_backprop.per_sample_grads(self.net, loss_reduction="mean", materialize=False,
                                              bookkeeping=True) as self._private:
            return self._step(batch, self.train_metrics, "train")

    # ------------------------------------------------------------ DP-SGD, and DDP

    def on_fit_start(self) -> None:
        distributed = self.trainer.world_size > 1
        if distributed and torch.distributed.is_initialized():  # rank 0's feedback matrices, however each was built
            manual_backprop.plugins.feedback_alignment.broadcast_feedback(self.net)
        if self.hparams.get("dp_noise_multiplier") is None:
            return
        if self.hparams.dp_noise_multiplier > 0:  # σ = 0 clips only: no privacy to count (ε = ∞)
            self._accountant = manual_backprop.privacy.accountant("prv")  # Opacus: fails here if missing
        if self.trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"DP-SGD clips and noises the gradient of each batch: accumulate_grad_batches must be 1, got "
                f"{self.trainer.accumulate_grad_batches} (raise the data's batch_size instead)"
            )
        private = {id(p) for p in self.net.parameters()}
        others = [name for name, p in self.named_parameters() if p.requires_grad and id(p) not in private]
        if others:
            raise ConfigError(f"DP-SGD privatises the network's parameters only; these would train without "
                              f"privacy: {', '.join(others)}")
        if distributed:
            self._skip_ddp_gradient_sync()

    def _skip_ddp_gradient_sync(self) -> None:
        """Under DDP, DP-SGD sums the clipped gradients itself (`on_after_backward`): DDP's all-reduce of the
        unclipped ones would be thrown away, so its communication hook is made a no-op (Lightning wraps the
        model in a new DDP at every fit). With a hook of its own already set (DDPStrategy(ddp_comm_hook=...))
        DDP keeps it; the step is right either way."""
        from torch.nn.parallel import DistributedDataParallel

        model = self.trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ConfigError(
                f"DP-SGD on {self.trainer.world_size} processes runs under a DDP strategy (ddp, ddp_spawn); "
                f"this one wraps the model in {type(model).__name__}"
            )
        try:
            manual_backprop.privacy.skip_gradient_sync(model)
        except RuntimeError as error:  # a hook is already registered: DDP's all-reduce is only wasted
            rank_zero_warn(f"DP-SGD could not turn off DDP's gradient all-reduce ({error}); it recomputes the "
                           "gradients after it, so the step is right, but the all-reduce is wasted")

    def on_after_backward(self) -> None:
        """DP-SGD's step on the gradients: each sample clipped to dp_max_grad_norm by its per-sample norm
        (no per-sample gradient formed: a reweighted sum of each rule's δ and a), Gaussian noise of std
        σ·C, the mean over the batch; then one accountant step at sample rate 1 / (batches per epoch).

        Backward formed no unclipped gradient of the network's parameters (`per_sample_grads(bookkeeping=True)`):
        their `.grad` is written here, so a callback's `on_after_backward`, which Lightning runs before this
        one, finds none; `on_before_optimizer_step`
        sees the private gradient.

        Under DDP (several processes) this is the step one process would take on the global batch: each
        process clips its own samples, the clipped sums are summed over the processes, the noise is drawn
        once (on rank 0) and the mean is over the global batch (`privacy.clip_and_noise_(distributed=True)`);
        DDP's own all-reduce of the unclipped gradients is turned off (`on_fit_start`). Each process's
        sampler deals it 1/world_size of every global batch, so its number of batches per epoch is the
        number of global steps per epoch, and the sample rate, the global batch over the dataset's size, is
        the one process's: every process counts the same ε as one process on the same global batches."""
        ps, self._private = self._private, None
        if ps is None:
            return
        hp = self.hparams
        distributed = self._trainer is not None and self.trainer.world_size > 1
        expected = self._expected_batch_size()  # Poisson sampling: the mean is over the expected batch
        if ps is EMPTY_BATCH:
            params = [p for p in self.net.parameters() if p.requires_grad]
            manual_backprop.privacy.noise_only_(params, hp.dp_max_grad_norm, hp.dp_noise_multiplier, expected,
                                                distributed=distributed)
        else:
            manual_backprop.privacy.clip_and_noise_(ps, hp.dp_max_grad_norm, hp.dp_noise_multiplier,
                                                    batch_size=expected, distributed=distributed)
        if self._accountant is not None:
            batches = self.trainer.num_training_batches
            self._accountant.step(noise_multiplier=hp.dp_noise_multiplier, sample_rate=1.0 / max(batches, 1))

    def _expected_batch_size(self) -> Optional[float]:
        """The global expected batch of Poisson-sampled training batches (`PoissonBatches`); None for
        fixed-size batches, whose mean is over the samples seen."""
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        return getattr(getattr(loader, "dataset", None), "expected_batch_size", None)

    def on_train_epoch_end(self) -> None:
        if self.hparams.get("dp_noise_multiplier") == 0:
            self.log("train/epsilon", math.inf, sync_dist=True)
        elif self._accountant is not None and self._accountant.history:
            # equal on every process (see on_after_backward): sync_dist averages equal values, without a warning
            self.log("train/epsilon", float(self._accountant.get_epsilon(self.hparams.dp_delta)), sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predictions(self(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Used when the CLI config has no `optimizer:` section; one there replaces this.
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _check_dp(backend: str, noise_multiplier: Optional[float], max_grad_norm: float, delta: float) -> None:
    """DP-SGD's settings: a noise multiplier σ ≥ 0 (None: ordinary training), C > 0, 0 < δ < 1, backend manual."""
    if noise_multiplier is None:
        return
    if noise_multiplier < 0 or max_grad_norm <= 0 or not 0 < delta < 1:
        raise ConfigError(
            f"DP-SGD needs dp_noise_multiplier >= 0, dp_max_grad_norm > 0 and 0 < dp_delta < 1; got "
            f"{noise_multiplier!r}, {max_grad_norm!r}, {delta!r}"
        )
    if backend != "manual":
        raise ConfigError("DP-SGD (dp_noise_multiplier) needs backend manual: per-sample norms come from our rules")


def instantiate_net(config: Mapping) -> torch.nn.Module:
    """{"class_path": "pkg.Net", "init_args": {...}} → the module, as the CLI builds it (jsonargparse)."""
    from jsonargparse import ArgumentParser

    if "class_path" not in config:
        raise ConfigError(f"a net config needs a class_path; got {dict(config)!r}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=torch.nn.Module)
    try:
        return parser.instantiate_classes(parser.parse_object({"net": dict(config)})).net
    except Exception as error:  # jsonargparse's message names the class path and what is wrong
        raise ConfigError(f"cannot build net {config['class_path']!r}: {error}") from error


def _loss(backend: str, manual: type[torch.nn.Module]) -> torch.nn.Module:
    """Our loss module, or on backend "autograd" torch's (the class ours subclasses)."""
    return manual() if backend == "manual" else manual.__bases__[0]()


class RegressionTask(TaskModule):
    """Regression with u = out_features outputs and mean squared error.

    The data module standardizes targets on the training split; the loss works on
    those standardized targets, while the logged MSE / MAE / R² and `predict` are in
    the targets' original units (the data module's target scaler, copied into the
    `target_mean` / `target_scale` buffers so checkpoints predict on their own).
    The logged `loss` is that MSE on standardized targets (what the network trains on);
    `mse` is in the targets' units. With several targets, `mse`, `mae` and `r2` are
    uniform means over the targets (of values in mixed units), and each target also gets
    its own, `mse/<name>`, `mae/<name>`, `r2/<name>`, named by `target_names` (the CLI
    links them from the data module's column names).
    """

    task = "regression"
    main_metric = "r2"
    loss_label = "loss: MSE on standardized targets"

    def __init__(
        self,
        in_features: Optional[int] = None,
        out_features: int = 1,
        hidden_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        backend: str = "manual",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        net: Optional[torch.nn.Module] = None,
        target_names: Optional[Sequence[str]] = None,
        dp_noise_multiplier: Optional[float] = None,
        dp_max_grad_norm: float = 1.0,
        dp_delta: float = 1e-5,
        learning_rule: str = "backprop",
        allow_stock: bool = False,
    ) -> None:
        hidden_sizes = list(hidden_sizes)  # plain list in hparams and checkpoints
        self.out_features = out_features
        if target_names is not None:
            target_names = [str(name) for name in target_names]
            if len(target_names) != out_features:
                raise ConfigError(f"target_names has {len(target_names)} names for out_features={out_features}")
        self.target_names = target_names or [f"target_{j}" for j in range(out_features)]
        super().__init__(in_features, out_features, hidden_sizes, activation, backend, lr, weight_decay, net,
                         dp_noise_multiplier, dp_max_grad_norm, dp_delta, learning_rule, allow_stock)
        self.register_buffer("target_mean", torch.zeros(out_features))
        self.register_buffer("target_scale", torch.ones(out_features))

    def make_loss(self, backend: str) -> torch.nn.Module:
        return _loss(backend, mnn.MSELoss)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        averaged = {"mse": regression.MeanSquaredError(), "mae": regression.MeanAbsoluteError(), "r2": regression.R2Score()}
        if self.out_features == 1:
            return torchmetrics.MetricCollection(averaged)
        per_target = {
            f"{name}/{column}": TargetColumn(make(), j)
            for name, make in (("mse", regression.MeanSquaredError), ("mae", regression.MeanAbsoluteError), ("r2", regression.R2Score))
            for j, column in enumerate(self.target_names)
        }
        # No compute groups: the column wrappers hold no state of their own to compare.
        return torchmetrics.MetricCollection(averaged | per_target, compute_groups=False)

    def check_data(self, datamodule: Any) -> None:
        num_targets = getattr(datamodule, "num_targets", None)
        if num_targets is not None and num_targets != self.out_features:
            raise ConfigError(f"RegressionTask has out_features={self.out_features} but the data has {num_targets} targets")
        mean, scale = getattr(datamodule, "target_mean", None), getattr(datamodule, "target_scale", None)
        if mean is not None and scale is not None:
            self.target_mean.copy_(torch.as_tensor(mean))
            self.target_scale.copy_(torch.as_tensor(scale))

    def to_target_units(self, standardized: torch.Tensor) -> torch.Tensor:
        return standardized * self.target_scale + self.target_mean

    def metric_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preds, target = self.to_target_units(output), self.to_target_units(y)
        # R2Score takes (N,) for one output and (N, u) for several.
        return (preds.squeeze(-1), target.squeeze(-1)) if self.out_features == 1 else (preds, target)

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        return self.to_target_units(output)


class TargetColumn(WrapperMetric):
    """`metric` on one column of (N, u) predictions and targets: a per-target regression metric."""

    def __init__(self, metric: torchmetrics.Metric, column: int) -> None:
        super().__init__()
        self.metric, self.column = metric, column

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.metric.update(preds[:, self.column], target[:, self.column])

    def compute(self) -> torch.Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()


class BinaryClassificationTask(TaskModule):
    """Binary classification: one logit z, BCE on logits (δ(L) = σ(z) − y), predictions P(y = 1)."""

    task = "binary"
    main_metric = "accuracy"
    loss_label = "loss: binary cross-entropy"

    def __init__(
        self,
        in_features: Optional[int] = None,
        hidden_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        backend: str = "manual",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        net: Optional[torch.nn.Module] = None,
        dp_noise_multiplier: Optional[float] = None,
        dp_max_grad_norm: float = 1.0,
        dp_delta: float = 1e-5,
        learning_rule: str = "backprop",
        allow_stock: bool = False,
    ) -> None:
        hidden_sizes = list(hidden_sizes)
        super().__init__(in_features, 1, hidden_sizes, activation, backend, lr, weight_decay, net,
                         dp_noise_multiplier, dp_max_grad_norm, dp_delta, learning_rule, allow_stock)

    def make_loss(self, backend: str) -> torch.nn.Module:
        return _loss(backend, mnn.BCEWithLogitsLoss)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "accuracy": classification.BinaryAccuracy(),
                "auroc": classification.BinaryAUROC(),
                "f1": classification.BinaryF1Score(),
            }
        )

    def check_data(self, datamodule: Any) -> None:
        num_targets = getattr(datamodule, "num_targets", None)
        if num_targets not in (None, 1):
            raise ConfigError(f"BinaryClassificationTask needs one target column; the data has {num_targets}")

    def loss_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output.squeeze(-1), y.to(output.dtype)

    def metric_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(output.squeeze(-1).float()), y.long()

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output.squeeze(-1))


class MulticlassClassificationTask(TaskModule):
    """K-class classification: K logits, cross-entropy (δ(L) = softmax(z) − y), predictions class probabilities."""

    task = "multiclass"
    main_metric = "accuracy"
    loss_label = "loss: cross-entropy"

    def __init__(
        self,
        in_features: Optional[int] = None,
        num_classes: Optional[int] = None,
        hidden_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        backend: str = "manual",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        net: Optional[torch.nn.Module] = None,
        dp_noise_multiplier: Optional[float] = None,
        dp_max_grad_norm: float = 1.0,
        dp_delta: float = 1e-5,
        learning_rule: str = "backprop",
        allow_stock: bool = False,
    ) -> None:
        if num_classes is None:
            raise ConfigError(
                "MulticlassClassificationTask needs num_classes (an integer >= 2); got None. The CLI links it "
                "from the data module's num_classes, which is None when the data's task is regression: "
                "for class labels set the data's task to multiclass (--data.init_args.task=multiclass), "
                "for numeric targets use RegressionTask; pick the matching task class"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        hidden_sizes = list(hidden_sizes)
        self.num_classes = num_classes
        super().__init__(in_features, num_classes, hidden_sizes, activation, backend, lr, weight_decay, net,
                         dp_noise_multiplier, dp_max_grad_norm, dp_delta, learning_rule, allow_stock)

    def make_loss(self, backend: str) -> torch.nn.Module:
        return _loss(backend, mnn.CrossEntropyLoss)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        k = self.num_classes
        return torchmetrics.MetricCollection(
            {
                "accuracy": classification.MulticlassAccuracy(num_classes=k, average="micro"),
                "f1_macro": classification.MulticlassF1Score(num_classes=k, average="macro"),
            }
        )

    def check_data(self, datamodule: Any) -> None:
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(
                f"MulticlassClassificationTask has num_classes={self.num_classes} but the data has {num_classes} classes"
            )

    def metric_inputs(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(output.float(), dim=-1), y

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output, dim=-1)
