"""The plugin seams: what registering checks, the names plugins get, the client hook for actions
and transport mods, and `from_gradient` targets for library users (identity, labels, start)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedsim.attacks.dlg import DLG
from fedsim.attacks.gradient_matching import random_images
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.attacks.targets import from_gradient
from fedsim.core.attack import Attack, GradientAttack, GradientTarget, ModelAttack, Reconstruction
from fedsim.core.membership import MembershipAttack
from fedsim.core.errors import UserError
from fedsim.core.registry import (
    ATTACKS,
    CLIENT_ACTIONS,
    DEFENSES,
    Registry,
    check_attack,
)
from fedsim.defenses.secagg import SecAggPlus
from fedsim.federation import client
from fedsim.federation.secure_aggregation import secaggplus_when_requested

SHAPE = (1, 8, 8)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Loose(BaseModel):
    pass


class Good(GradientAttack):
    """A do-nothing gradient attack."""

    threat_model = "honest-but-curious server"
    Params = Strict

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        return Reconstruction(torch.zeros(1, *target.input_shape), torch.zeros(1), 0.0)


def variant(base: type, **attributes: object) -> type:
    return type("Variant", (base,), attributes)


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (object, "must be a subclass of fedsim.core.attack.Attack"),
        (variant(Attack, threat_model="x", Params=Strict, reconstruct=Good.reconstruct),
         "must subclass fedsim.core.attack.GradientAttack"),
        (variant(Good, threat_model=""), "must state its `threat_model`"),
        (variant(Good, threat_model=None), "must state its `threat_model`"),
        (variant(Good, Params=Loose), "Params must set extra='forbid'"),
        (variant(Good, Params=None), "needs a pydantic `Params` class"),
    ],
)
def test_registering_a_bad_attack_says_what_is_wrong(plugin: type, message: str) -> None:
    with pytest.raises(TypeError, match=f"attack 'bad'.*{message}"):
        ATTACKS.register("bad")(plugin)
    assert "bad" not in ATTACKS.names()


def test_a_good_attack_registers_and_knows_its_name() -> None:
    attacks: Registry[type[Attack]] = Registry("attack", "test", check_attack)
    attacks.register("good")(Good)
    dynamic = variant(Good, threat_model=property(lambda self: "depends on params"))
    attacks.register("dynamic")(dynamic)
    assert attacks.get("good") is Good and Good.registered_name == "good"
    assert Good(Strict()).name == "good"
    assert attacks.get("dynamic")(Strict()).threat_model == "depends on params"


def test_one_class_under_two_names_reports_each_name() -> None:
    attacks: Registry[type[Attack]] = Registry("attack", "test", check_attack)
    first = variant(Good)
    attacks.register("first")(first)
    attacks.register("second")(first)
    second = attacks.get("second")
    assert attacks.get("first") is first and issubclass(second, first)
    assert (first.registered_name, second.registered_name) == ("first", "second")
    assert second(Strict()).name == "second" and second.__doc__ == first.__doc__


def test_built_in_attacks_have_typed_bases_and_their_names() -> None:
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        assert cls.registered_name == name
        assert issubclass(cls, (GradientAttack, ModelAttack, MembershipAttack))
    assert issubclass(ATTACKS.get("mi_face"), ModelAttack) and issubclass(ATTACKS.get("idlg"), GradientAttack)


def test_registering_a_non_defense_fails() -> None:
    with pytest.raises(TypeError, match="defense 'bad' must be a subclass of fedsim.core.defense.Defense"):
        DEFENSES.register("bad")(Good)


def test_client_actions_are_functions_with_identifier_names() -> None:
    assert "diff2" in CLIENT_ACTIONS.names()
    with pytest.raises(TypeError, match="must be a Python identifier"):
        CLIENT_ACTIONS.register("not-an-identifier")(lambda content, call: content)
    with pytest.raises(TypeError, match="must be a function"):
        CLIENT_ACTIONS.register("nothing")(None)


def test_secagg_reaches_the_client_through_the_defense_seam() -> None:
    assert SecAggPlus.transport_mod() is secaggplus_when_requested
    tree = ast.parse(Path(client.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("secure_aggregation" in module or "defenses" in module for module in imported if module)


# ----------------------------------------------------------------------------- from_gradient


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def gradient_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_distinct_targets_get_distinct_starts() -> None:
    model = tiny_model()
    x, y = torch.rand(2, *SHAPE), torch.tensor([3, 5])
    first = from_gradient(model, gradient_of(model, x[:1], y[:1]), 1, SHAPE, 10)
    second = from_gradient(model, gradient_of(model, x[1:], y[1:]), 1, SHAPE, 10)
    again = from_gradient(model, gradient_of(model, x[:1], y[:1]), 1, SHAPE, 10)
    named = from_gradient(model, gradient_of(model, x[:1], y[:1]), 1, SHAPE, 10, client=7)
    assert first.client != second.client and first.client == again.client and named.client == 7
    starts = random_images([first, second, again], 1, 1, seed=0)
    assert not torch.equal(starts[0], starts[1]) and torch.equal(starts[0], starts[2])


def test_known_labels_reach_the_attack() -> None:
    model = tiny_model()
    x, y = torch.rand(2, *SHAPE), torch.tensor([3, 5])
    target = from_gradient(model, gradient_of(model, x, y), 2, SHAPE, 10, known_labels=y)
    attack = InvertingGradients(InvertingGradients.Params(labels="known", iterations=1), seed=0)
    found = attack.reconstruct(target)
    assert found.labels.tolist() == [3, 5] and found.details["labels"] == "known"


def test_a_given_start_is_the_first_restart_and_evaluations_are_counted() -> None:
    model = tiny_model()
    x, y = torch.rand(2, *SHAPE), torch.tensor([3, 5])
    start = torch.full((2, *SHAPE), 0.25)
    target = from_gradient(model, gradient_of(model, x, y), 2, SHAPE, 10, known_labels=y, start=start)
    still = InvertingGradients(InvertingGradients.Params(labels="known", iterations=1, lr=1e-9), seed=0)
    found = still.reconstruct(target)
    assert torch.allclose(found.images, start, atol=1e-6)
    assert found.details["objective_evaluations"] == 2
    dlg = DLG(DLG.Params(labels="known", iterations=3, evaluations_per_step=2), seed=0).reconstruct(target)
    assert (dlg.details["iterations"], dlg.details["objective_evaluations"]) == (3, 6)  # L-BFGS steps x 2
    wrong = from_gradient(model, gradient_of(model, x, y), 2, SHAPE, 10, known_labels=y, start=start[:1])
    with pytest.raises(UserError, match=r"the target's start has shape \(1, 1, 8, 8\); it needs \(2, 1, 8, 8\)"):
        still.reconstruct(wrong)
