"""GMI, "The Secret Revealer" (Zhang et al. 2020): model inversion through a GAN prior.

The attacker trains a GAN (G, D) on public images of *other* classes (`fedsim.attacks.generator`),
then, for target class c, searches the generator's latent space instead of pixel space:

    min_{z in [-1, 1]^m}  L_prior(z) + lambda * L_id(z)
    L_prior = -log sigmoid(D(G(z)))        (realism: the discriminator's verdict)
    L_id    = -log softmax(f(G(z)))_c       (the target model's likelihood of class c)

with lambda = 100 and SGD with momentum as in the paper. (GMI trains a WGAN-GP, whose prior is
-D(G(z)); our DCGAN's discriminator outputs a logit, so its realism term is the non-saturating
-log sigmoid D.) Every class gets `images_per_class` independent latent starts z ~ N(0, I)
clamped to the box (the paper's several seeds), optimised together in one batch, each on its
own objective. The GAN is trained once per run and cached (`prepare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from rich.console import Console
from torch import nn

from fedsim.attacks.generator import Discriminator, Generator, GeneratorParams, train_or_load_generator
from fedsim.attacks.model_inversion import ModelInversionParams, class_likelihood_loss, target_labels
from fedsim.core.attack import ModelAttack, ModelTarget, Reconstruction
from fedsim.core.errors import UserError
from fedsim.core.registry import ATTACKS
from fedsim.core.seeding import derive_seed, torch_generator


class GanPriorAttack(ModelAttack):
    """A model-inversion attack that searches a GAN trained once per run on the public data.

    `prepare` trains (or loads the cached) GAN; subclasses change how through `gan_options`
    (extra arguments of `train_or_load_generator`) and read it back with `networks()`.
    """

    def __init__(self, params: BaseModel, seed: int = 0) -> None:
        super().__init__(params, seed)
        self._gan: tuple[Generator, Discriminator] | None = None

    def gan_options(self, target: ModelTarget) -> dict[str, Any]:
        """Extra keyword arguments of `train_or_load_generator`; default: a DCGAN."""
        return {}

    def prepare(self, target: ModelTarget, workspace: Path, console: Console) -> None:
        """Train (or load the cached) GAN on the target's public images."""
        if len(target.public_x) == 0:
            raise UserError(
                f"attack '{self.name}' needs public images of other classes; "
                "set data.public_classes"
            )
        options = self.gan_options(target)
        generator, discriminator = train_or_load_generator(
            target.public_x,
            self.params.generator,
            workspace,
            derive_seed(self.seed, "gan"),
            console,
            **options,
        )
        outputs = options.get("discriminator_outputs", 1)
        if discriminator is None or discriminator.head.out_features != outputs:
            raise UserError(
                f"attack '{self.name}': generator.path must hold a discriminator with "
                f"{outputs} output(s); its prior needs one"
            )
        self._gan = (generator, discriminator)

    def networks(self) -> tuple[Generator, Discriminator]:
        if self._gan is None:
            raise RuntimeError(f"{type(self).__name__}.prepare must run before reconstruct")
        return self._gan


@ATTACKS.register("gmi")
class Gmi(GanPriorAttack):
    """GMI (Zhang et al. 2020): search a public-data GAN's latent for class likelihood + realism."""

    threat_model = (
        "model holder, white-box, with public images of other classes (trains a GAN on them)"
    )

    class Params(ModelInversionParams):
        generator: GeneratorParams = Field(
            default_factory=GeneratorParams, description="the GAN prior trained on public data"
        )
        iterations: int = Field(1500, ge=1, description="latent optimisation steps (paper: 1500)")
        lr: float = Field(0.02, gt=0, description="SGD learning rate on z (paper: 0.02)")
        momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (paper: 0.9)")
        identity_weight: float = Field(
            100.0, ge=0, description="lambda on the class-likelihood loss (paper: 100)"
        )
        latent_bound: float = Field(1.0, gt=0, description="z is clamped to [-bound, bound]")

    params: Params

    def reconstruct(self, target: ModelTarget) -> Reconstruction:
        generator, discriminator = self.networks()
        p = self.params
        labels = target_labels(target, p.images_per_class)
        rng = torch_generator(self.seed, "gmi", *target.target_classes)
        bound = p.latent_bound
        z = torch.randn(len(labels), generator.latent_dim, generator=rng).clamp(-bound, bound)
        z.requires_grad_()
        optimizer = torch.optim.SGD([z], lr=p.lr, momentum=p.momentum)
        for done in range(1, p.iterations + 1):
            prior, identity = self._losses(target, generator, discriminator, z, labels)
            optimizer.zero_grad()
            (prior + p.identity_weight * identity).sum().backward(inputs=[z])
            optimizer.step()
            with torch.no_grad():
                z.clamp_(-bound, bound)
            self.report_iteration(done, p.iterations)
        with torch.no_grad():
            prior, identity = self._losses(target, generator, discriminator, z, labels)
            images = generator(z)
            confidence = target.model(images).softmax(-1).gather(1, labels[:, None])
        return Reconstruction(
            images=images,
            labels=labels,
            attack_loss=(prior + p.identity_weight * identity).mean().item(),
            details={
                "target_confidence": confidence.mean().item(),
                "prior_loss": prior.mean().item(),
                "identity_loss": identity.mean().item(),
            },
        )

    @staticmethod
    def _losses(
        target: ModelTarget,
        generator: nn.Module,
        discriminator: nn.Module,
        z: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: (realism loss -log sigmoid D(G(z)), identity loss -log p(c | G(z)))."""
        images = generator(z)
        prior = F.softplus(-discriminator(images))
        return prior, class_likelihood_loss(target.model(images), labels)
