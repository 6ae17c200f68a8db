"""Datasets and partitioners: from a scenario's `data` section to each client's tensors.

A dataset plugin loads every example into one `TensorData` table. `FederatedData` then
holds out a global test set, hands the rest to a flwr-datasets partitioner (one partition
per client) and splits each partition into train and validation. Everything is seeded, so
the same scenario and seed give every process the same clients; `federated_data` caches
the result because every Flower client call in a process needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from fedsim.core.config import DataConfig
from fedsim.core.errors import UserError
from fedsim.core.registry import DATASETS, PARTITIONERS, NoParams

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "fine_label", "labels")


@dataclass(frozen=True)
class TensorData:
    """Examples as tensors: x float32 in [0, 1], (N, C, H, W) or (N, F); y (N,): int64 class
    labels, or float32 targets for regression (num_classes 0)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_regression(self) -> bool:
        return self.num_classes == 0

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> TensorData:
        """The examples at `indices`, in that order."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorData(self.x[index], self.y[index], self.num_classes)


# --------------------------------------------------------------------------- datasets


@DATASETS.register("digits")
class Digits:
    """scikit-learn's 8x8 handwritten digits (1797 real images, 10 classes, no download)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        features: int | None = Field(
            None,
            ge=1,
            le=64,
            description="reduce each image to this many PCA components scaled to [0, 1] "
            "(small inputs for quantum models); null: the 8x8 images",
        )

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        """Images / 16, or their first `features` principal components, min-max scaled.

        The PCA is fitted on all 1797 images without labels (unsupervised preprocessing, the
        same for every client and the test set).
        """
        digits = load_digits()
        y = torch.tensor(digits.target, dtype=torch.long)
        if params.features is None:
            x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
            return TensorData(x, y, 10)
        components = PCA(params.features, svd_solver="full").fit_transform(digits.data)
        low, high = components.min(axis=0), components.max(axis=0)
        x = torch.tensor((components - low) / (high - low), dtype=torch.float32)
        return TensorData(x, y, 10)


@DATASETS.register("regression")
class Regression:
    """Synthetic regression: y a random zero-mean trigonometric polynomial of x in [0, 1]^F, plus noise."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_examples: int = Field(500, ge=2, description="number of examples")
        features: int = Field(1, ge=1, le=6, description="input features F")
        frequencies: int = Field(
            1, ge=1, le=8, description="highest frequency K (cycles per unit) in each feature"
        )
        noise: float = Field(0.05, ge=0, description="std of the Gaussian noise on y")

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        """y = sum_w a_w cos(2 pi w.x + phi_w) over w in {0..K}^F \\ {0}, scaled to max |y| = 0.8.

        Amplitudes a_w ~ N(0, 1) / (1 + |w|), phases uniform. No constant term and targets
        inside [-1, 1]: what a circuit's expectation value can reach (a Fourier-tower model
        without re-uploading has no constant term in its single-feature expansion).
        num_classes 0 marks the task regression.
        """
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, size=(params.num_examples, params.features))
        grid = np.arange(params.frequencies + 1)
        omegas = np.stack(np.meshgrid(*[grid] * params.features), -1).reshape(-1, params.features)[1:]
        amplitudes = rng.standard_normal(len(omegas)) / (1 + np.linalg.norm(omegas, axis=1))
        phases = rng.uniform(0, 2 * np.pi, len(omegas))
        clean = np.cos(2 * np.pi * x @ omegas.T + phases) @ amplitudes
        y = 0.8 * clean / np.abs(clean).max() + params.noise * rng.standard_normal(len(x))
        return TensorData(
            torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), 0
        )


@DATASETS.register("synthetic")
class Synthetic:
    """Class-conditional Gaussian blobs shaped as images (any size, no download)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_examples: int = Field(1000, ge=1, description="number of examples")
        num_classes: int = Field(10, ge=2, description="number of classes")
        channels: int = Field(1, ge=1, description="image channels")
        image_size: int = Field(8, ge=1, description="image height and width in pixels")
        noise: float = Field(0.3, ge=0, description="std of the noise around each class mean")

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        rng = np.random.default_rng(seed)
        shape = (params.channels, params.image_size, params.image_size)
        means = rng.uniform(0, 1, size=(params.num_classes, *shape))
        labels = rng.permutation(np.arange(params.num_examples) % params.num_classes)
        noise = params.noise * rng.standard_normal((params.num_examples, *shape))
        pixels = means[labels] + noise
        x = torch.tensor(np.clip(pixels, 0, 1), dtype=torch.float32)
        return TensorData(x, torch.tensor(labels, dtype=torch.long), params.num_classes)


