"""Time per local training step with and without DP-SGD, per Opacus mode and model.

A step is what fedsim's client loop does per batch: forward, loss, backward, optimizer step,
with DP-SGD applied exactly as in a run (`fedsim.defenses.dp_sgd.DpSgd.prepare` and its `criterion`
hook). Batches are Poisson-sampled, as DP-SGD requires (their size varies around the batch
size); the median over the timed steps is reported, and each DP mode's ratio to the
non-private step. One torch thread, as fedsim's clients use by default. On CPU the time is the
process's CPU time (`time.process_time`), which other processes on a shared machine do not
inflate; on CUDA it is wall time after a synchronise.

`--cohort K` adds the vectorised engine (`engine: vectorized`): K clients' steps as one
`train_cohort` call, plain (`vectorized`) and with DP-SGD's per-example clipping and noise
(`vectorized dp`, the steps `DpSgd.private_steps` draws), reported per client step (the cohort
step's time / K) against the same non-private inline step.

    python benchmarks/dp_overhead.py                     # 3x32x32 inputs, batch 64 (CIFAR-sized)
    python benchmarks/dp_overhead.py --steps 10 --models convnet --device cuda
    python benchmarks/dp_overhead.py --models mlp convnet --cohort 8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.defenses.dp_sgd import DpSgd
from fedsim.core.defense import LocalTraining
from fedsim.core.registry import MODELS
from fedsim.core.seeding import torch_generator
from fedsim.data.datasets import TensorData
from fedsim.federation.cohort.executor import batch_schedule, train_cohort
from fedsim.federation.training import LocalHyperParams

MODELS_TIMED = {
    "mlp": {"hidden": [512, 256]},
    "convnet": {"width": 32},
    "resnet20": {"norm": "group"},
}
MODES = ("none", "auto", "hooks", "functorch", "ew", "ghost")


def step_times(model_name: str, mode: str, args: argparse.Namespace) -> list[float]:
    """Seconds per step of `steps` timed steps (after `warmup` untimed ones)."""
    torch.manual_seed(0)
    shape, classes = (3, args.side, args.side), 10
    plugin = MODELS.get(model_name)
    model = plugin(plugin.Params(**MODELS_TIMED[model_name]), shape, classes).to(args.device)
    total = args.batch * (args.warmup + args.steps)
    data = TensorDataset(torch.rand(total, *shape), torch.randint(0, classes, (total,)))
    loader = DataLoader(data, batch_size=args.batch, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion: nn.Module | object = nn.CrossEntropyLoss()
    if mode != "none":
        defense = DpSgd(DpSgd.Params(grad_sample_mode=mode))
        training = LocalTraining(total, args.batch, 1, None, 1, 1, 0)
        model, optimizer, loader = defense.prepare(model, optimizer, loader, training, {})
        criterion = defense.criterion(criterion)
    times = []
    for x, y in loader:
        x, y = x.to(args.device), y.to(args.device)
        clock = time.perf_counter if args.device == "cuda" else time.process_time
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = clock()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - started)
    return times[args.warmup :]


def cohort_step_times(model_name: str, private: bool, args: argparse.Namespace) -> list[float]:
    """Seconds per client step of the vectorised executor: `args.cohort` clients train
    `args.steps` steps in one `train_cohort` call (after a one-step warm-up call), repeated
    three times; each repeat's time / (steps * clients)."""
    torch.manual_seed(0)
    shape, classes, device = (3, args.side, args.side), 10, torch.device(args.device)
    plugin = MODELS.get(model_name)
    model = plugin(plugin.Params(**MODELS_TIMED[model_name]), shape, classes).to(device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = args.batch * args.steps
    datas = [TensorData(torch.rand(n, *shape), torch.randint(0, classes, (n,)), classes) for _ in range(args.cohort)]
    times = []
    for local_steps in (1, args.steps, args.steps, args.steps):
        hp = LocalHyperParams(0.05, args.batch, 1, local_steps, "sgd", 0.0, 0.0)
        training = LocalTraining(n, args.batch, 1, local_steps, 1, 1, 0)
        defense = DpSgd(DpSgd.Params())
        generators = [torch_generator(0, "batches", c) for c in range(args.cohort)]
        steps = [defense.private_steps(training, g, device) for g in generators] if private else None
        schedules = [s.batches for s in steps] if steps else [batch_schedule(n, hp, g) for g in generators]
        if args.device == "cuda":
            torch.cuda.synchronize()
        clock = time.perf_counter if args.device == "cuda" else time.process_time
        started = clock()
        train_cohort(model, [start] * args.cohort, datas, schedules, hp, device, steps)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append((clock() - started) / (local_steps * args.cohort))
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS_TIMED), choices=list(MODELS_TIMED))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--side", type=int, default=32, help="image side (3 x side x side)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cohort", type=int, default=0, help="also time the vectorised engine with this many clients")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch}, input 3x{args.side}x{args.side}")
    print("| model | mode | ms/step | ratio to non-private |")
    print("|---|---|---|---|")
    for model_name in args.models:
        baseline = None
        for mode in MODES:
            median = statistics.median(step_times(model_name, mode, args))
            baseline = baseline or median
            print(f"| {model_name} | {mode} | {1000 * median:.1f} | {median / baseline:.2f} |", flush=True)
        for private in (False, True) if args.cohort else ():
            median = statistics.median(cohort_step_times(model_name, private, args))
            mode = f"vectorized{' dp' if private else ''} ({args.cohort} clients, per client step)"
            print(f"| {model_name} | {mode} | {1000 * median:.1f} | {median / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
