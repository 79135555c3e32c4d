"""Data modules: bundled scikit-learn datasets and users' CSV files; splits, scalers, sampling, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules import ConfigError, CSVDataModule, SklearnDataModule

# dataset, task, rows, num_features, num_targets, num_classes
DATASETS = [
    ("diabetes", "regression", 442, 10, 1, None),
    ("linnerud", "regression", 20, 3, 3, None),
    ("breast_cancer", "binary", 569, 30, 1, 2),
    ("iris", "multiclass", 150, 4, 1, 3),
    ("wine", "multiclass", 178, 13, 1, 3),
    ("digits", "multiclass", 1797, 64, 1, 10),
]


@pytest.mark.parametrize("dataset, task, rows, num_features, num_targets, num_classes", DATASETS)
def test_sklearn_dataset_shapes_are_known_before_setup(dataset, task, rows, num_features, num_targets, num_classes):
    data = SklearnDataModule(dataset, val_fraction=0.2, test_fraction=0.2)
    assert not data.splits  # nothing split yet
    assert (data.task, data.num_features, data.num_targets, data.num_classes) == (
        task, num_features, num_targets, num_classes
    )  # fmt: skip
    data.setup("fit")
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sum(sizes.values()) == rows and min(sizes.values()) > 0
    x, y = next(iter(data.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1] == num_features
    if task == "regression":
        assert y.dtype == torch.float32 and y.shape[1:] == (num_targets,)
    elif task == "binary":
        assert y.dtype == torch.float32 and y.dim() == 1 and set(y.tolist()) <= {0.0, 1.0}
    else:
        assert y.dtype == torch.int64 and y.dim() == 1 and int(y.max()) < num_classes


def test_splits_are_disjoint_seeded_and_stratified():
    data = SklearnDataModule("wine", val_fraction=0.2, test_fraction=0.2, seed=1, standardize=False)
    data.setup()
    rows = {name: {tuple(r.tolist()) for r in split.tensors[0]} for name, split in data.splits.items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    # Stratified: each split's class shares are within one sample of the whole set's.
    overall = np.bincount(data.targets) / len(data.targets)
    for name, split in data.splits.items():
        labels = split.tensors[1].numpy()
        counts = np.bincount(labels, minlength=3)
        assert np.all(np.abs(counts - overall * len(labels)) <= 1.0), (name, counts)
    again = SklearnDataModule("wine", val_fraction=0.2, test_fraction=0.2, seed=1, standardize=False)
    again.setup()
    other = SklearnDataModule("wine", val_fraction=0.2, test_fraction=0.2, seed=2, standardize=False)
    other.setup()
    assert torch.equal(again.splits["test"].tensors[0], data.splits["test"].tensors[0])
    assert not torch.equal(other.splits["test"].tensors[0], data.splits["test"].tensors[0])


def test_scalers_are_fitted_on_the_training_split_only():
    data = SklearnDataModule("diabetes", val_fraction=0.2, test_fraction=0.2)
    data.setup()
    x_train, y_train = data.splits["train"].tensors
    x_test, y_test = data.splits["test"].tensors
    torch.testing.assert_close(x_train.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0, unbiased=False), torch.ones(10), atol=1e-4, rtol=0)
    torch.testing.assert_close(y_train.mean(0), torch.zeros(1), atol=1e-5, rtol=0)
    # Test rows were transformed with the training statistics, not their own.
    assert x_test.mean(0).abs().max() > 1e-2
    raw = SklearnDataModule("diabetes", val_fraction=0.2, test_fraction=0.2, standardize=False)
    raw.setup()
    raw_train_y = raw.splits["train"].tensors[1].double().numpy()
    np.testing.assert_allclose(data.target_mean, raw_train_y.mean(0))
    np.testing.assert_allclose(data.target_scale, raw_train_y.std(0))
    assert raw.target_mean is None  # no target scaling, nothing to undo


def test_train_order_is_seeded_by_epoch():
    """The same epoch gives the same batches in any run (resume); each epoch reshuffles."""
    data = SklearnDataModule("iris", batch_size=200)

    def order(epoch: int) -> torch.Tensor:
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1]

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert sorted(order(0).tolist()) == sorted(order(1).tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="mnist"), "unknown dataset 'mnist'; choose one of: diabetes, linnerud, breast_cancer, iris, wine, digits"),
        (dict(dataset="iris", batch_size=0), "batch_size must be a positive integer; got 0"),
        (dict(dataset="iris", val_fraction=0.0), "val_fraction must lie strictly between 0 and 1; got 0.0"),
        (dict(dataset="iris", test_fraction=1.5), "test_fraction must lie strictly between 0 and 1; got 1.5"),
        (dict(dataset="iris", val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction must leave rows"),
    ],
)  # fmt: skip
def test_bad_sklearn_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SklearnDataModule(**kwargs)


# ------------------------------------------------------------------ CSV


def write(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def table(rows: int, seed: int = 0) -> str:
    """a, b, c features; y (regression), z (second regression target), label (0/1), kind (1..3)."""
    rng = np.random.default_rng(seed)
    lines = ["a,b,c,y,z,label,kind"]
    for i in range(rows):
        a, b, c = rng.normal(size=3)
        lines.append(f"{a},{b},{c},{2 * a - b + 0.1 * c},{a * b},{int(a > 0)},{1 + i % 3}")
    return "\n".join(lines) + "\n"


def test_csv_regression_with_two_targets_and_chosen_features(tmp_path):
    path = write(tmp_path, table(40))
    data = CSVDataModule(path, target_columns=["y", "z"], feature_columns=["a", "b"], val_fraction=0.25, test_fraction=0.25)
    assert (data.num_features, data.num_targets, data.num_classes) == (2, 2, None)
    data.setup()
    assert sum(len(s) for s in data.splits.values()) == 40
    assert data.hparams["path"] == str(path) and data.hparams["target_columns"] == ["y", "z"]


def test_csv_features_default_to_every_other_column(tmp_path):
    data = CSVDataModule(write(tmp_path, table(30)), target_columns="y")
    assert data.feature_columns == ["a", "b", "c", "z", "label", "kind"] and data.num_targets == 1


def test_csv_binary_and_multiclass_labels(tmp_path):
    path = write(tmp_path, table(60))
    binary = CSVDataModule(path, "label", task="binary", feature_columns=["a", "b", "c"])
    assert (binary.num_targets, binary.num_classes) == (1, 2)
    multi = CSVDataModule(path, "kind", task="multiclass", feature_columns=["a", "b", "c"])
    # Labels 1, 2, 3 become classes 0, 1, 2; `classes` maps back.
    assert multi.num_classes == 3 and multi.classes.tolist() == [1, 2, 3]
    assert sorted(set(multi.targets.tolist())) == [0, 1, 2]
    multi.setup()
    assert multi.splits["train"].tensors[1].dtype == torch.int64


CSV_ERRORS = [
    # name, file text (None: no file), extra kwargs, error type, message
    ("missing file", None, {}, FileNotFoundError, "CSV file not found: .*nowhere.csv"),
    ("empty file", "", {}, ValueError, "data.csv is empty: expected a header row"),
    ("header only", "a,b,y\n", {}, ValueError, "data.csv has a header but no data rows"),
    ("missing column", "a,b,y\n1,2,3\n", {"target_columns": "price"}, ValueError,
     "no column 'price'; the columns are: a, b, y"),
    ("missing feature column", "a,b,y\n1,2,3\n", {"feature_columns": ["a", "q"]}, ValueError,
     "no column 'q'; the columns are: a, b, y"),
    ("non-numeric", "a,b,y\n1,2,3\n4,five,6\n", {}, ValueError,
     r"row 2 \(line 3\), column 'b' holds 'five', which is not a number"),
    ("NaN", "a,b,y\n1,2,3\n4,5,6\n7,8,nan\n", {}, ValueError,
     r"row 3 \(line 4\), column 'y' holds 'nan'; NaN and infinite values are not allowed"),
    ("empty cell", "a,b,y\n1,,3\n", {}, ValueError, r"row 1 \(line 2\), column 'b' holds '', which is not a number"),
    ("ragged row", "a,b,y\n1,2,3\n4,5\n", {}, ValueError, r"row 2 \(line 3\) has 2 cells; the header has 3"),
    ("duplicate columns", "a,a,y\n1,2,3\n", {}, ValueError, r"duplicate column names \['a'\]"),
    ("binary outside 0/1", "a,b,y\n1,2,0\n4,5,1\n7,8,2\n", {"task": "binary"}, ValueError,
     r"binary targets must be 0 or 1; .*row 3 \(line 4\), column 'y' holds 2"),
    ("multiclass not integer", "a,b,y\n1,2,0\n4,5,1.5\n", {"task": "multiclass"}, ValueError,
     r"multiclass labels must be integers; .*row 2 \(line 3\), column 'y' holds 1.5"),
    ("multiclass one label", "a,b,y\n1,2,4\n4,5,4\n", {"task": "multiclass"}, ValueError,
     r"multiclass labels take at least 2 values; got only \[4\]"),
    ("two binary targets", "a,b,y\n1,0,1\n", {"task": "binary", "target_columns": ["b", "y"]}, ValueError,
     "binary classification takes one target column; got 2"),
    ("no features left", "b,y\n0,1\n", {"target_columns": ["b", "y"]}, ValueError, "no feature columns left"),
    ("unknown task", "a,y\n0,1\n", {"task": "ranking"}, ValueError,
     "task must be one of 'regression', 'binary', 'multiclass'; got 'ranking'"),
]  # fmt: skip


@pytest.mark.parametrize("name, text, kwargs, error, message", CSV_ERRORS, ids=[case[0] for case in CSV_ERRORS])
def test_bad_csv_fails_at_construction_naming_the_problem(tmp_path, name, text, kwargs, error, message):
    path = tmp_path / "nowhere.csv" if text is None else write(tmp_path, text)
    args = {"target_columns": "y"} | kwargs
    with pytest.raises(error, match=message):
        CSVDataModule(path, **args)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = write(tmp_path, "a,b,y\n1,2,3\n\n4,x,6\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 4\), column 'b'"):
        CSVDataModule(path, "y")


# ------------------------------------------------------------------ Poisson sampling (DP-SGD)


def test_poisson_batches_take_each_row_with_probability_q_and_may_be_empty():
    from lightning_modules.data import PoissonBatches

    dataset = torch.utils.data.TensorDataset(torch.arange(200.0).unsqueeze(1), torch.arange(200))
    epoch = [0]
    batches = PoissonBatches(dataset, batch_size=20, seed=3, epoch=lambda: epoch[0])
    assert (len(batches), batches.sample_rate, batches.expected_batch_size) == (10, 0.1, 20.0)
    sizes, counts = [], torch.zeros(200)
    for epoch[0] in range(300):
        for x, y in batches:
            assert torch.equal(x[:, 0].long(), y)  # rows stay whole
            sizes.append(len(y))
            counts[y] += 1
    sizes = torch.tensor(sizes, dtype=torch.float64)
    # Binomial(200, 0.1): mean 20, variance 18
    assert abs(sizes.mean() - 20) < 0.3 and abs(sizes.var() - 18) < 2.5
    assert abs(counts.mean() / 300 - 1.0) < 0.02  # each row about once an epoch, independently
    again = [y.tolist() for y in (b[1] for b in batches)]
    assert again == [y.tolist() for y in (b[1] for b in batches)]  # seeded by (seed, epoch)
    tiny = PoissonBatches(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.zeros(3)), 1, 0, lambda: 0)
    empty = [x for epoch[0] in range(20) for x, _ in tiny if len(x) == 0]
    assert empty and empty[0].shape == (0, 2)  # an empty batch keeps the feature shape


def test_poisson_batches_on_two_processes_split_the_rows():
    from lightning_modules.data import PoissonBatches

    dataset = torch.utils.data.TensorDataset(torch.arange(10), torch.arange(10))
    shares = [PoissonBatches(dataset, 2, 0, lambda: 0, num_replicas=2, rank=r) for r in (0, 1)]
    assert shares[0].rows.tolist() == [0, 2, 4, 6, 8] and shares[1].rows.tolist() == [1, 3, 5, 7, 9]
    assert len(shares[0]) == 3 and shares[0].expected_batch_size == pytest.approx(10 / 3)  # ⌈10 / (2 · 2)⌉ steps, q = 1/3


@pytest.mark.parametrize("sampling, private, poisson", [
    ("auto", True, True), ("auto", False, False), ("shuffle", True, False), ("poisson", False, True),
])
def test_sampling_auto_is_poisson_for_a_private_task(tmp_path, sampling, private, poisson):
    from lightning_modules import BinaryClassificationTask
    from lightning_modules.data import PoissonBatches
    from tests.trainers import quiet_trainer

    data = SklearnDataModule("breast_cancer", batch_size=64, sampling=sampling)
    model = BinaryClassificationTask(30, dp_noise_multiplier=1.0 if private else None)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert isinstance(trainer.train_dataloader.dataset, PoissonBatches) == poisson
    with pytest.raises(ConfigError, match="sampling must be one of 'auto', 'shuffle', 'poisson'; got 'random'"):
        SklearnDataModule("breast_cancer", sampling="random")
