"""Sample-level DP-SGD with Opacus, with an epsilon that composes over every round.

Opacus clips each example's gradient to `max_grad_norm` (C), adds Gaussian noise of std
`noise_multiplier * C` to the summed batch gradient and divides by the expected batch size.

Two traps (shared/PAPERS.md, "Federated learning and DP"):

1. Flower's own Opacus example builds a new PrivacyEngine every round, so the epsilon it reports
   is per round. Here the accountant's history — a list of `[noise_multiplier, sample_rate,
   steps]` entries — lives in the client's `state["dp_sgd_history"]`: `prepare` loads it into
   the fresh engine's accountant and `finish` stores it back, so the reported epsilon covers
   every round this client trained in.
2. For some layers (a PennyLane `TorchLayer`) Opacus silently returns all-zero per-sample
   gradients, and DP-SGD trains on noise only. `prepare` checks, on a few examples, that the
   per-sample gradients add up to the ordinary batch gradient, and refuses the model if not.

Ghost clipping (`grad_sample_mode: ghost`) is refused: Opacus implements it by wrapping the
loss criterion and running two backward passes inside `loss.backward()`, and fedsim's training
loop computes the task loss itself; the other three modes compute the same clipped gradients.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import AbstractGradSampleModule
from opacus.validators import ModuleValidator
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader

from fedsim.defense import LocalTraining, TrainTimeDefense
from fedsim.errors import UserError
from fedsim.registry import DEFENSES

HISTORY_KEY = "dp_sgd_history"
PROBE_EXAMPLES = 4


@DEFENSES.register("dp_sgd")
class DpSgd(TrainTimeDefense):
    """Sample-level DP-SGD (Opacus); each client's epsilon composes over all its rounds."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        noise_multiplier: float | None = Field(
            1.0, ge=0, description="noise std / max_grad_norm (0: clipping only, epsilon inf)"
        )
        target_epsilon: float | None = Field(
            None,
            gt=0,
            description="instead of noise_multiplier: the noise that reaches this epsilon "
            "after total_rounds rounds of local training",
        )
        max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient norm bound C")
        delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported epsilon")
        accountant: Literal["rdp", "prv", "gdp"] = Field("rdp", description="Opacus accountant")
        poisson_sampling: bool = Field(
            True,
            description="Poisson-sampled batches, as the accountant assumes (False: the "
            "loader's own batches, an approximation)",
        )
        grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost"] = Field(
            "hooks", description="how Opacus computes per-example gradients (ghost: refused)"
        )
        secure_mode: bool = Field(
            False, description="cryptographically secure noise (needs torchcsprng)"
        )

        @model_validator(mode="after")
        def _one_noise_source(self) -> DpSgd.Params:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("set exactly one of noise_multiplier and target_epsilon")
            return self

        @field_validator("grad_sample_mode")
        @classmethod
        def _no_ghost(cls, mode: str) -> str:
            if mode == "ghost":
                raise ValueError(
                    "ghost clipping needs Opacus's wrapped loss criterion, which fedsim's "
                    "training loop does not use; use hooks, functorch or ew"
                )
            return mode

    params: Params
    # The engine and wrapped model of the client being trained, between prepare and finish.
    _engine: PrivacyEngine | None = None
    _model: AbstractGradSampleModule | None = None

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        training: LocalTraining,
        state: dict[str, Any],
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap for DP-SGD, continuing the accountant history kept in `state`."""
        _refuse_unsupported_layers(model)
        p = self.params
        sample_rate = 1 / len(loader)  # what Opacus's accountant records for this loader
        try:
            engine = PrivacyEngine(accountant=p.accountant, secure_mode=p.secure_mode)
        except ImportError as err:
            raise UserError(f"dp_sgd.secure_mode: {err}") from None
        engine.accountant.history = [tuple(entry) for entry in state.get(HISTORY_KEY, [])]
        probe = _probe_inputs(loader).to(next(model.parameters()).device)
        expected = _batch_gradients(model, probe)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self._noise_multiplier(sample_rate, len(loader), training),
            max_grad_norm=p.max_grad_norm,
            poisson_sampling=p.poisson_sampling,
            grad_sample_mode=p.grad_sample_mode,
            noise_generator=None if p.secure_mode else _noise_generator(loader, probe.device),
        )
        _check_per_sample_gradients(private_model, private_optimizer, probe, expected)
        self._engine, self._model = engine, private_model
        return private_model, private_optimizer, private_loader

    def finish(self, state: dict[str, Any]) -> dict[str, float]:
        """Store the accountant history in `state`, detach Opacus, report the epsilon so far."""
        accountant = self._engine.accountant
        state[HISTORY_KEY] = [list(entry) for entry in accountant.history]
        self._model.cleanup()  # removes Opacus's hooks, so the plain model can be wrapped again
        self._engine = self._model = None
        return {"epsilon": float(accountant.get_epsilon(delta=self.params.delta))}

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model._module if isinstance(model, AbstractGradSampleModule) else model

    def _noise_multiplier(
        self, sample_rate: float, batches_per_epoch: int, training: LocalTraining
    ) -> float:
        """The fixed noise multiplier, or the one that spends `target_epsilon` over the run.

        The plan is `total_rounds` rounds of `local_steps` steps (or `local_epochs` epochs),
        so a client that trains in fewer rounds ends below the target.
        """
        p = self.params
        if p.target_epsilon is None:
            return p.noise_multiplier
        steps_per_round = training.local_steps or training.local_epochs * batches_per_epoch
        return get_noise_multiplier(
            target_epsilon=p.target_epsilon,
            target_delta=p.delta,
            sample_rate=sample_rate,
            steps=training.total_rounds * steps_per_round,
            accountant=p.accountant,
        )


def _refuse_unsupported_layers(model: nn.Module) -> None:
    """A one-line UserError naming the layers Opacus cannot train privately (e.g. BatchNorm)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = sorted({str(error).split(". ")[0].strip() for error in errors})
        raise UserError(
            f"dp_sgd: {'; '.join(reasons)}. Fix: choose privacy-safe layers in the model's "
            "params, e.g. `norm: group` instead of batch norm"
        )