class ImageTableParams(BaseModel):
    """How to read an image-classification table (shared by `huggingface` and `local`)."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field("train", description="which split to load")
    image_column: str | None = Field(
        None, description=f"column holding the images; null = the first of {IMAGE_COLUMNS}"
    )
    label_column: str | None = Field(
        None, description=f"column holding the labels; null = the first of {LABEL_COLUMNS}"
    )
    max_examples: int | None = Field(
        None, ge=1, description="keep only this many examples (a seeded random sample)"
    )
    grayscale: bool = Field(False, description="convert every image to one channel")


def _find_column(
    table: datasets.Dataset, given: str | None, candidates: tuple[str, ...], field: str
) -> str:
    """The column the user named, else the first conventional name the table has."""
    names = [given] if given else list(candidates)
    for name in names:
        if name in table.column_names:
            return name
    raise UserError(
        f"data.dataset.{field}: no column {' or '.join(repr(n) for n in names)}; "
        f"the table has {', '.join(table.column_names)}"
    )


def table_to_tensors(
    table: datasets.Dataset, params: ImageTableParams, seed: int
) -> TensorData:
    """Decode a Hugging Face image-classification table into a TensorData (pixels / 255)."""
    image_column = _find_column(table, params.image_column, IMAGE_COLUMNS, "image_column")
    label_column = _find_column(table, params.label_column, LABEL_COLUMNS, "label_column")
    if params.max_examples is not None and params.max_examples < len(table):
        table = table.shuffle(seed=seed).select(range(params.max_examples))

    images = list(table[image_column])
    if len({image.size for image in images}) > 1:
        raise UserError(
            f"data.dataset: images in column '{image_column}' differ in size; "
            "fedsim needs one image size per dataset"
        )
    single_channel = params.grayscale or all(image.mode in ("L", "1") for image in images)
    mode = "L" if single_channel else "RGB"
    pixels = np.stack([np.asarray(image.convert(mode)) for image in images])
    x = torch.from_numpy(pixels).float().div(255)
    x = x.unsqueeze(1) if single_channel else x.permute(0, 3, 1, 2).contiguous()

    y = torch.tensor(table[label_column], dtype=torch.long)
    feature = table.features[label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    num_classes = feature.num_classes if is_class_label else int(y.max()) + 1
    return TensorData(x, y, num_classes)


@DATASETS.register("huggingface")
class HuggingFace:
    """Any Hugging Face image-classification dataset by name (downloads on first use)."""

    class Params(ImageTableParams):
        path: str = Field(
            "ylecun/mnist",
            description="Hub dataset name, e.g. ylecun/mnist, uoft-cs/cifar10, "
            "zalando-datasets/fashion_mnist",
        )

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        try:
            table = datasets.load_dataset(params.path, split=params.split)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise UserError(f"data.dataset.path: cannot load '{params.path}': {err}") from None
        return table_to_tensors(table, params, seed)


@DATASETS.register("local")
class Local:
    """An image-classification table from local files (parquet, save_to_disk or image folder)."""

    class Params(ImageTableParams):
        path: str = Field("data", description="parquet file, save_to_disk folder or image folder")
        format: Literal["auto", "parquet", "arrow", "imagefolder"] = Field(
            "auto",
            description="auto: a file is parquet, a folder with dataset_info.json or "
            "dataset_dict.json is arrow (save_to_disk), any other folder is imagefolder",
        )

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        path = Path(params.path)
        if not path.exists():
            raise UserError(
                f"data.dataset.path: '{path}' not found; give a parquet file, "
                "a save_to_disk folder or an image folder"
            )
        fmt = params.format if params.format != "auto" else _guess_format(path)
        if fmt == "arrow":
            loaded = datasets.load_from_disk(str(path))
        elif fmt == "parquet":
            loaded = datasets.load_dataset("parquet", data_files=str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if params.split not in loaded:
                raise UserError(
                    f"data.dataset.split: no split '{params.split}' in '{path}'; "
                    f"it has {', '.join(loaded)}"
                )
            loaded = loaded[params.split]
        return table_to_tensors(loaded, params, seed)


def _guess_format(path: Path) -> str:
    if path.is_file():
        return "parquet"
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return "arrow"
    return "imagefolder"


# ------------------------------------------------------------------------ partitioners


@PARTITIONERS.register("iid")
class Iid:
    """Equal-sized random partitions (the test split has already shuffled the training table)."""

    Params = NoParams

    @staticmethod
    def build(params: NoParams, num_partitions: int, seed: int) -> Partitioner:
        return IidPartitioner(num_partitions)


@PARTITIONERS.register("dirichlet")
class Dirichlet:
    """Label skew: each class is spread over clients by Dirichlet(alpha) proportions."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        alpha: float = Field(
            0.5, gt=0, description="concentration; small = skewed, large = near iid"
        )
        min_partition_size: int = Field(
            2, ge=0, description="resample until every client has at least this many examples"
        )
        self_balancing: bool = Field(
            True, description="stop giving examples to clients already above the average size"
        )

    @staticmethod
    def build(params: Params, num_partitions: int, seed: int) -> Partitioner:
        return DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=params.alpha,
            min_partition_size=params.min_partition_size,
            self_balancing=params.self_balancing,
            seed=seed,
        )


