"""Analytic recovery (`analytic_fc`, `spear`) and the malicious server's imprint block (`imprint`).

Both read examples back exactly from a linear layer's gradient; the imprint also through a
SecAgg+ aggregate of a real (inline) federation, with what the server sent on record.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fedsim
from fedsim.core.attack import from_gradient
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS, MODELS

SHAPE = (1, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32).reshape(-1, *SHAPE) / 16, torch.tensor(data.target)


def mlp(hidden: list[int]) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = MODELS.get("mlp")
    return cls(cls.Params(hidden=hidden), SHAPE, 10)


def max_abs_error(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per true image, the max abs pixel error of its closest reconstruction."""
    return torch.cdist(truth.flatten(1), recon.flatten(1), p=float("inf")).min(1).values


@pytest.mark.parametrize("batch", [1, 4])
def test_analytic_fc_recovers_first_layer_input_exactly(digits, batch) -> None:
    images, labels = digits[0][:batch], digits[1][:batch]
    model = mlp([256])
    gradient = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
    attack = ATTACKS.get("analytic_fc")
    recon = attack(attack.Params()).reconstruct(from_gradient(model, gradient, batch, SHAPE, 10))
    assert len(recon.images) == batch
    assert max_abs_error(recon.images, images).max() < 1e-4
    assert torch.equal(recon.labels.sort().values, labels.sort().values)


def test_spear_recovers_a_whole_batch_where_analytic_fc_finds_part(digits) -> None:
    """Batch 8 through mlp [256] ReLU: SPEAR's low-rank + sparsity solve recovers all 8 digits
    to float precision (finding all 8 columns of Q), where the rows one example alone activated
    give analytic_fc 5 of them."""
    images, labels = digits[0][100:108], digits[1][100:108]
    model = mlp([256])
    gradient = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
    target = from_gradient(model, gradient, 8, SHAPE, 10)
    found = {}
    for name in ("spear", "analytic_fc"):
        attack = ATTACKS.get(name)
        recon = attack(attack.Params(), seed=0).reconstruct(target)
        found[name] = int((max_abs_error(recon.images, images) < 1e-4).sum())
        if name == "spear":
            assert recon.details["directions_found"] == 8 and recon.details["relu_consistency"] > 0.995
            assert torch.equal(recon.labels.sort().values, labels.sort().values)
    assert found == {"spear": 8, "analytic_fc": 5}


def test_spear_recovers_the_examples_of_several_local_steps(digits) -> None:
    """Two local SGD steps of 4 (fedsim's own local training): the first layer's update is the
    sum of two rank-4 sparse terms, and SPEAR recovers all 8 examples exactly."""
    from fedsim.core.attack import GradientTarget
    from fedsim.core.defense import LocalTraining
    from fedsim.data.datasets import TensorData
    from fedsim.federation.training import LocalHyperParams, train_locally

    images, labels = digits[0][200:208], digits[1][200:208]
    model, client = mlp([256]), mlp([256])
    hp = LocalHyperParams(lr=0.1, batch_size=4, local_epochs=1, local_steps=2, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    training = LocalTraining(num_examples=8, batch_size=4, local_epochs=1, local_steps=2, total_rounds=1, server_round=1, seed=0)
    train_locally(client, TensorData(images, labels, 10), hp, training, torch.Generator().manual_seed(0))
    update = {name: (after - before).detach() for (name, after), before in zip(client.state_dict().items(), model.state_dict().values())}
    target = GradientTarget(model=model, update=update, num_examples=8, lr=0.1, local_steps=2, batch_size=4,
                            input_shape=SHAPE, num_classes=10, server_round=1, client=0)  # fmt: skip
    attack = ATTACKS.get("spear")
    recon = attack(attack.Params(), seed=0).reconstruct(target)
    assert len(recon.images) == 8 and max_abs_error(recon.images, images).max() < 1e-4


def test_analytic_fc_refuses_a_model_without_an_input_linear_layer() -> None:
    cls = MODELS.get("lenet")
    model = cls(cls.Params(), SHAPE, 10)
    gradient = [torch.zeros_like(p) for p in model.parameters()]
    attack = ATTACKS.get("analytic_fc")
    with pytest.raises(UserError, match="no linear layer with bias"):
        attack(attack.Params()).reconstruct(from_gradient(model, gradient, 1, SHAPE, 10))


def test_imprint_crafts_rows_and_reads_a_summed_batch(digits) -> None:
    """Two 'clients' of 8 digits, their gradients summed (what SecAgg+ reveals)."""
    images, labels = digits
    model = mlp([128])
    attack = ATTACKS.get("imprint")(ATTACKS.get("imprint").Params(bins=128))
    record = attack.craft(model, SHAPE, images[1000:])
    assert record["rows"] == 128 and sorted(record["thresholds"]) == record["thresholds"]
    batches = [(images[:8], labels[:8]), (images[8:16], labels[8:16])]
    summed = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        for total, g in zip(summed, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))):
            total += g
    recon = attack.reconstruct(from_gradient(model, summed, 16, SHAPE, 10))
    errors = max_abs_error(recon.images, images[:16])
    assert (errors < 1e-4).sum() >= 10  # the examples alone in their bin, exactly


