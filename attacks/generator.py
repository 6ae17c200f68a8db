"""A small DCGAN learned from public images: the image prior of generative inversion attacks.

`train_or_load_generator(public_x, params, cache_dir, seed, console)` returns a generator
G: z -> image in [0, 1] and a discriminator D: image -> realism logit, both frozen. It trains
them (Radford et al. 2016: transposed-convolution generator with batch norm, strided
convolutional discriminator with leaky ReLU, Adam(2e-4, betas 0.5/0.999)) with the
non-saturating GAN loss

    D: max  E log sigmoid(D(x)) + E log(1 - sigmoid(D(G(z))))
    G: max  E log sigmoid(D(G(z))),        z ~ N(0, I)

and caches the weights in `cache_dir` under a key of (public images, params, seed), so the
second attack on the same run does not train again. `params.path` loads weights from a user
file instead (a safetensors file with `generator.*` and, optionally, `discriminator.*` keys,
as the cache holds them). Nothing here knows any attack: any image attack can use it.

Image sizes: the generator doubles the resolution n times from a small seed map, with n the
largest of 1..3 that leaves a seed of at least 2 pixels a side and divides both sides
(8x8 -> seed 2x2, 28x28 -> 7x7, 32x32 -> 4x4, 64x64 -> 8x8).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from fedsim.core.errors import UserError
from fedsim.core.results import atomic_write_bytes

M = TypeVar("M", bound=nn.Module)

FORMAT_VERSION = 1
"""Bump when the architectures or the training change, so old cache entries are not reused."""


class GeneratorParams(BaseModel):
    """The GAN prior: architecture, training budget, or a file to load it from."""

    model_config = ConfigDict(extra="forbid")

    latent_dim: int = Field(64, ge=1, description="size of the latent vector z")
    width: int = Field(64, ge=4, description="channels of the widest layer of G and D")
    steps: int = Field(3000, ge=1, description="GAN training steps (one D and one G update each)")
    batch_size: int = Field(64, ge=2, description="public images per training step")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of both networks (DCGAN)")
    path: str | None = Field(
        None,
        description="load G (and D) from this safetensors file instead of training; "
        "the keys are generator.* and discriminator.*",
    )


def upsampling_stages(side: int) -> int:
    """How many times the generator doubles the resolution to reach `side` pixels."""
    for n in (3, 2, 1):
        if side % 2**n == 0 and side // 2**n >= 2:
            return n
    return 0


class Generator(nn.Module):
    """z -> Linear -> seed map -> n x (2x transposed conv, batch norm, ReLU) -> sigmoid image."""

    def __init__(self, latent_dim: int, width: int, image_shape: Sequence[int]) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        self.latent_dim = latent_dim
        n = min(upsampling_stages(height), upsampling_stages(width_px))
        self.seed_shape = (width, height // 2**n, width_px // 2**n)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, width * self.seed_shape[1] * self.seed_shape[2]),
            nn.BatchNorm1d(width * self.seed_shape[1] * self.seed_shape[2]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        current = width
        for _ in range(n - 1):
            layers += [
                nn.ConvTranspose2d(current, current // 2, 4, stride=2, padding=1),
                nn.BatchNorm2d(current // 2),
                nn.ReLU(),
            ]
            current //= 2
        last = (
            nn.ConvTranspose2d(current, channels, 4, stride=2, padding=1)
            if n
            else nn.Conv2d(current, channels, 3, padding=1)
        )
        self.body = nn.Sequential(*layers, last, nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, *self.seed_shape))


class Discriminator(nn.Module):
    """image -> n x (stride-2 conv, leaky ReLU) -> features -> linear -> realism logit(s).

    One output by default (a realism logit per image); `outputs=K` gives K class logits, the
    semi-supervised discriminator of KED-MI.
    """

    def __init__(self, width: int, image_shape: Sequence[int], outputs: int = 1) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        n = min(upsampling_stages(height), upsampling_stages(width_px))
        layers: list[nn.Module] = []
        current, out = channels, max(1, width // 2 ** max(n - 1, 0))
        for _ in range(n):
            layers += [nn.Conv2d(current, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            current, out = out, out * 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(current * (height // 2**n) * (width_px // 2**n), outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened features the last layer reads (feature matching uses them)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


TrainFn = Callable[[Generator, Discriminator, torch.Tensor, GeneratorParams, int, Console], None]
"""How a GAN is trained: (G, D, public images, params, seed, console), in place."""


def cache_key(
    public_x: torch.Tensor, params: GeneratorParams, seed: int, extra: bytes = b""
) -> str:
    """A digest of everything the trained GAN depends on: the images, the params, the seed,
    and `extra` (whatever else a custom training reads, e.g. a target model's weights)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, params.model_dump(exclude={"path"}), seed]).encode())
    digest.update(extra)
    digest.update(str(tuple(public_x.shape)).encode())
    digest.update(public_x.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_or_load_generator(
    public_x: torch.Tensor,
    params: GeneratorParams,
    cache_dir: Path,
    seed: int,
    console: Console,
    *,
    discriminator_outputs: int = 1,
    train: TrainFn | None = None,
    key_extra: bytes = b"",
) -> tuple[Generator, Discriminator | None]:
    """(G, D) in eval mode with frozen weights: from `params.path`, the cache, or training.

    D is None only when a user file holds no discriminator. By default D has one realism
    output and training is `train_gan` (DCGAN); an attack with its own GAN objective passes
    `train`, its D's `discriminator_outputs`, and in `key_extra` whatever else `train` reads.
    """
    image_shape = tuple(public_x.shape[1:])
    if len(image_shape) != 3:
        raise UserError(f"generator: needs images (C, H, W), got shape {image_shape}")
    generator = Generator(params.latent_dim, params.width, image_shape)
    discriminator = Discriminator(params.width, image_shape, discriminator_outputs)
    if params.path is not None:
        has_discriminator = _load(Path(params.path), generator, discriminator, "generator.path")
        return _frozen(generator), _frozen(discriminator) if has_discriminator else None

    outputs = b"" if discriminator_outputs == 1 else f"outputs={discriminator_outputs}".encode()
    key = cache_key(public_x, params, seed, key_extra + outputs)
    cache = Path(cache_dir) / f"gan-{key}.safetensors"
    if cache.is_file():
        _load(cache, generator, discriminator, str(cache))
        console.print(f"generator: reusing {cache}")
    else:
        if len(public_x) < 2:
            raise UserError(
                "generator: needs at least 2 auxiliary images to train on; set data.public_classes "
                "or the attack's prior_data"
            )
        (train or train_gan)(generator, discriminator, public_x, params, seed, console)
        state = {f"generator.{k}": v for k, v in generator.state_dict().items()}
        state |= {f"discriminator.{k}": v for k, v in discriminator.state_dict().items()}
        metadata = {"params": params.model_dump_json(), "seed": str(seed)}
        atomic_write_bytes(cache, save({k: v.contiguous() for k, v in state.items()}, metadata))
    return _frozen(generator), _frozen(discriminator)


GanLoss = Callable[[Discriminator, torch.Tensor, torch.Tensor], torch.Tensor]
"""(D, a batch of real images, a batch of generated images) -> a scalar loss."""


def dcgan_discriminator_loss(
    discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """-log sigmoid D(x) - log(1 - sigmoid D(G(z))), batch means."""
    return F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake)).mean()


def dcgan_generator_loss(
    discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """-log sigmoid D(G(z)) (non-saturating), batch mean."""
    return F.softplus(-discriminator(fake)).mean()


def train_gan(
    generator: Generator,
    discriminator: Discriminator,
    public_x: torch.Tensor,
    params: GeneratorParams,
    seed: int,
    console: Console,
    discriminator_loss: GanLoss | None = None,
    generator_loss: GanLoss | None = None,
) -> None:
    """Alternate one D and one G Adam step per batch, seeded end to end, with a progress bar.

    The losses default to DCGAN's non-saturating pair; other GAN objectives pass their own.
    """
    discriminator_loss = discriminator_loss or dcgan_discriminator_loss
    generator_loss = generator_loss or dcgan_generator_loss
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator.apply(_dcgan_init)
        discriminator.apply(_dcgan_init)
    opt_g = torch.optim.Adam(generator.parameters(), lr=params.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=params.lr, betas=(0.5, 0.999))
    generator.train()
    discriminator.train()
    batch = min(params.batch_size, len(public_x))
    columns = (
        TextColumn("training GAN on {task.fields[images]} auxiliary images"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}  D {task.fields[d]:.3f}  G {task.fields[g]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("gan", total=params.steps, images=len(public_x), d=0.0, g=0.0)
        for _ in range(params.steps):
            real = public_x[torch.randint(len(public_x), (batch,), generator=rng)]
            fake = generator(torch.randn(batch, generator.latent_dim, generator=rng))
            loss_d = discriminator_loss(discriminator, real, fake.detach())
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = generator_loss(discriminator, real, fake)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            progress.update(task, advance=1, d=loss_d.item(), g=loss_g.item())
    console.print(
        f"generator: trained {params.steps} steps on {len(public_x)} auxiliary images "
        f"(D loss {loss_d.item():.3f}, G loss {loss_g.item():.3f})"
    )


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's init: conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _load(path: Path, generator: Generator, discriminator: Discriminator, field: str) -> bool:
    """Load G (and D, if present) from a safetensors file; True if D was in it."""
    if not path.is_file():
        raise UserError(f"{field}: '{path}' not found; give a safetensors file of GAN weights")
    try:
        state = load_file(str(path))
    except SafetensorError as err:
        raise UserError(f"{field}: '{path}' is not a safetensors file ({err})") from None
    parts = {
        prefix: {
            k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")
        }
        for prefix in ("generator", "discriminator")
    }
    for name, module in (("generator", generator), ("discriminator", discriminator)):
        if name == "discriminator" and not parts[name]:
            return False
        try:
            module.load_state_dict(parts[name])
        except RuntimeError as err:
            reason = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise UserError(
                f"{field}: the {name} in '{path}' does not fit latent_dim/width and the "
                f"image shape ({reason})"
            ) from None
    return True


def _frozen(module: M) -> M:
    module.eval()
    module.requires_grad_(False)
    return module
