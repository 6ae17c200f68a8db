"""GIFD and latent-only generative inversion on 8x8 digits against DLG's sigmoid LeNet.

Every target is what an honest-but-curious server sees after one client's SGD step on a
batch of real digits (fedsim's own client loop, `fedsim.attacks.targets.from_local_training`). The
GAN prior is small and trained briefly so the file stays fast; `scenarios/sweeps/gifd_vs_ig.yaml`
runs the paper-style comparison (docs/gifd.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console

import fedsim.attacks.generator
from fedsim.attacks.generative_inversion import LatentInversion, LatentParams
from fedsim.attacks.generator import Generator, GeneratorParams
from fedsim.attacks.gifd import Gifd, GifdParams, L1Ball, LayeredGenerator, project_l1_ball
from fedsim.evaluation.metrics import score_images
from fedsim.attacks.targets import from_local_training
from fedsim.core.attack import AuxiliaryData, GradientTarget
from fedsim.core.config import DataConfig, build_scenario
from fedsim.data.datasets import FederatedData, TensorData, federated_data
from fedsim.core.errors import UserError
from fedsim.core.registry import MODELS
from fedsim.core.results import read_json
from fedsim.pipeline.runner import run_scenario
from fedsim.core.seeding import public_seed
from fedsim.federation.training import LocalHyperParams

SMALL_GAN = GeneratorParams(latent_dim=32, width=32, steps=1000, batch_size=32)
QUICK_GAN = SMALL_GAN.model_copy(update={"steps": 100})
"""For tests where the prior's quality does not matter."""
QUIET = Console(quiet=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One thread: these tiny models are fastest and repeatable so (also for the module's GAN)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return federated_data(DataConfig(dataset="digits", num_clients=10), 0)


@pytest.fixture(scope="module")
def aux(data: FederatedData) -> AuxiliaryData:
    return AuxiliaryData(data.test.x, data.test.y, data.public.x, data.public.y, seed=7)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, aux: AuxiliaryData) -> Path:
    """A run's cache with the small GAN already trained (by a first `prepare`)."""
    root = tmp_path_factory.mktemp("gan")
    Gifd(GifdParams(generator=SMALL_GAN), seed=1).prepare(aux, root, QUIET)
    return root


def observe(data: FederatedData, client: int, batch: int) -> tuple[GradientTarget, TensorData]:
    """The server's view of `client` taking one SGD step on its first `batch` digits."""
    torch.manual_seed(client)
    lenet = MODELS.get("lenet")
    model = lenet(lenet.Params(), data.input_shape, data.num_classes)
    examples = data.client(client)[0].subset(list(range(batch)))
    hp = LocalHyperParams(lr=0.1, batch_size=batch, local_epochs=1, local_steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    return from_local_training(model, examples, hp, seed=client, client=client)


def mean_psnr(attack: LatentInversion | Gifd, observed: list[tuple[GradientTarget, TensorData]]) -> float:
    results = attack.reconstruct_many([target for target, _ in observed])
    scores = [score_images(r.images, used.x, r.labels, used.y)["psnr"] for r, (_, used) in zip(results, observed)]
    return sum(scores) / len(scores)


def test_l1_projection_is_the_nearest_point_of_the_ball() -> None:
    torch.manual_seed(0)
    rows = torch.randn(64, 200) * torch.rand(64, 1) * 3
    radius = 40.0
    projected = project_l1_ball(rows, radius)
    norms = rows.abs().sum(-1)
    inside = norms <= radius
    assert 0 < inside.sum() < len(rows)  # both cases occur
    torch.testing.assert_close(projected[inside], rows[inside])
    outside = ~inside
    torch.testing.assert_close(projected[outside].abs().sum(-1), torch.full((int(outside.sum()),), radius))
    # the projection is soft-thresholding at the theta that makes the l1 norm equal the radius
    # (Duchi et al. 2008): find theta by bisection and compare
    low, high = torch.zeros(int(outside.sum()), 1), rows[outside].abs().max(-1, keepdim=True).values
    for _ in range(60):
        theta = (low + high) / 2
        too_big = (rows[outside].abs() - theta).clamp_min(0).sum(-1, keepdim=True) > radius
        low, high = torch.where(too_big, theta, low), torch.where(too_big, high, theta)
    expected = rows[outside].sign() * (rows[outside].abs() - (low + high) / 2).clamp_min(0)
    torch.testing.assert_close(projected[outside], expected, atol=1e-4, rtol=0)


def test_layered_generator_is_the_generator_and_exposes_its_feature_domains() -> None:
    torch.manual_seed(0)
    for side, depth in ((8, 2), (28, 2), (32, 3)):
        generator = Generator(16, 32, (1, side, side)).eval()
        layers = LayeredGenerator(generator)
        z = torch.randn(5, 16)
        h = z
        for k in range(layers.depth + 1):
            torch.testing.assert_close(layers.tail(k)(h), generator(z))
            h = layers.block(k)(h)
        assert layers.depth == depth


def test_l1_ball_holds_after_every_step_of_every_feature_stage(
    data: FederatedData, aux: AuxiliaryData, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps, radii = [10, 15, 15], [0.02, 0.05]
    ratios: dict[float, list[float]] = {}
    project = L1Ball.__call__

    def checked(ball: L1Ball, h: torch.Tensor) -> torch.Tensor:
        out = project(ball, h)
        ratios.setdefault(ball.radius, []).append(float((ball.deviation_norms(out) / ball.radius).max()))
        return out

    monkeypatch.setattr(L1Ball, "__call__", checked)
    attack = Gifd(GifdParams(generator=SMALL_GAN, steps=steps, radii=radii, restarts=2), seed=1)
    attack.prepare(aux, workspace, QUIET)
    result = attack.reconstruct(observe(data, 0, 4)[0])
    assert [len(r) for r in ratios.values()] == steps[1:]  # one projection per step, per stage
    assert max(max(r) for r in ratios.values()) <= 1 + 1e-5
    assert min(max(r) for r in ratios.values()) > 0.99  # the constraint was active in every stage
    assert result.details["l1_ratio_max"] == pytest.approx([max(r) for r in ratios.values()])
    assert len(result.details["stage_losses"]) == 3 and result.details["stage"] in (0, 1, 2)


def test_gifd_beats_latent_only_at_batch_4_in_the_same_budget(
    data: FederatedData, aux: AuxiliaryData, workspace: Path
) -> None:
    observed = [observe(data, client, 4) for client in (0, 1)]
    latent = LatentInversion(LatentParams(generator=SMALL_GAN, iterations=150, restarts=2), seed=1)
    gifd = Gifd(GifdParams(generator=SMALL_GAN, steps=[50, 50, 50], radii=[0.2, 0.4], restarts=2), seed=1)
    for attack in (latent, gifd):
        attack.prepare(aux, workspace, QUIET)
    latent_psnr, gifd_psnr = mean_psnr(latent, observed), mean_psnr(gifd, observed)
    assert gifd_psnr > latent_psnr + 3, (gifd_psnr, latent_psnr)
    # GIFD's latent stage is the latent-only attack, so its best candidate is never worse by D
    assert all(r.attack_loss <= r.details["stage_losses"][0] for r in gifd.reconstruct_many([t for t, _ in observed]))


def test_the_generator_is_trained_once_and_reused(
    aux: AuxiliaryData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainings: list[int] = []
    train = fedsim.attacks.generator.train_gan

    def counted(*args: object, **kwargs: object) -> None:
        trainings.append(1)
        train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fedsim.attacks.generator, "train_gan", counted)
    first = Gifd(GifdParams(generator=QUICK_GAN), seed=1)
    first.prepare(aux, tmp_path, QUIET)
    assert len(trainings) == 1
    # a second attack (another kind, another attack seed) on the same run reuses the GAN
    second = LatentInversion(LatentParams(generator=QUICK_GAN), seed=2)
    second.prepare(aux, tmp_path, QUIET)
    assert len(trainings) == 1
    assert first.generator is not None and second.generator is not None
    for a, b in zip(first.generator.state_dict().values(), second.generator.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # and a user's file (here: the cached one) loads with no training and the same weights
    (cached,) = tmp_path.glob("gan-*.safetensors")
    user = Gifd(GifdParams(generator=QUICK_GAN.model_copy(update={"path": str(cached)})), seed=3)
    user.prepare(aux, tmp_path / "elsewhere", QUIET)
    assert len(trainings) == 1
    assert user.generator is not None
    assert torch.equal(user.generator.project[0].weight, first.generator.project[0].weight)


def test_out_of_distribution_prior_trains_on_the_public_classes_only(
    aux: AuxiliaryData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="prior_data: public holds 0 images, too few to train a GAN on; set data.public_classes"):
        Gifd(GifdParams(generator=SMALL_GAN, prior_data="public")).prepare(aux, tmp_path, QUIET)
    public = federated_data(DataConfig(dataset="digits", num_clients=10, public_classes=[5, 6, 7, 8, 9]), 0)
    ood = AuxiliaryData(public.test.x, public.test.y, public.public.x, public.public.y, seed=7)
    seen: list[torch.Tensor] = []

    def spy(images: torch.Tensor, *args: object) -> tuple[Generator, None]:
        seen.append(images)
        return Generator(SMALL_GAN.latent_dim, SMALL_GAN.width, images.shape[1:]).eval(), None

    monkeypatch.setattr("fedsim.attacks.generative_inversion.train_or_load_generator", spy)
    Gifd(GifdParams(generator=SMALL_GAN, prior_data="public")).prepare(ood, tmp_path, QUIET)
    assert seen[0] is ood.public_x
    assert set(ood.public_y.tolist()) == {5, 6, 7, 8, 9}
    assert set(public.train.y.tolist()) == {0, 1, 2, 3, 4}  # the clients never had them


def scenario(root: Path, gifd: dict) -> dict:
    return {
        "name": "gifd_test",
        "data": {"dataset": "digits", "num_clients": 10},
        "model": {"name": "lenet"},
        "training": {"batch_size": 2, "local_steps": 1, "lr": 0.1},
        "federation": {"rounds": 1},
        "observer": {"rounds": [1], "clients": [0]},
        "attacks": [{"name": "gifd", "generator": QUICK_GAN.model_dump(), "restarts": 1, **gifd}],
        "output": {"dir": str(root)},
    }


def test_the_attacker_never_touches_ground_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While GIFD prepares and reconstructs, the run's ground truth is moved away and the
    clients' data cannot be read; what it is given holds none of the client's examples."""
    run_dir = tmp_path / "run"
    given: list[AuxiliaryData] = []
    targets: list[GradientTarget] = []

    def forbidden(*args: object) -> None:
        raise AssertionError("the attack read a client's data")

    def blindfolded(method):  # noqa: ANN001, ANN202
        def wrapped(self: Gifd, arg: object, *rest: object) -> object:
            truth = run_dir / "ground_truth"
            truth.rename(tmp_path / "hidden")
            try:
                with monkeypatch.context() as patch:
                    patch.setattr(FederatedData, "client", forbidden)
                    patch.setattr(FederatedData, "partition_indices", forbidden)
                    (given if isinstance(arg, AuxiliaryData) else targets).append(arg)  # type: ignore[arg-type]
                    return method(self, arg, *rest)
            finally:
                (tmp_path / "hidden").rename(truth)

        return wrapped

    settings = scenario(tmp_path, {"steps": [20, 10, 10], "radii": [0.05, 0.1]})
    run_scenario(build_scenario(settings), tmp_path / "open", QUIET)  # the same run, unhindered
    monkeypatch.setattr(Gifd, "prepare", blindfolded(Gifd.prepare))
    monkeypatch.setattr(Gifd, "reconstruct_many", blindfolded(Gifd.reconstruct_many))
    run_scenario(build_scenario(settings), run_dir, QUIET)

    record = read_json(run_dir / "attacks" / "gifd" / "round_0001_client_0000.json")
    unhindered = read_json(tmp_path / "open" / "attacks" / "gifd" / "round_0001_client_0000.json")
    # the blindfold changes nothing: the reconstruction never depended on the ground truth
    assert record["label_accuracy"] == 1.0
    assert (record["mse"], record["psnr"]) == (unhindered["mse"], unhindered["psnr"])
    assert targets[0][0].known_labels is None
    data = federated_data(DataConfig(dataset="digits", num_clients=10), public_seed(0))  # as the clients hold it
    private = data.client(0)[0].x.flatten(1)
    held = torch.cat([given[0].test_x, given[0].public_x]).flatten(1)
    assert not (torch.cdist(private, held) == 0).any()


def test_bad_gifd_settings_are_one_line_errors(data: FederatedData, aux: AuxiliaryData, workspace: Path) -> None:
    with pytest.raises(UserError, match="radii.*one radius per feature stage: steps has 3 entries"):
        build_scenario(scenario(Path("runs"), {"steps": [10, 10, 10], "radii": [0.1]}))
    attack = Gifd(GifdParams(generator=SMALL_GAN, steps=[5, 5, 5, 5], radii=[0.1, 0.1, 0.1]), seed=1)
    attack.prepare(aux, workspace, QUIET)
    with pytest.raises(UserError, match="3 feature stages but the generator has 2; give at most 3 steps"):
        attack.reconstruct(observe(data, 0, 1)[0])


def test_a_fixed_seed_repeats_the_reconstruction(data: FederatedData, aux: AuxiliaryData, workspace: Path) -> None:
    target = observe(data, 3, 2)[0]
    images = []
    for _ in range(2):
        attack = Gifd(GifdParams(generator=SMALL_GAN, steps=[10, 5, 5], radii=[0.05, 0.1], restarts=2), seed=5)
        attack.prepare(aux, workspace, QUIET)
        images.append(attack.reconstruct(target).images)
    assert torch.equal(images[0], images[1])
