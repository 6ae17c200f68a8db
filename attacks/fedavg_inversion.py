"""FedAvg-update inversion: unroll the client's local training on the dummy data.

A FedAvg client takes T local SGD steps (lr eta, momentum mu, weight decay lambda, FedProx's
proximal weight rho) over its n examples in mini-batches of B and sends the update
Delta = theta_T - theta_0. The attack (Geiping et al. 2020, section 6: "Inverting gradients
... of federated averaging") runs the same T steps on n dummy images, differentiably in the
images:

    v_{t+1} = mu v_t + grad_theta CE(f_{theta_t}(x_b(t)), y_b(t)) + lambda theta_t
              + rho (theta_t - theta_0)
    theta_{t+1} = theta_t - eta v_{t+1}

with torch.func.grad over functional_call inside the vmapped objective, and matches the
simulated theta_T - theta_0 to Delta with Inverting Gradients' cosine distance, TV prior
and signed Adam (`fedsim.attacks.inverting_gradients`).

The batches b(t) cut the dummies into ceil(n / B) slices in a fixed order, cycled epoch after
epoch, as a DataLoader without drop_last does. The client reshuffled every epoch and the
attacker cannot know how, so with n > B later epochs are approximated; with n <= B (every
step on the whole local data, the setting of the paper's FedAvg experiments) the unroll is
exact.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial

from torch import Tensor

from fedsim.attacks.gradient_matching import FunctionalModel, Simulation, Weights
from fedsim.attacks.inverting_gradients import InvertingGradients
from fedsim.core.attack import GradientTarget
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS


def local_schedule(examples: int, batch_size: int, steps: int) -> list[tuple[int, int]]:
    """The (start, stop) slice of the dummy images each local step trains on."""
    batches = [(start, min(start + batch_size, examples)) for start in range(0, examples, batch_size)]
    return [batches[step % len(batches)] for step in range(steps)]


def unrolled_update(
    model: FunctionalModel,
    params: Weights,
    images: Tensor,
    labels: Tensor,
    schedule: list[tuple[int, int]],
    lr: float,
    momentum: float,
    weight_decay: float,
    proximal_mu: float = 0.0,
) -> list[Tensor]:
    """theta_T - theta_0 after the client's SGD steps on (images, labels), as torch.optim.SGD
    computes them (momentum buffer starts at the first gradient, no dampening)."""
    weights = dict(params)
    velocity = {name: 0.0 for name in weights}
    for start, stop in schedule:
        gradient = model.loss_gradient(weights, images[start:stop], labels[start:stop])
        for name, g in gradient.items():
            pull = proximal_mu * (weights[name] - params[name])
            velocity[name] = momentum * velocity[name] + g + weight_decay * weights[name] + pull
        weights = {name: w - lr * velocity[name] for name, w in weights.items()}
    return [weights[name] - params[name] for name in params]


@ATTACKS.register("fedavg_inversion")
class FedAvgInversion(InvertingGradients):
    """FedAvg-update inversion: unroll the client's local SGD steps over the dummies (Geiping et al. 2020).

    Matches the whole update with Inverting Gradients' cosine distance + TV and signed Adam;
    needs the client's optimizer to be SGD (momentum, weight decay and FedProx's proximal
    term are unrolled too).
    """

    def group_key(self, target: GradientTarget) -> Hashable:
        schedule = (
            target.batch_size,
            target.local_steps,
            target.lr,
            target.momentum,
            target.weight_decay,
            target.proximal_mu,
        )
        return (super().group_key(target), schedule)

    def observation(self, targets: list[GradientTarget]) -> tuple[Callable[[GradientTarget], list[Tensor]], Simulation]:
        first = targets[0]
        if first.optimizer != "sgd":
            raise UserError(
                f"attack 'fedavg_inversion' unrolls SGD but the client used optimizer "
                f"'{first.optimizer}'; use attack 'ig' (one-gradient approximation) instead"
            )
        simulate = partial(
            unrolled_update,
            schedule=local_schedule(self.image_count(first), first.batch_size, first.local_steps),
            lr=first.lr,
            momentum=first.momentum,
            weight_decay=first.weight_decay,
            proximal_mu=first.proximal_mu,
        )
        return GradientTarget.parameter_update, simulate
