"""A learning-based attack: a network trained on simulated (gradient, input) pairs inverts g.

The server knows the circuit and its weights, so it can simulate as many clients as it
likes: draw inputs x ~ U[0, 1]^F, compute the gradient each would send, and fit a network
from gradient to input (Kumar et al. 2023 discuss such an attacker and argue it is
under-parameterised against an over-parameterised circuit). The trained network then maps
the observed gradient to a guess in one forward pass.

Network input:
- known label y: the gradient G(x; y) itself, simulated with the client's label;
- unknown label (one-output models): the gradient is c * grad f(x) with an unknown scalar
  c = dL/df, so only its line is informative; the input is that line's representative
  s * grad f / ||grad f|| with the sign s fixed by a random reference direction.
Inputs are standardised with the simulated set's mean and std (floored). Output: for a periodic
(Fourier) encoding, (cos 2 pi x_j, sin 2 pi x_j) per feature, decoded with atan2, so the
wrap-around at 1 costs nothing; otherwise x_j through a sigmoid.

The network's error on held-out simulated clients is reported in `details` (it needs no
ground truth), so a study can relate it to the circuit's expressivity and the network's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim.attacks.quantum_matching import QuantumAttack, QuantumAttackParams
from fedsim.attacks.quantum_oracle import QuantumGradientOracle, circular_distance
from fedsim.core.attack import GradientTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import derive_seed

HELD_OUT_FRACTION = 0.2
SIMULATION_CHUNK = 4096
STD_FLOOR = 1e-3
"""Input standardisation divides by at least this fraction of the largest coordinate std."""


def gradient_features(oracle: QuantumGradientOracle, x: Tensor, reference: Tensor) -> Tensor:
    """The network's view of the gradient each input x (N, F) would produce (see module doc)."""
    rows = []
    for part in x.split(SIMULATION_CHUNK):
        if oracle.known_labels is not None:
            rows.append(oracle.gradients(part).detach())
        else:
            rows.append(line_representative(oracle.jacobians(part)[1][:, 0].detach(), reference))
    return torch.cat(rows)


def line_representative(g: Tensor, reference: Tensor) -> Tensor:
    """s g / ||g|| with s = sign(<g, reference>): the same vector for every nonzero multiple of g."""
    sign = torch.sign(g @ reference).unsqueeze(1)
    return sign * g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)


def inversion_network(inputs: int, hidden: Sequence[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers).double()


class InputCode:
    """How the network writes x: (cos, sin) of 2 pi x per feature when periodic, else logits."""

    def __init__(self, periodic: bool) -> None:
        self.periodic = periodic

    def width(self, features: int) -> int:
        return 2 * features if self.periodic else features

    def encode(self, x: Tensor) -> Tensor:
        if self.periodic:
            return torch.cat([torch.cos(2 * math.pi * x), torch.sin(2 * math.pi * x)], dim=1)
        return x

    def decode(self, out: Tensor) -> Tensor:
        if self.periodic:
            cos, sin = out.chunk(2, dim=1)
            return torch.remainder(torch.atan2(sin, cos) / (2 * math.pi), 1.0)
        return torch.sigmoid(out)

    def loss(self, out: Tensor, x: Tensor) -> Tensor:
        if self.periodic:
            return (out - self.encode(x)).square().mean()
        return nn.functional.binary_cross_entropy_with_logits(out, x)

    def error(self, guess: Tensor, x: Tensor) -> Tensor:
        """Mean per-feature distance (circular when periodic)."""
        return (circular_distance(guess, x) if self.periodic else (guess - x).abs()).mean()


@ATTACKS.register("quantum_learned")
class QuantumLearned(QuantumAttack):
    """Learning-based inversion: a network fitted to simulated (gradient, input) pairs."""

    takes_batches = False  # the network maps one example's gradient to its input

    class Params(QuantumAttackParams):
        samples: int = Field(8192, ge=16, description="simulated clients (80% train, 20% held out)")
        hidden: list[int] = Field(
            default_factory=lambda: [256, 256], description="hidden layer widths of the network"
        )
        epochs: int = Field(200, ge=1, description="passes over the simulated training set")
        batch_size: int = Field(256, ge=1, description="mini-batch size")
        lr: float = Field(1e-3, gt=0, description="Adam learning rate")

    params: Params

    def reconstruct(self, target: GradientTarget) -> Reconstruction:
        oracle = self.oracle(target)
        inverter = Inverter.fit(
            oracle,
            self.params,
            self.generator(target),
            derive_seed(self.seed, "network", target.server_round, target.client),
        )
        guess = inverter(oracle.observed)
        result = oracle(guess, create_graph=False)
        return self.reconstruction(
            target,
            oracle,
            guess[0],
            result.labels[0],
            float(result.loss[0]),
            held_out_error=inverter.held_out_error,
            network_parameters=inverter.size,
        )


class Inverter:
    """A network from observed gradients to inputs, fitted on clients simulated by `oracle`."""

    def __init__(
        self,
        network: nn.Sequential,
        code: InputCode,
        mean: Tensor,
        std: Tensor,
        reference: Tensor,
        labelled: bool,
    ) -> None:
        self.network, self.code, self.mean, self.std = network, code, mean, std
        self.reference, self.labelled = reference, labelled
        self.size = sum(w.numel() for w in network.parameters())
        self.held_out_error = float("nan")

    @classmethod
    def fit(
        cls,
        oracle: QuantumGradientOracle,
        p: QuantumLearned.Params,
        generator: torch.Generator,
        seed: int,
    ) -> Inverter:
        """Simulate `p.samples` clients (K = 1 target's weights), hold 20% out, train."""
        if oracle.known_labels is None and oracle.simulator.quantum.circuit.num_outputs != 1:
            raise UserError(
                "quantum_learned: labels unknown needs a one-output circuit (observable tensor_z); set labels: known"
            )
        x = torch.rand(p.samples, oracle.num_features, generator=generator, dtype=torch.float64)
        reference = torch.randn(oracle.observed.shape[1], generator=generator, dtype=torch.float64)
        features = gradient_features(oracle, x, reference)
        # A coordinate that never varies (e.g. a weight the output does not depend on) must
        # not turn float32 noise in the observed gradient into a huge input.
        mean, std = features.mean(0), features.std(0)
        std = std.clamp_min(STD_FLOOR * float(std.max()))
        code = InputCode(oracle.period is not None)
        inputs = (features - mean) / std
        held = int(HELD_OUT_FRACTION * p.samples)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            network = inversion_network(inputs.shape[1], p.hidden, code.width(x.shape[1]))
            optimizer = torch.optim.Adam(network.parameters(), lr=p.lr)
            for _ in range(p.epochs):
                for batch in (held + torch.randperm(len(inputs) - held)).split(p.batch_size):
                    optimizer.zero_grad()
                    code.loss(network(inputs[batch]), x[batch]).backward()
                    optimizer.step()
        inverter = cls(network, code, mean, std, reference, oracle.known_labels is not None)
        inverter.held_out_error = float(
            code.error(inverter.predict_features(features[:held]), x[:held])
        )
        return inverter

    @torch.no_grad()
    def predict_features(self, features: Tensor) -> Tensor:
        return self.code.decode(self.network((features - self.mean) / self.std))

    def __call__(self, observed: Tensor) -> Tensor:
        """Guessed inputs (N, F) for observed gradients (N, d)."""
        features = observed if self.labelled else line_representative(observed, self.reference)
        return self.predict_features(features.double())
