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
   per-sample gradients add up to the ordinary batch gradient (ghost mode: that its per-sample
   gradient norms equal those of checked per-sample gradients), and refuses the model if not.

Modes (`grad_sample_mode`) compute the same clipped gradient in different ways: `hooks`,
`functorch` and `ew` materialise per-example gradients; `ghost` (ghost clipping) only their
norms, then takes a second backward pass over the loss re-weighted by the clipping factors.
The default, `auto`, picks one by layer types (`resolve_mode`): ghost when every trainable
layer is nn.Linear, else hooks. Ghost clipping lives in Opacus's loss wrapper, which the training loop uses through the
`criterion` hook. `max_physical_batch_size` splits each (logical, Poisson-sampled) batch into
physical batches with Opacus's BatchMemoryManager: the same step and the same epsilon, in
bounded memory.

Layers Opacus cannot train privately (BatchNorm) are refused with their names, or, with
`fix_modules: true`, replaced by Opacus's `ModuleValidator.fix` (BatchNorm -> GroupNorm) in the
model every party builds, so the server, the clients and the attacks agree on the architecture.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import ExitStack
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader

from fedsim.core.defense import LocalTraining, PrivacyUnit, PrivateSteps, TrainTimeDefense
from fedsim.core.errors import UserError
from fedsim.core.registry import DEFENSES
from fedsim.core.seeding import derive_seed

if TYPE_CHECKING:  # Opacus is imported where it is used: validating a scenario needs only Params
    from opacus import PrivacyEngine
    from opacus.grad_sample import AbstractGradSampleModule

HISTORY_KEY = "dp_sgd_history"
PROBE_EXAMPLES = 4

log = logging.getLogger("fedsim")
_reported_fixes: set[str] = set()


class _ExplainEmptyBatches(logging.Filter):
    """Opacus warns "First batch is empty" whenever a Poisson-sampled batch holds no example,
    which is likely at batch size 1 (probability (1 - 1/n)^n, about 37%). That is DP-SGD as
    analysed (the step adds noise only), so the warnings become one explanation per process."""

    explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("First batch is empty"):
            return True
        if not self.explained:
            self.explained = True
            log.warning(
                "dp_sgd: a Poisson-sampled batch came out empty (likely at small batch sizes); "
                "its step adds noise only, as the privacy analysis assumes. An observed client "
                "whose every batch was empty trained on no examples: attacks skip it and its "
                "scores stay blank"
            )
        return False


