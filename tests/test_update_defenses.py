"""Update-time defenses against their definitions: noise scale and shape, norm bound,
quantisation error bounds, Flower's LocalDpMod noise and its composed epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedsim.defenses.central_dp import CentralDpAdaptiveClient, CentralDpFixedClient
from fedsim.defenses.clipping import NormClip
from fedsim.defenses.local_dp import LocalDp
from fedsim.defenses.noise import GaussianNoise, LaplaceNoise
from fedsim.defenses.quantisation import Quantize
from fedsim.core.registry import DEFENSES
from fedsim.core.seeding import numpy_global_seed


def update(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": scale * torch.randn(16, 8, 3, 3, generator=g),
        "fc.weight": scale * torch.randn(100, 300, generator=g),
        "fc.bias": scale * torch.randn(100, generator=g) + 3.0,  # a range away from zero
        "steps": torch.tensor([7, 3]),  # integer: passes through every defense
    }


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values() if t.is_floating_point()])


def test_registered() -> None:
    for name, cls in [("gaussian_noise", GaussianNoise), ("laplace_noise", LaplaceNoise),
                      ("norm_clip", NormClip), ("quantize", Quantize), ("local_dp", LocalDp)]:
        assert DEFENSES.get(name) is cls


# --- noise ----------------------------------------------------------------------------------


def noise_of(defense: GaussianNoise | LaplaceNoise, seed: int = 0) -> torch.Tensor:
    original = update()
    noised = defense.transform(original, torch.Generator().manual_seed(seed))
    assert torch.equal(noised["steps"], original["steps"])
    return flat(noised) - flat(original)


def test_gaussian_noise_has_the_requested_std_and_is_gaussian() -> None:
    noise = noise_of(GaussianNoise(GaussianNoise.Params(std=0.1)))  # 31,252 draws
    assert noise.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(noise.mean().item()) < 0.003
    kurtosis = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.15)


def test_laplace_noise_has_scale_b_and_laplace_tails() -> None:
    b = 0.05
    noise = noise_of(LaplaceNoise(LaplaceNoise.Params(scale=b)))
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.02)  # E|X| = b
    assert noise.std().item() == pytest.approx(math.sqrt(2) * b, rel=0.03)
    kurtosis = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert kurtosis.item() == pytest.approx(6.0, abs=0.6)  # Gaussian: 3


def test_noise_is_reproducible_from_the_generator() -> None:
    defense = GaussianNoise(GaussianNoise.Params(std=0.1))
    assert torch.equal(noise_of(defense, 1), noise_of(defense, 1))
    assert not torch.equal(noise_of(defense, 1), noise_of(defense, 2))


# --- norm clipping --------------------------------------------------------------------------


def test_global_norm_clip_bounds_the_whole_update_and_keeps_its_direction() -> None:
    original = update()
    clipped = NormClip(NormClip.Params(max_norm=2.0)).transform(original, torch.Generator())
    assert flat(original).norm() > 10
    assert flat(clipped).norm().item() == pytest.approx(2.0, rel=1e-5)
    ratio = flat(clipped) / flat(original)
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    small = update(scale=1e-4)
    small["fc.bias"] = small["fc.bias"] - 3.0
    unchanged = NormClip(NormClip.Params(max_norm=2.0)).transform(small, torch.Generator())
    assert all(torch.equal(unchanged[k], small[k]) for k in small)


def test_per_tensor_norm_clip_bounds_every_tensor() -> None:
    clipped = NormClip(NormClip.Params(max_norm=0.5, scope="per_tensor")).transform(
        update(), torch.Generator()
    )
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        assert clipped[name].norm().item() == pytest.approx(0.5, rel=1e-5)


# --- quantisation ---------------------------------------------------------------------------


def quantised(method: str, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    result = Quantize(Quantize.Params(method=method)).transform(original, torch.Generator())
    assert torch.equal(result["steps"], original["steps"])
    return result


def test_fp16_error_is_within_half_precision_rounding() -> None:
    original = update()
    original["fc.weight"][0, :4] = torch.tensor([1e-6, -3e-7, 1e5, -7e4])  # subnormal, saturated
    result = quantised("fp16", original)
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        u = original[name].clamp(-65504, 65504)
        bound = torch.maximum(2.0**-11 * u.abs(), torch.tensor(2.0**-25))
        assert ((result[name] - u).abs() <= bound).all()
    assert result["fc.weight"][0, 2] == 65504 and result["fc.weight"][0, 3] == -65504


def test_int8_affine_uses_256_levels_within_half_a_step() -> None:
    original = update()
    result = quantised("int8", original)
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        u = original[name]
        step = (u.max() - u.min()) / 255
        assert (result[name] - u).abs().max() <= step / 2 * (1 + 1e-4)
        assert len(torch.unique(result[name])) <= 256
        assert result[name].min() == pytest.approx(u.min().item())
    constant = {"w": torch.full((5,), 0.3)}
    assert torch.equal(Quantize(Quantize.Params(method="int8")).transform(constant, torch.Generator())["w"], constant["w"])


def test_scaled_sign_keeps_the_l1_norm_and_meets_its_error_identity() -> None:
    original = update()
    result = quantised("sign", original)
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        u, c = original[name], result[name]
        assert len(torch.unique(c)) <= 2  # +- one scale per tensor
        assert c.abs().sum().item() == pytest.approx(u.abs().sum().item(), rel=1e-5)
        error = (c - u).pow(2).sum()
        assert error.item() == pytest.approx((u.pow(2).sum() - u.abs().sum() ** 2 / u.numel()).item(), rel=1e-4)
        assert torch.equal(torch.sign(c), torch.sign(u))


# --- local_dp (Flower's LocalDpMod) ---------------------------------------------------------


@pytest.fixture
def client_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the run/node identity that Flower's runtime sets."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def reply_of(mod: Mod, context: Context, local: torch.Tensor, config: dict | None = None) -> Message:
    """A train message carrying zeros -> a ClientApp replying `local` -> `mod`."""
    sent = ArrayRecord({"w": torch.zeros_like(local)})
    content = RecordDict({"arrays": sent, "config": ConfigRecord(config or {})})
    message = Message(content, 1, MessageType.TRAIN)

    def client_app(msg: Message, _: Context) -> Message:
        content = {"arrays": ArrayRecord({"w": local}), "metrics": MetricRecord({"num-examples": 1})}
        return Message(RecordDict(content), reply_to=msg)

    return mod(message, context, client_app)


def call_mod(defense: LocalDp, context: Context, local: torch.Tensor) -> tuple[torch.Tensor, float]:
    reply = reply_of(defense.client_mod(), context, local)
    return reply.content["arrays"].to_torch_state_dict()["w"], reply.content["metrics"]["local_dp_epsilon"]


def test_local_dp_mod_clips_then_adds_the_calibrated_noise(client_identity: None) -> None:
    C, epsilon, delta = 0.5, 2.0, 1e-5
    defense = LocalDp(LocalDp.Params(clipping_norm=C, epsilon=epsilon, delta=delta))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    local = torch.zeros(200_000)
    local[0] = 10.0  # norm 10: clipped to C along the first axis
    with numpy_global_seed(0):
        sent, _ = call_mod(defense, context, local)
    std = 2 * C * math.sqrt(2 * math.log(1.25 / delta)) / epsilon  # sensitivity 2C by default
    assert defense.noise_std == pytest.approx(std)
    noise = sent[1:].double()
    assert noise.std().item() == pytest.approx(std, rel=0.01)
    assert abs(noise.mean().item()) < 0.01 * std
    assert abs(sent[0].item() - C) < 5 * std  # the clipped coordinate, plus one noise draw


def test_local_dp_epsilon_composes_over_the_clients_releases(client_identity: None) -> None:
    defense = LocalDp(LocalDp.Params(clipping_norm=1.0, epsilon=1.0, delta=1e-5))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    z = math.sqrt(2 * math.log(1.25 / 1e-5))  # std / sensitivity
    orders = RDPAccountant.DEFAULT_ALPHAS
    for releases in (1, 2, 3):
        _, reported = call_mod(defense, context, torch.ones(10))
        rdp = [releases * a / (2 * z**2) for a in orders]  # k Gaussian mechanisms, closed form
        assert reported == pytest.approx(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-9)
    assert int(context.state["fedsim.local_dp"]["releases"]) == 3


def test_client_mods_tolerate_an_all_zero_update(client_identity: None) -> None:
    """Flower 1.41 divides by the update's norm; a client whose weights come back unchanged
    must get through every clipping mod (as not clipped)."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    zero = torch.zeros(10)
    for mod in (CentralDpFixedClient.mod, CentralDpAdaptiveClient.mod):
        reply = reply_of(mod, context, zero, {"clipping_norm": 0.5})
        assert not reply.has_error()
        assert torch.equal(reply.content["arrays"].to_torch_state_dict()["w"], zero)
    assert reply.content["metrics"]["norm_bit"] == 0
    local_dp = LocalDp(LocalDp.Params(clipping_norm=1.0, epsilon=1.0))
    sent, _ = call_mod(local_dp, context, zero)
    assert sent.abs().max() > 0  # noise only


def test_numpy_global_seed_repeats_draws_and_restores_the_outer_stream() -> None:
    np.random.seed(5)
    expected_outer = np.random.normal(size=3)
    np.random.seed(5)
    with numpy_global_seed(0, "a"):
        first = np.random.normal(size=3)
    outer = np.random.normal(size=3)
    with numpy_global_seed(0, "a"):
        again = np.random.normal(size=3)
    assert np.array_equal(first, again)
    assert np.array_equal(outer, expected_outer)
