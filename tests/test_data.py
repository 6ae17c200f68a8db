"""fedsim.data.datasets: datasets, partitioners and the per-client splits, all offline."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fedsim.core.config import DataConfig, build_scenario
from fedsim.data.datasets import FederatedData, TensorData, federated_data
from fedsim.core.errors import UserError
from fedsim.core.registry import DATASETS

DIGITS = 1797
NAMES = ["cat", "dog", "emu"]  # a ClassLabel with a class no example uses


def config(partitioner: str | dict = "iid", **fields) -> DataConfig:
    return DataConfig(dataset="digits", partitioner=partitioner, **fields)


def partitions(data: FederatedData) -> list[np.ndarray]:
    return [data.partition_indices(i) for i in range(data.num_partitions)]


def assert_disjoint(data: FederatedData) -> np.ndarray:
    joined = np.concatenate(partitions(data))
    assert len(joined) == len(np.unique(joined)), "a training example is on two clients"
    return joined


def assert_disjoint_and_complete(data: FederatedData) -> None:
    assert sorted(assert_disjoint(data).tolist()) == list(range(len(data.train)))
    assert len(data.train) + len(data.test) == DIGITS


def rows(*parts: TensorData) -> list[tuple[float, ...]]:
    """The examples of `parts` as a sorted multiset of flattened images."""
    return sorted(map(tuple, torch.cat([p.x.flatten(1) for p in parts]).tolist()))


def client_labels(data: FederatedData, partition_id: int) -> torch.Tensor:
    train, val = data.client(partition_id)
    return torch.cat([train.y, val.y])


def mean_max_class_share(data: FederatedData) -> float:
    shares = []
    for i in range(data.num_partitions):
        counts = torch.bincount(client_labels(data, i), minlength=data.num_classes)
        shares.append(float(counts.max()) / float(counts.sum()))
    return float(np.mean(shares))


# ---------------------------------------------------------------------------- datasets


def test_digits_are_real_8x8_images_in_unit_range() -> None:
    digits = DATASETS.get("digits").load(DATASETS.get("digits").Params(), seed=0)
    assert len(digits) == DIGITS and digits.input_shape == (1, 8, 8)
    assert digits.x.dtype == torch.float32 and digits.y.dtype == torch.int64
    assert 0 <= digits.x.min() and digits.x.max() <= 1 and digits.x.max() == 1
    assert digits.num_classes == 10 and set(digits.y.tolist()) == set(range(10))


def test_synthetic_is_seeded_shaped_and_clipped() -> None:
    synthetic = DATASETS.get("synthetic")
    params = synthetic.Params(num_examples=50, num_classes=5, channels=3, image_size=6, noise=1.0)
    a, b, c = synthetic.load(params, 1), synthetic.load(params, 1), synthetic.load(params, 2)
    assert len(a) == 50 and a.input_shape == (3, 6, 6) and a.num_classes == 5
    assert 0 <= a.x.min() and a.x.max() <= 1
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert torch.bincount(a.y).tolist() == [10] * 5


def test_subset_keeps_order_and_classes() -> None:
    data = TensorData(torch.arange(10.0).view(5, 2), torch.arange(5), num_classes=7)
    part = data.subset(np.array([3, 1]))
    assert part.y.tolist() == [3, 1] and part.x.tolist() == [[6, 7], [2, 3]]
    assert part.num_classes == 7 and part.input_shape == (2,) and len(data.subset([])) == 0


def image_table(mode: str = "RGB", image: str = "image", label: str = "label") -> datasets.Dataset:
    """Six 5x4 images whose every pixel is 40 * index, labels alternating cat/dog."""
    images = [Image.new(mode, (5, 4), color=(40 * i,) * len(mode)) for i in range(6)]
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=NAMES)})
    labels = [i % 2 for i in range(6)]
    return datasets.Dataset.from_dict({image: images, label: labels}, features=features)


def assert_six_images(data: TensorData, channels: int = 3) -> None:
    assert len(data) == 6 and data.input_shape == (channels, 4, 5)
    assert data.y.tolist() == [0, 1, 0, 1, 0, 1] and data.num_classes == 3
    assert [round(float(v) * 255) for v in data.x[:, 0, 0, 0]] == [0, 40, 80, 120, 160, 200]
    assert 0 <= data.x.min() and data.x.max() <= 1


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the datasets cache that load_dataset writes inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def load_local(path: Path, **params) -> TensorData:
    local = DATASETS.get("local")
    return local.load(local.Params(path=str(path), **params), seed=0)


def test_local_parquet_file(tmp_path: Path, hf_cache: None) -> None:
    image_table().to_parquet(str(tmp_path / "table.parquet"))
    assert_six_images(load_local(tmp_path / "table.parquet"))


def test_local_save_to_disk_folder(tmp_path: Path) -> None:
    image_table().save_to_disk(str(tmp_path / "saved"))
    assert_six_images(load_local(tmp_path / "saved"))
    assert load_local(tmp_path / "saved", channels="grayscale").input_shape == (1, 4, 5)


def test_local_image_folder(tmp_path: Path, hf_cache: None) -> None:
    for i in range(6):
        folder = tmp_path / "images" / NAMES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (5, 4), color=40 * i).save(folder / f"{i}.png")
    data = load_local(tmp_path / "images")
    assert len(data) == 6 and data.input_shape == (1, 4, 5) and data.num_classes == 2
    # each image's label is the folder it sits in
    assert sorted(zip(data.y.tolist(), (round(float(v) * 255) for v in data.x[:, 0, 0, 0]))) == [
        (0, 0), (0, 80), (0, 160), (1, 40), (1, 120), (1, 200)
    ]


def test_cifar_like_rgb_parquet_resized_cropped_and_converted(tmp_path: Path, hf_cache: None) -> None:
    """A 40x48 RGB table read as CIFAR-10 at 32x32 and as 1-channel digits-sized inputs."""
    red = [Image.new("RGB", (48, 40), color=(255, 0, 0)) for _ in range(4)]
    for image in red:
        image.paste((0, 0, 255), (0, 0, 1, 40))  # a blue band at the left edge, cropped away
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    datasets.Dataset.from_dict({"img": red, "label": [0, 1, 2, 0]}, features=features).to_parquet(
        str(tmp_path / "cifar.parquet")
    )
    cifar = load_local(tmp_path / "cifar.parquet", resize=32, crop=32)
    assert cifar.input_shape == (3, 32, 32)  # shorter side 40 -> 32 (38x32), centre 32x32
    assert torch.allclose(cifar.x[:, 0].mean(), torch.tensor(1.0), atol=0.02)  # the band is cut
    assert float(cifar.x[:, 2].max()) < 0.1
    exact = load_local(tmp_path / "cifar.parquet", resize=[8, 12], channels="grayscale")
    assert exact.input_shape == (1, 8, 12) and 0 <= exact.x.min() and exact.x.max() <= 1
    with pytest.raises(UserError, match="crop: 64x64 is larger than the 40x48 images"):
        load_local(tmp_path / "cifar.parquet", crop=64)


def test_celeba_like_identity_column_as_labels(tmp_path: Path, hf_cache: None) -> None:
    """Faces at 64x64 with a sparse integer identity column renumbered as classes 0..K-1."""
    faces = [Image.new("RGB", (178, 218), color=(10 * i, 20, 30)) for i in range(5)]
    identities = [4021, 17, 4021, 9000, 17]
    table = datasets.Dataset.from_dict({"image": faces, "identity": identities},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "identity": datasets.Value("int64")}))  # fmt: skip
    table.save_to_disk(str(tmp_path / "celeba"))
    data = load_local(tmp_path / "celeba", label_column="identity", resize=64, crop=64, relabel=True)
    assert data.input_shape == (3, 64, 64)
    assert data.y.tolist() == [1, 0, 1, 2, 0] and data.num_classes == 3
    assert load_local(tmp_path / "celeba", label_column="identity", resize=64, crop=64).num_classes == 9001


def test_mixed_size_image_folder_is_resized_to_the_common_size(
    tmp_path: Path, hf_cache: None, caplog: pytest.LogCaptureFixture
) -> None:
    for i, size in enumerate([(5, 4), (5, 4), (10, 8), (7, 3)]):
        folder = tmp_path / "images" / NAMES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, color=200).save(folder / f"{i}.png")
    data = load_local(tmp_path / "images")
    assert len(data) == 4 and data.input_shape == (1, 4, 5)
    assert torch.allclose(data.x, torch.full_like(data.x, 200 / 255), atol=1 / 255)
    assert "images differ in size; resized to 4x5" in caplog.text
    rgb = load_local(tmp_path / "images", channels="rgb", resize=[6, 6])
    assert rgb.input_shape == (3, 6, 6)


def test_huggingface_converts_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        calls.append((path, split))
        return image_table(mode="L", image="img", label="fine_label")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hf = DATASETS.get("huggingface")
    assert_six_images(hf.load(hf.Params(path="uoft-cs/cifar100", split="test"), seed=0), channels=1)
    sample = hf.load(hf.Params(max_examples=4), seed=0)
    assert len(sample) == 4 and calls[-1] == ("ylecun/mnist", "train")
    upscaled = hf.load(hf.Params(resize=[8, 10], channels="rgb"), seed=0)  # MNIST-like -> 3 x 8 x 10
    assert upscaled.input_shape == (3, 8, 10) and torch.equal(upscaled.x[:, 0], upscaled.x[:, 2])


def test_missing_column_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: image_table(label="y"))
    hf = DATASETS.get("huggingface")
    with pytest.raises(UserError, match="label_column.*'label'.*has image, y"):
        hf.load(hf.Params(), seed=0)
    assert hf.load(hf.Params(label_column="y"), seed=0).y.tolist() == [0, 1] * 3


# ------------------------------------------------------------------- federated splits


def test_test_set_is_held_out_stratified() -> None:
    data = FederatedData(config(), seed=0)
    assert abs(len(data.test) - round(0.2 * DIGITS)) <= 1
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert min(torch.bincount(data.test.y).tolist()) >= 30  # every digit, roughly 36 each


def test_iid_partitions_are_disjoint_complete_and_even() -> None:
    data = FederatedData(config(num_clients=7), seed=0)
    assert_disjoint_and_complete(data)
    sizes = [len(p) for p in partitions(data)]
    assert max(sizes) - min(sizes) <= 1


def test_small_dirichlet_alpha_skews_labels() -> None:
    skewed = FederatedData(config({"name": "dirichlet", "alpha": 0.1}), seed=0)
    even = FederatedData(config({"name": "dirichlet", "alpha": 100}), seed=0)
    assert_disjoint_and_complete(skewed)
    assert_disjoint_and_complete(even)
    assert mean_max_class_share(skewed) > 0.4  # about 0.7: most clients dominated by one digit
    assert mean_max_class_share(even) < 0.2  # about 0.11: close to the uniform 0.1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_gives_each_client_exactly_k_labels(k: int) -> None:
    classes = {"name": "classes", "classes_per_client": k}
    data = FederatedData(config(classes, num_clients=12), seed=0)
    assert_disjoint(data)
    assert all(len(client_labels(data, i).unique()) == k for i in range(12))


def test_same_seed_same_split_other_seed_different() -> None:
    dirichlet = config({"name": "dirichlet", "alpha": 0.5})
    a, b, c = (FederatedData(dirichlet, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(partitions(a), partitions(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(partitions(a), partitions(c)))
    assert torch.equal(a.test.x, b.test.x) and not torch.equal(a.test.y, c.test.y)
    assert torch.equal(a.client(2)[1].y, b.client(2)[1].y)


def test_train_and_val_split_each_client() -> None:
    data = FederatedData(config(val_fraction=0.25), seed=0)
    for i in range(data.num_partitions):
        indices = data.partition_indices(i)
        train, val = data.client(i)
        assert len(val) == math.ceil(0.25 * len(indices))
        assert rows(train, val) == rows(data.train.subset(indices))  # disjoint, nothing lost


def test_val_is_empty_without_fraction_or_with_one_example() -> None:
    assert len(FederatedData(config(val_fraction=0), seed=0).client(0)[1]) == 0
    one_each = FederatedData(config(num_clients=DIGITS - 360), seed=0)
    train, val = one_each.client(5)
    assert len(train) == 1 and len(val) == 0 and val.input_shape == (1, 8, 8)


def test_federated_data_is_cached_per_config_and_seed() -> None:
    first = federated_data(config(num_clients=3), seed=0)
    assert federated_data(config(num_clients=3), seed=0) is first
    assert federated_data(config(num_clients=3), seed=1) is not first


# ------------------------------------------------------------------------------ errors


def test_unknown_dataset_lists_the_allowed_names() -> None:
    with pytest.raises(UserError, match=r"data\.dataset.*'nope'; allowed: .*digits"):
        build_scenario({"data": {"dataset": "nope"}})


def test_missing_local_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(UserError, match=f"data.dataset.path: '{missing}' not found"):
        load_local(missing)


def test_more_clients_than_examples() -> None:
    with pytest.raises(UserError, match="data.num_clients=5000 exceeds the 1437 training examples"):
        FederatedData(config(num_clients=5000), seed=0)


def test_unsatisfiable_partitioner_reports_the_library_reason() -> None:
    reason = "greater than the number of unique classes"
    with pytest.raises(UserError, match=f"data.partitioner 'classes':.*{reason}"):
        FederatedData(config({"name": "classes", "classes_per_client": 11}), seed=0)


def test_partition_id_out_of_range() -> None:
    data = FederatedData(config(num_clients=3), seed=0)
    with pytest.raises(UserError, match=r"partition id 3 outside 0\.\.2"):
        data.client(3)