def _noise_generator(loader: DataLoader, device: torch.device) -> torch.Generator | None:
    """A noise stream as reproducible as the batches: seeded by a draw from the loader's RNG.

    Not from `LocalTraining.seed`: that is the scenario's seed, the same for every client and
    round, and noise repeated across updates cancels in their differences. A loader without a
    generator gets None (Opacus then draws from the global RNG).
    """
    if loader.generator is None:
        return None
    seed = int(torch.randint(2**62, (), generator=loader.generator))
    return torch.Generator(device=device).manual_seed(seed)


def _probe_inputs(loader: DataLoader) -> torch.Tensor:
    """The inputs of the first few examples, collated without touching the loader's RNG."""
    dataset = loader.dataset
    examples = [dataset[i] for i in range(min(PROBE_EXAMPLES, len(dataset)))]
    return loader.collate_fn(examples)[0]


def _batch_gradients(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `model(inputs).sum()`, under a fixed seed so random layers repeat."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(torch.autograd.grad(model(inputs).sum(), params, materialize_grads=True))


def _check_per_sample_gradients(
    model: AbstractGradSampleModule,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    expected: list[torch.Tensor],
) -> None:
    """Refuse the model if Opacus's per-sample gradients do not add up to the batch gradient.

    The check is loss-independent (it differentiates the sum of the outputs), and uses the
    same seed as `_batch_gradients`, so dropout-like layers draw the same randomness.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model(inputs).sum().backward()
    named = [(name, p) for name, p in model._module.named_parameters() if p.requires_grad]
    # Opacus scales per-sample gradients by the batch size for a mean-reduced loss.
    wrong = [
        name
        for (name, p), want in zip(named, expected, strict=True)
        if getattr(p, "grad_sample", None) is None
        or not torch.allclose(
            p.grad_sample.sum(0) / len(inputs), want, rtol=1e-3, atol=1e-5 * want.abs().max()
        )
    ]
    optimizer.zero_grad(set_to_none=True)
    if wrong:
        raise UserError(
            f"dp_sgd: Opacus computes wrong per-example gradients for {', '.join(wrong)} "
            "(a known case: PennyLane TorchLayer), so DP-SGD would be silently wrong; use a "
            "classical model or central DP (central_dp_fixed)"
        )
