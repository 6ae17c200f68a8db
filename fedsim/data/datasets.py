"""Datasets and partitioners: from a scenario's `data` section to each client's tensors.

A dataset plugin loads every example into one `TensorData` table. `FederatedData` then
holds out a global test set, hands the rest to a flwr-datasets partitioner (one partition
per client) and splits each partition into train and validation. Everything is seeded, so
the same scenario and seed give every process the same clients; `federated_data` caches
the result because every Flower client call in a process needs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsim.core.config import DataConfig
from fedsim.core.errors import UserError
from fedsim.core.registry import DATASETS, PARTITIONERS, NoParams
from fedsim.data.canaries import draw_canaries

# Hugging Face datasets, flwr-datasets, PIL and scikit-learn are imported where they are used:
# validating a scenario needs only the Params here (`fedsim validate` in well under 3 s)
if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner.partitioner import Partitioner
    from PIL import Image

log = logging.getLogger("fedsim")
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
        from sklearn.datasets import load_digits
        from sklearn.decomposition import PCA

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

    regression = True  # no classes: scenarios refuse attacks that recover labels

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


@DATASETS.register("sparse_regression")
class SparseRegression:
    """Synthetic k-sparse linear regression: y = <theta*, x> + noise, x ~ N(0, I_d)."""

    regression = True  # no classes: scenarios refuse attacks that recover labels

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_examples: int = Field(2000, ge=2, description="number of examples (n, before the test split)")
        features: int = Field(20, ge=1, description="dimension d of x")
        sparsity: int = Field(3, ge=1, description="non-zero coordinates k of theta* (<= features)")
        noise: float = Field(0.1, ge=0, description="std of the Gaussian noise on y")

        @model_validator(mode="after")
        def _sparsity_fits(self) -> SparseRegression.Params:
            if self.sparsity > self.features:
                raise ValueError(f"sparsity={self.sparsity} exceeds features={self.features}")
            return self

    @staticmethod
    def theta(params: Params, seed: int) -> torch.Tensor:
        """theta*: k coordinates chosen at random, each +-1/sqrt(k) (so ||theta*||_2 = 1)."""
        rng = np.random.default_rng([seed, 1])
        theta = np.zeros(params.features)
        support = rng.choice(params.features, size=params.sparsity, replace=False)
        theta[support] = rng.choice([-1.0, 1.0], size=params.sparsity) / np.sqrt(params.sparsity)
        return torch.tensor(theta, dtype=torch.float32)

    @staticmethod
    def load(params: Params, seed: int) -> TensorData:
        """(x, y) with x ~ N(0, I_d) (sub-Gaussian, as in Zhu et al. 2024's analysis), y real."""
        theta = SparseRegression.theta(params, seed).numpy()
        rng = np.random.default_rng([seed, 2])
        x = rng.standard_normal((params.num_examples, params.features))
        y = x @ theta + params.noise * rng.standard_normal(params.num_examples)
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


Size = Annotated[int, Field(ge=1)] | tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
"""A side n (an n x n square, or the shorter side) or a [height, width] pair, in pixels."""


class ImageTableParams(BaseModel):
    """How to read an image-classification table (shared by `huggingface` and `local`), and
    the transforms that give every image one shape: channels, resize, centre crop.

    Pixels stay in [0, 1] (what attacks reconstruct and scores compare); a model that wants
    normalised inputs normalises inside itself.
    """

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
    channels: Literal["auto", "grayscale", "rgb"] = Field(
        "auto",
        description="auto: one channel if every image is grayscale, else RGB; grayscale or "
        "rgb: convert every image",
    )
    resize: Size | None = Field(
        None,
        description="n: scale the shorter side to n pixels (aspect kept, bilinear); "
        "[height, width]: exactly that size; null: keep it (images of mixed sizes are "
        "resized to the most common size)",
    )
    crop: Size | None = Field(
        None, description="after resizing, the centre n x n or [height, width] pixels; null: all"
    )
    relabel: bool = Field(
        False,
        description="renumber the labels 0..K-1 in sorted order (e.g. CelebA's identity "
        "column as classes for model inversion); else K is the largest label + 1",
    )


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
    import datasets

    image_column = _find_column(table, params.image_column, IMAGE_COLUMNS, "image_column")
    label_column = _find_column(table, params.label_column, LABEL_COLUMNS, "label_column")
    if params.max_examples is not None and params.max_examples < len(table):
        table = table.shuffle(seed=seed).select(range(params.max_examples))

    images = transform_images(list(table[image_column]), params)
    single_channel = params.channels == "grayscale" or (
        params.channels == "auto" and all(image.mode in ("L", "1") for image in images)
    )
    mode = "L" if single_channel else "RGB"
    pixels = np.stack([np.asarray(image.convert(mode)) for image in images])
    x = torch.from_numpy(pixels).float().div(255)
    x = x.unsqueeze(1) if single_channel else x.permute(0, 3, 1, 2).contiguous()

    y = torch.tensor(table[label_column], dtype=torch.long)
    feature = table.features[label_column]
    if params.relabel:
        classes, y = torch.unique(y, sorted=True, return_inverse=True)
        num_classes = len(classes)
    elif isinstance(feature, datasets.ClassLabel):
        num_classes = feature.num_classes
    else:
        num_classes = int(y.max()) + 1
    return TensorData(x, y, num_classes)


def transform_images(images: list[Image.Image], params: ImageTableParams) -> list[Image.Image]:
    """Resize (bilinear) and centre-crop every image as `params` says; images of mixed sizes
    with no `resize` are resized to the most common size, with a warning."""
    resize = params.resize
    if resize is None and len({image.size for image in images}) > 1:
        (width, height), _ = Counter(image.size for image in images).most_common(1)[0]
        resize = (height, width)
        log.warning("data.dataset: images differ in size; resized to %dx%d (set resize/crop to choose)", height, width)
    if resize is not None:
        from PIL import Image

        images = [image.resize(target_size(image, resize), Image.Resampling.BILINEAR) for image in images]
    if params.crop is not None:
        crop_height, crop_width = (params.crop, params.crop) if isinstance(params.crop, int) else params.crop
        images = [centre_crop(image, crop_height, crop_width) for image in images]
    return images


def target_size(image: Image.Image, size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) for PIL: `size` as [height, width], or the shorter side scaled to it."""
    if not isinstance(size, int):
        return size[1], size[0]
    width, height = image.size
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    if width > image.width or height > image.height:
        raise UserError(
            f"data.dataset.crop: {height}x{width} is larger than the {image.height}x"
            f"{image.width} images; crop less or resize more"
        )
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


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
        """The table from the Hub, or from the local cache when the Hub does not answer."""
        import datasets

        endpoint, offline = datasets.config.HF_ENDPOINT, datasets.config.HF_HUB_OFFLINE
        unreachable = None if offline else hub_unreachable(endpoint)
        try:
            with hub_offline() if unreachable else contextlib.nullcontext():
                table = datasets.load_dataset(params.path, split=params.split)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            if offline or unreachable:
                why = "HF_HUB_OFFLINE is set" if offline else f"the Hub at {endpoint} gives no answer ({unreachable})"
                raise UserError(
                    f"data.dataset.path: '{params.path}' is not in the Hugging Face cache "
                    f"({datasets.config.HF_DATASETS_CACHE}) and {why}; download it once where the "
                    "Hub is reachable (fedsim then reads the cache), or use local files "
                    "(data.dataset.name: local, path: a parquet file or image folder)"
                ) from None
            reason = " ".join(str(err).split())
            raise UserError(f"data.dataset.path: cannot load '{params.path}': {reason}") from None
        if unreachable:
            log.warning("Hugging Face Hub unreachable (%s): read '%s' from the cache", unreachable, params.path)
        return table_to_tensors(table, params, seed)


HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one reachability check of the Hub waits. Without it a machine with no network
spends about 25 s in the Hub client's retries (five, with back-off) of a request it cannot
send, before `datasets` falls back to its cache."""


@cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why the Hugging Face Hub at `endpoint` did not answer one HEAD request (no retries),
    or None when it answered (any status: the Hub is there). Asked once per process."""
    import httpx
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.TransportError as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face offline mode for this block (as HF_HUB_OFFLINE=1 does for a process):
    `datasets` reads a Hub dataset from its cache and sends no request."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


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
        import datasets

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
        from flwr_datasets.partitioner import IidPartitioner

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
        from flwr_datasets.partitioner import DirichletPartitioner

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
        from flwr_datasets.partitioner import PathologicalPartitioner

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
    from sklearn.model_selection import train_test_split

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
        import datasets

        self.config = config
        self.seed = seed
        loaded = DATASETS.get(config.dataset.name).load(config.dataset.params, seed)
        # model inversion's auxiliary data: never in the federation's train or test sets
        dataset, self.public = split_public_classes(loaded, config.public_classes)
        self.private_classes = sorted(set(dataset.y.unique().tolist()))
        self.num_partitions = config.num_clients
        self._client_indices: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.input_shape = dataset.input_shape
        self.num_classes = dataset.num_classes

        if config.train_pool is None:
            train_idx, test_idx = _split(
                np.arange(len(dataset)), config.test_fraction, seed, labels=dataset.y.numpy()
            )
        else:  # a shadow federation's chosen training examples
            train_idx = np.unique(np.asarray(config.train_pool, dtype=np.int64))
            if len(train_idx) == 0 or train_idx[-1] >= len(dataset):
                raise UserError(f"data.train_pool: indices must lie in 0..{len(dataset) - 1}")
            test_idx = np.setdiff1d(np.arange(len(dataset)), train_idx)
        self.canaries = (  # audit canaries come out of the test set
            draw_canaries(dataset.x, dataset.y, dataset.num_classes, test_idx,
                          config.canaries, config.num_clients, seed)
            if config.canaries.count else None
        )  # fmt: skip
        if self.canaries is not None:
            test_idx = test_idx[~np.isin(test_idx, self.canaries.index)]
        # every private example before the split; `train_index`/`test_index` map the train and
        # test tables back into it (membership inference names examples by their pool index)
        self.pool, self.train_index, self.test_index = dataset, train_idx, test_idx
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

    def client_indices(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices into the training table of one client's (train, val) examples.

        Computed once per client and kept: the partition is fixed, and reading it back from
        the partitioner (a Hugging Face dataset) costs milliseconds, every round, per client;
        the arrays are shared, so callers index with them and never write into them."""
        if partition_id not in self._client_indices:
            indices = self.partition_indices(partition_id)
            seed = _client_seed(self.seed, partition_id)
            self._client_indices[partition_id] = _split(indices, self.config.val_fraction, seed)
        return self._client_indices[partition_id]

    def client(self, partition_id: int) -> tuple[TensorData, TensorData]:
        """One client's (train, val) examples.

        val is empty when val_fraction is 0 or the client holds a single example. The client's
        included canaries (`data.canaries`) follow its own examples in train.
        """
        train, val = self.client_indices(partition_id)
        own = self.train.subset(train)
        if self.canaries is None:
            return own, self.train.subset(val)
        x, y = self.canaries.of_client(partition_id)
        return TensorData(torch.cat([own.x, x]), torch.cat([own.y, y]), own.num_classes), self.train.subset(val)


def federated_data(config: DataConfig, seed: int) -> FederatedData:
    """The FederatedData for `config` and `seed`, loaded and partitioned once per process."""
    return _cached_federated_data(config.model_dump_json(), seed)


@lru_cache(maxsize=4)
def _cached_federated_data(config_json: str, seed: int) -> FederatedData:
    return FederatedData(DataConfig.model_validate_json(config_json), seed)