@PARTITIONERS.register("classes")
class Classes:
    """Pathological skew: every client holds examples of exactly k classes."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        classes_per_client: int = Field(2, ge=1, description="distinct labels per client (k)")
        assignment: Literal["deterministic", "random", "first-deterministic"] = Field(
            "first-deterministic",
            description="deterministic: client i gets labels i..i+k-1; random: k random labels; "
            "first-deterministic: label i mod C, then k-1 random ones (uses every label "
            "once there are as many clients as labels)",
        )

    @staticmethod
    def build(params: Params, num_partitions: int, seed: int) -> Partitioner:
        return PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=params.classes_per_client,
            class_assignment_mode=params.assignment,
            seed=seed,
        )


# ---------------------------------------------------------------------- federated data


def _split(
    indices: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held-out) split holding out ceil(fraction * n) but never every index.

    Stratified by `labels` when given and possible (every class on both sides).
    """
    n_held = min(math.ceil(fraction * len(indices)), len(indices) - 1)
    if n_held <= 0:
        return indices, indices[:0]
    try:
        kept, held = train_test_split(
            indices, test_size=n_held, stratify=labels, random_state=seed
        )
    except ValueError:  # a class too rare to appear on both sides
        kept, held = train_test_split(indices, test_size=n_held, random_state=seed)
    return kept, held


def split_public_classes(data: TensorData, classes: list[int]) -> tuple[TensorData, TensorData]:
    """(private, public): the examples of `classes` go to the public side, labels unchanged."""
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise UserError(
            f"data.public_classes: {bad} outside the dataset's classes 0..{data.num_classes - 1}"
        )
    is_public = torch.isin(data.y, torch.tensor(classes, dtype=torch.long))
    if is_public.all():
        raise UserError("data.public_classes: every example would be public; keep a private class")
    return data.subset(torch.nonzero(~is_public).flatten()), data.subset(
        torch.nonzero(is_public).flatten()
    )


def _client_seed(seed: int, partition_id: int) -> int:
    """An independent seed per client, derived from the run seed."""
    return int(np.random.SeedSequence([seed, partition_id]).generate_state(1)[0])


class FederatedData:
    """The global test set and every client's (train, val) split, for one scenario and seed."""

    def __init__(self, config: DataConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        loaded = DATASETS.get(config.dataset.name).load(config.dataset.params, seed)
        # model inversion's auxiliary data: never in the federation's train or test sets
        dataset, self.public = split_public_classes(loaded, config.public_classes)
        self.private_classes = sorted(set(dataset.y.unique().tolist()))
        self.num_partitions = config.num_clients
        self.input_shape = dataset.input_shape
        self.num_classes = dataset.num_classes

        train_idx, test_idx = _split(
            np.arange(len(dataset)), config.test_fraction, seed, labels=dataset.y.numpy()
        )
        self.test = dataset.subset(test_idx)
        self.train = dataset.subset(train_idx)  # every client's examples, before partitioning
        if self.num_partitions > len(self.train):
            raise UserError(
                f"data.num_clients={self.num_partitions} exceeds the {len(self.train)} "
                "training examples left after the test split"
            )

        if dataset.is_regression and config.partitioner.name != "iid":
            raise UserError(
                f"data.partitioner: '{config.partitioner.name}' splits by class label, and "
                f"'{config.dataset.name}' is a regression dataset; use partitioner iid"
            )
        partitioner = PARTITIONERS.get(config.partitioner.name)
        self._partitioner = partitioner.build(
            config.partitioner.params, self.num_partitions, seed
        )
        self._partitioner.dataset = datasets.Dataset.from_dict(
            {"label": self.train.y.numpy(), "index": np.arange(len(self.train))}
        )
        try:
            self._partitioner.load_partition(0)  # partitions all clients now: errors surface here
        except ValueError as err:
            raise UserError(f"data.partitioner '{config.partitioner.name}': {err}") from None

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Indices into the training table (after the test split) of one client's examples."""
        if not 0 <= partition_id < self.num_partitions:
            raise UserError(
                f"partition id {partition_id} outside 0..{self.num_partitions - 1}"
            )
        partition = self._partitioner.load_partition(partition_id)
        return np.asarray(partition["index"], dtype=np.int64)

    def client(self, partition_id: int) -> tuple[TensorData, TensorData]:
        """One client's (train, val) examples.

        val is empty when val_fraction is 0 or the client holds a single example.
        """
        indices = self.partition_indices(partition_id)
        seed = _client_seed(self.seed, partition_id)
        train, val = _split(indices, self.config.val_fraction, seed)
        return self.train.subset(train), self.train.subset(val)


def federated_data(config: DataConfig, seed: int) -> FederatedData:
    """The FederatedData for `config` and `seed`, loaded and partitioned once per process."""
    return _cached_federated_data(config.model_dump_json(), seed)


@lru_cache(maxsize=4)
def _cached_federated_data(config_json: str, seed: int) -> FederatedData:
    return FederatedData(DataConfig.model_validate_json(config_json), seed)