def test_imprint_breaks_secagg_in_a_federation(tmp_path) -> None:
    run = fedsim.run("scenarios/imprint_secagg.yaml", tmp_path / "run")
    sent = json.loads((tmp_path / "run" / "observations" / "malicious.json").read_text())
    assert sent["attacks"]["imprint"]["rows"] == 128
    scores = run.scores
    assert list(scores["target"]) == ["round_0001_aggregate"]  # SecAgg+: only the aggregate
    exact = sum(p > 60 for p in scores["psnr_per_image"][0])
    assert exact >= 10


def relu_mlp(hidden: list[int]) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = MODELS.get("mlp")
    return cls(cls.Params(hidden=hidden, activation="relu"), SHAPE, 10)


def test_trap_weights_fire_each_row_for_the_calibrated_share(digits) -> None:
    images, _ = digits
    attack = ATTACKS.get("trap_weights")(ATTACKS.get("trap_weights").Params(activation=0.05))
    model = relu_mlp([256])
    record = attack.craft(model, SHAPE, images[1000:])
    first = model.get_submodule(record["layer"])
    assert record["rows"] == 256 and float(first.bias.abs().max()) == 0.0
    firing = (images[:1000].flatten(1) @ first.weight.T > 0).double().mean(0)  # data it was not fitted on
    assert float(firing.mean()) == pytest.approx(0.05, abs=0.01)
    assert float(firing.max()) < 0.15  # every row is a trap, none fires for most examples
    with pytest.raises(UserError, match="non-negative"):
        attack.craft(relu_mlp([256]), SHAPE, images[1000:] - 0.5)


def test_trap_weights_recover_more_of_a_batch_than_the_honest_model(digits) -> None:
    """One client, 16 digits, one gradient: analytic_fc on the honest mlp against the trap."""
    images, labels = digits[0][:16], digits[1][:16]
    found = {}
    for name, params in (("analytic_fc", {}), ("trap_weights", {"activation": 1 / 16})):
        cls = ATTACKS.get(name)
        attack, model = cls(cls.Params(**params)), relu_mlp([256])
        if name == "trap_weights":
            attack.craft(model, SHAPE, digits[0][1000:])
        gradient = torch.autograd.grad(F.cross_entropy(model(images), labels), list(model.parameters()))
        recon = attack.reconstruct(from_gradient(model, list(gradient), 16, SHAPE, 10))
        found[name] = int((max_abs_error(recon.images, images) < 1e-4).sum())
    assert found["trap_weights"] >= 12 and found["trap_weights"] >= found["analytic_fc"] + 6


def test_trap_weights_break_secagg_in_a_federation(tmp_path) -> None:
    attack = "attacks=[{name: trap_weights, activation: 0.03}]"
    run = fedsim.run(fedsim.scenario("scenarios/imprint_secagg.yaml", attack), tmp_path / "run")
    sent = json.loads((tmp_path / "run" / "observations" / "malicious.json").read_text())
    assert sent["attacks"]["trap_weights"]["rows"] == 256
    scores = run.scores
    assert list(scores["target"]) == ["round_0001_aggregate"]
    assert sum(p > 60 for p in scores["psnr_per_image"][0]) >= 10  # of 32 examples, from the sum alone