logging.getLogger("opacus.data_loader").addFilter(_ExplainEmptyBatches())


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
        accountant: Literal["prv", "rdp"] = Field(
            "prv",
            description="Opacus accountant: prv (tight upper bound, within ~1% of PLD) or rdp "
            "(looser, up to ~2x)",
        )
        poisson_sampling: bool = Field(
            True, description="Poisson-sampled batches, the only sampling the accountant analyses"
        )
        grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost"] = Field(
            "auto",
            description="how Opacus computes per-example gradients (ghost: ghost clipping, "
            "norms only, two backward passes; auto: ghost when every trainable layer is "
            "nn.Linear, else hooks)",
        )
        max_physical_batch_size: int | None = Field(
            None,
            ge=1,
            description="split each logical batch into physical batches of at most this "
            "size (Opacus BatchMemoryManager); null: no split",
        )
        fix_modules: bool = Field(
            False,
            description="replace layers Opacus cannot train (BatchNorm -> GroupNorm) with "
            "ModuleValidator.fix in every party's model, instead of refusing them",
        )
        secure_mode: bool = Field(
            False, description="cryptographically secure noise (needs torchcsprng)"
        )

        @field_validator("accountant", mode="before")
        @classmethod
        def _no_gdp(cls, value: Any) -> Any:
            if value == "gdp":
                raise ValueError(
                    "gdp is not offered: Opacus's GDP accountant is a CLT approximation that "
                    "can under-report epsilon by 12-60%; use prv (the default) or rdp"
                )
            return value

        @field_validator("poisson_sampling")
        @classmethod
        def _poisson_only(cls, value: bool) -> bool:
            if not value:
                raise ValueError(
                    "poisson_sampling: false is refused: the epsilon is proven only for "
                    "Poisson-sampled batches; set poisson_sampling: true"
                )
            return value

        @model_validator(mode="before")
        @classmethod
        def _target_replaces_noise(cls, value: Any) -> Any:
            """`{target_epsilon: 8}` alone means 'derive the noise', not 'also noise 1.0'."""
            if isinstance(value, dict) and value.get("target_epsilon") is not None:
                return {"noise_multiplier": None, **value}
            return value

        @model_validator(mode="after")
        def _one_noise_source(self) -> DpSgd.Params:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("set exactly one of noise_multiplier and target_epsilon")
            return self

    params: Params
    takes_gradient_canaries = True  # `_add_gradient_canaries`
    # The engine, wrapped model and optimizer of the client being trained, and the
    # BatchMemoryManager it trains under, between prepare and finish.
    _engine: PrivacyEngine | None = None
    _model: AbstractGradSampleModule | None = None
    _optimizer: torch.optim.Optimizer | None = None
    _memory: ExitStack | None = None
    _mode: str = "hooks"  # the grad_sample_mode in use: the configured one, or auto's choice

    def privacy_unit(self) -> PrivacyUnit:
        """One example of a client, add/remove: Opacus's accountants analyse the Poisson-
        subsampled Gaussian under adding or removing one example. The epsilon's sample rate
        is 1 / (batches per epoch), a function of the client's example count n."""
        p = self.params
        not_covered = "n through the batch count ceil(n / batch_size) behind epsilon's sample rate"
        return PrivacyUnit("example", "add/remove", p.delta, p.accountant, "epsilon", not_covered)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """With `fix_modules`, Opacus's fix of the model (BatchNorm -> GroupNorm), said once."""
        from opacus.validators import ModuleValidator

        if not self.params.fix_modules or not _unsupported_layers(model):
            return model
        fixed = ModuleValidator.fix(model)
        before = dict(model.named_modules())
        changes = ", ".join(
            f"{name} ({type(before[name]).__name__} -> {type(module).__name__})"
            for name, module in fixed.named_modules()
            if name in before and type(module) is not type(before[name])
        )
        if changes not in _reported_fixes:
            _reported_fixes.add(changes)
            log.warning(
                "dp_sgd.fix_modules: Opacus replaced %s; the server, clients and attacks all "
                "use the fixed model",
                changes,
            )
        return fixed

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        training: LocalTraining,
        state: dict[str, Any],
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap for DP-SGD, continuing the accountant history kept in `state`."""
        from opacus import GradSampleModule, PrivacyEngine
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        _refuse_unsupported_layers(model)
        p = self.params
        # Opacus's DPDataLoader samples each example with probability 1 / len(loader) and its
        # accountant records that same rate, so the accounted rate is the one really used.
        sample_rate = 1 / len(loader)
        _warn_large_delta(p.delta, len(loader.dataset))
        try:
            engine = PrivacyEngine(accountant=p.accountant, secure_mode=p.secure_mode)
        except ImportError as err:
            raise UserError(f"dp_sgd.secure_mode: {err}") from None
        engine.accountant.history = stored_history(state)
        probe = _probe_inputs(loader).to(next(model.parameters()).device)
        expected = _batch_gradients(model, probe)
        self._mode = resolve_mode(p.grad_sample_mode, model)
        if self._mode == "ghost":  # ghost has no per-sample gradients to check
            reference = GradSampleModule(model, loss_reduction="mean")  # hooks mode
            try:
                norms = _check_per_sample_gradients(reference, probe, expected)
            finally:
                reference.cleanup()
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self._noise_multiplier(sample_rate, len(loader), training),
            max_grad_norm=p.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=self._mode,
            noise_generator=None if p.secure_mode else _noise_generator(loader, probe.device),
        )
        private_model, private_optimizer, private_loader = private[0], private[1], private[-1]
        if self._mode == "ghost":
            _check_ghost_norms(private_model, probe, norms)
        else:
            _check_per_sample_gradients(private_model, probe, expected)
        if training.gradient_canaries:
            _add_gradient_canaries(private_optimizer, model, training, p.max_grad_norm, sample_rate)
        self._memory = ExitStack()
        if p.max_physical_batch_size is not None:
            private_loader = self._memory.enter_context(
                BatchMemoryManager(
                    data_loader=private_loader,
                    max_physical_batch_size=p.max_physical_batch_size,
                    optimizer=private_optimizer,
                )
            )
        self._engine, self._model, self._optimizer = engine, private_model, private_optimizer
        return private_model, private_optimizer, private_loader

    def criterion(self, loss_fn: nn.Module) -> Any:
        """Ghost mode: Opacus's loss wrapper, whose `backward()` takes both passes."""
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        if self._mode != "ghost":
            return loss_fn
        return DPLossFastGradientClipping(self._model, self._optimizer, loss_fn, "mean")

    def finish(self, state: dict[str, Any]) -> dict[str, float]:
        """Store the accountant history in `state`, detach Opacus, report the epsilon so far."""
        report = self._store_history(state, self._engine.accountant.history)
        self._memory.close()
        self._model.cleanup()  # removes Opacus's hooks, so the plain model can be wrapped again
        self._engine = self._model = self._optimizer = self._memory = None
        return report

    def _store_history(self, state: dict[str, Any], history: list[tuple[float, float, int]]) -> dict[str, float]:
        """Keep the accountant `history` in the client's `state`; the epsilon so far."""
        state[HISTORY_KEY] = [list(entry) for entry in history]
        return {"epsilon": history_epsilon(state[HISTORY_KEY], self.params.accountant, self.params.delta)}

    def unwrap(self, model: nn.Module) -> nn.Module:
        from opacus.grad_sample import AbstractGradSampleModule

        return model._module if isinstance(model, AbstractGradSampleModule) else model

    def vectorized_refusal(self) -> str | None:
        """The vectorised engine computes exact per-example gradients with torch.func for any
        plain torch model (so every `grad_sample_mode` gives the same steps there); only
        secure_mode's cryptographic noise needs Opacus."""
        if self.params.secure_mode:
            return "dp_sgd.secure_mode draws its noise from Opacus's secure generator"
        return None

    def private_steps(
        self, training: LocalTraining, generator: torch.Generator, device: torch.device
    ) -> PrivateSteps:
        """Opacus's steps without Opacus, drawn from `generator` in `prepare`'s order: the
        noise seed (`_noise_generator`), then per pass the DataLoader's base seed and one
        Poisson mask per batch (Opacus's UniformWithReplacementSampler), so the batches, the
        noise and the accountant history equal the inline engine's."""
        from opacus.accountants import create_accountant

        p, n = self.params, training.num_examples
        batches_per_epoch = -(-n // training.batch_size)  # len(loader)
        sample_rate = 1 / batches_per_epoch
        _warn_large_delta(p.delta, n)
        noise = _noise_stream(generator, device)
        total = training.local_steps or training.local_epochs * batches_per_epoch
        batches: list[torch.Tensor] = []
        while len(batches) < total:
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            for _ in range(min(batches_per_epoch, total - len(batches))):
                batches.append((torch.rand(n, generator=generator) < sample_rate).nonzero().reshape(-1))
        noise_multiplier = self._noise_multiplier(sample_rate, batches_per_epoch, training)

        def record(state: dict[str, Any]) -> dict[str, float]:
            accountant = create_accountant(p.accountant)
            accountant.history = stored_history(state)
            for _ in batches:
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            return self._store_history(state, accountant.history)

        expected_batch_size = int(n * sample_rate)  # as Opacus's make_private computes it
        return PrivateSteps(batches, p.max_grad_norm, noise_multiplier, expected_batch_size, noise, record)

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
        return calibrated_noise(
            p.target_epsilon, p.delta, sample_rate, training.total_rounds * steps_per_round, p.accountant
        )


def _add_gradient_canaries(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    training: LocalTraining,
    max_grad_norm: float,
    sample_rate: float,
) -> None:
    """Add the client's Dirac gradient canaries (`fedsim.data.canaries`) to the clipped sum just
    before Opacus adds the noise, in either mode: each is a per-example gradient of norm C on
    one coordinate, sampled into each step with the examples' rate, as a real example's
    clipped gradient would be; so the accountant's epsilon covers each canary too."""
    params = list(model.parameters())
    if not all(q.requires_grad for q in params):
        raise UserError("data.canaries.kind: gradient canaries need every model parameter trainable")
    sizes = [q.numel() for q in params]
    coordinates = torch.tensor(training.gradient_canaries, device=params[0].device)
    draws = torch.Generator().manual_seed(derive_seed(training.seed, "gradient-canaries"))
    add_noise = optimizer.add_noise

    def add_canaries_then_noise() -> None:
        sampled = torch.rand(len(coordinates), generator=draws) < sample_rate
        spikes = torch.zeros(sum(sizes), device=coordinates.device)
        spikes[coordinates[sampled.to(coordinates.device)]] = max_grad_norm
        for q, part in zip(params, spikes.split(sizes), strict=True):
            q.summed_grad.add_(part.view_as(q.summed_grad))
        add_noise()

    optimizer.add_noise = add_canaries_then_noise


_reported_modes: set[tuple[str, str]] = set()


def resolve_mode(mode: str, model: nn.Module) -> str:
    """`auto`'s choice of Opacus mode, by layer types, said once per model class.

    Measured (benchmarks/dp_overhead.py): per-example gradients of a wide nn.Linear are large
    (hooks 65x the non-private step for an MLP [512, 256] on 3x32x32), while ghost clipping
    needs only their norms, ||a_i|| * ||g_i|| (2.7x); for convolutions ghost's second backward
    costs more than it saves (hooks 1.8x, ghost 2.6x). So: ghost when every trainable layer is
    nn.Linear, else hooks. Both clip each example exactly; only the speed differs.
    """
    if mode != "auto":
        return mode
    from opacus.utils.module_utils import trainable_modules

    layers = [type(module) for _, module in trainable_modules(model)]
    chosen = "ghost" if layers and all(layer is nn.Linear for layer in layers) else "hooks"
    key = (type(model).__name__, chosen)
    if key not in _reported_modes:
        _reported_modes.add(key)
        log.info(
            "dp_sgd.grad_sample_mode: auto chose %s for %s (%s)",
            chosen,
            key[0],
            "every trainable layer is nn.Linear" if chosen == "ghost" else "non-Linear layers",
        )
    return chosen


@lru_cache(maxsize=256)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's noise multiplier that spends `target_epsilon` in `steps` steps, computed once per
    plan and process: the search calls the accountant dozens of times (seconds per client and
    round otherwise), and its answer depends on these public numbers only."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )


def stored_history(state: dict[str, Any]) -> list[tuple[float, float, int]]:
    """The accountant history a client's `state` keeps (empty before its first round)."""
    return [tuple(entry) for entry in state.get(HISTORY_KEY, [])]


def history_epsilon(history: list[list[float]], accountant: str, delta: float) -> float:
    """The epsilon of an accountant history (`[noise_multiplier, sample_rate, steps]` entries).

    PRV's `get_epsilon` returns the upper end of its error interval (eps_error 0.01), so both
    choices are upper bounds on the true epsilon. Cached per history: a call costs 0.1-0.5 s of
    accountant arithmetic (most of a DP-SGD round's time for small clients, see docs/scale.md),
    and clients with equal example counts share their history.
    """
    return _history_epsilon(tuple(tuple(entry) for entry in history), accountant, delta)


@lru_cache(maxsize=4096)
def _history_epsilon(history: tuple[tuple[float, float, int], ...], accountant: str, delta: float) -> float:
    if not history:
        return 0.0
    if any(noise_multiplier == 0 for noise_multiplier, _, _ in history):
        return math.inf  # clipping only: no epsilon (PRV cannot even represent the case)
    from opacus.accountants import create_accountant

    engine_accountant = create_accountant(accountant)
    engine_accountant.history = list(history)
    return float(engine_accountant.get_epsilon(delta=delta))


_warned_deltas: set[tuple[float, int]] = set()


def _warn_large_delta(delta: float, examples: int) -> None:
    """Warn, once per (delta, n), when delta >= 1/n: such a delta allows leaking one example."""
    if delta >= 1 / examples and (delta, examples) not in _warned_deltas:
        _warned_deltas.add((delta, examples))
        log.warning(
            "dp_sgd.delta: %g >= 1/n for a client with n = %d training examples, so the "
            "guarantee allows releasing an example outright; set delta below %g",
            delta,
            examples,
            1 / examples,
        )


def _unsupported_layers(model: nn.Module) -> dict[str, list[str]]:
    """Opacus's reason -> the names of the layers it refuses for that reason."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    if "fedsim.models.quantum" in sys.modules:  # the model may hold QuantumLayers: teach Opacus
        from fedsim.defenses import quantum_grad_sampler  # noqa: F401  (registers their sampler)
    found: dict[str, list[str]] = {}
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator else []
        if errors:
            found.setdefault(str(errors[0]).split(". ")[0].strip(), []).append(
                f"'{name}' ({type(module).__name__})"
            )
    return found


def _refuse_unsupported_layers(model: nn.Module, shown: int = 3) -> None:
    """A one-line UserError naming the layers Opacus cannot train privately (e.g. BatchNorm)."""
    found = _unsupported_layers(model)
    if found:
        problems = "; ".join(
            f"{reason}: layer {', '.join(names[:shown])}"
            + (f" and {len(names) - shown} more" if len(names) > shown else "")
            for reason, names in found.items()
        )
        raise UserError(
            f"dp_sgd: {problems}. Fix: set `fix_modules: true` on dp_sgd (BatchNorm -> "
            "GroupNorm), or choose privacy-safe layers in the model's params, e.g. `norm: group`"
        )


def _noise_generator(loader: DataLoader, device: torch.device) -> torch.Generator | None:
    """A noise stream as reproducible, and as secret, as the batches: seeded by a draw from
    the loader's RNG, which the client seeds from its node secret (see `fedsim.core.seeding`), so
    the server can neither replay the noise nor see it repeat across clients and rounds. A
    loader without a generator gets None (Opacus then draws from the global RNG).
    """
    return None if loader.generator is None else _noise_stream(loader.generator, device)


def _noise_stream(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by one draw from the client's batch `generator`."""
    seed = int(torch.randint(2**62, (), generator=generator))
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


def _probe_backward(model: AbstractGradSampleModule, inputs: torch.Tensor) -> None:
    """Backward of `model(inputs).sum()` under the seed `_batch_gradients` uses; a model this
    mode cannot differentiate (e.g. `ew` on a quantum layer) is refused."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            model(inputs).sum().backward()
        except RuntimeError as err:
            raise UserError(
                "dp_sgd.grad_sample_mode: Opacus cannot compute this model's per-example "
                f"gradients in this mode ({str(err).splitlines()[0]}); use hooks"
            ) from None


def _clear_gradients(model: AbstractGradSampleModule) -> None:
    for p in model._module.parameters():
        p.grad = None
        p.grad_sample = None


def _check_per_sample_gradients(
    model: AbstractGradSampleModule, inputs: torch.Tensor, expected: list[torch.Tensor]
) -> torch.Tensor:
    """Refuse the model if Opacus's per-sample gradients do not add up to the batch gradient.

    The check is loss-independent (it differentiates the sum of the outputs), and uses the
    same seed as `_batch_gradients`, so dropout-like layers draw the same randomness.
    Returns the per-sample gradient norms (of the whole parameter vector).
    """
    _probe_backward(model, inputs)
    named = [(name, p) for name, p in model._module.named_parameters() if p.requires_grad]
    scale = max(float(want.abs().max()) for want in expected)
    # Opacus scales per-sample gradients by the batch size for a mean-reduced loss.
    wrong = [
        name
        for (name, p), want in zip(named, expected, strict=True)
        if getattr(p, "grad_sample", None) is None
        or not torch.allclose(
            p.grad_sample.sum(0) / len(inputs), want, rtol=1e-3, atol=1e-5 * scale
        )
    ]
    if wrong:
        raise UserError(
            f"dp_sgd: Opacus computes wrong per-example gradients for {', '.join(wrong)} "
            "(a known case: PennyLane TorchLayer), so DP-SGD would be silently wrong; use a "
            "classical model or central DP (central_dp_fixed)"
        )
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for _, p in named]).norm(dim=0)
    _clear_gradients(model)
    return norms


def _check_ghost_norms(
    model: AbstractGradSampleModule, inputs: torch.Tensor, expected: torch.Tensor
) -> None:
    """Refuse the model if ghost clipping's per-sample norms differ from the checked ones."""
    _probe_backward(model, inputs)
    norms = model.get_norm_sample()
    _clear_gradients(model)
    if not torch.allclose(norms, expected, rtol=1e-3, atol=1e-6 * float(expected.max())):
        raise UserError(
            "dp_sgd: ghost clipping computes wrong per-example gradient norms for this model "
            "(some layer has no ghost-norm rule), so its clipping would be wrong; use "
            "grad_sample_mode: hooks"
        )
