"""The DLA-snapshot attack (Heredge et al. 2024) on Kumar et al.'s setting and on circuits
with small dynamical Lie algebras: what one gradient shows of the snapshot, and the input.

    python benchmarks/quantum_dla.py            # ~5 min on a shared 2-core CPU

Writes docs/quantum/dla.json. Every experiment draws its own weights (U[0, 2 pi)), input x
and label y ~ U[-1, 1]; one feature, Fourier encoding without re-uploading, <Z...Z>, MSE,
the label known; success: circular distance < 0.01. The attack's own loss is recorded, so an
exact symmetry of the gradient map (loss ~0 at a wrong x) is told apart from a search failure.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantum_noise import summary  # noqa: E402

from fedsim.attacks.quantum_dla_snapshot import QuantumDlaSnapshot  # noqa: E402
from fedsim.attacks.quantum_oracle import circular_distance  # noqa: E402
from fedsim.core.attack import GradientTarget  # noqa: E402
from fedsim.core.seeding import derive_seed  # noqa: E402
from fedsim.federation.training import SquaredError  # noqa: E402
from fedsim.models.quantum import VQC  # noqa: E402

SETTINGS = [("hardware_efficient", 2, 4), ("hardware_efficient", 3, 4), ("basic_entangler", 3, 3)]
EXPERIMENTS = 10
console = Console()


def target(ansatz: str, m: int, layers: int, k: int) -> tuple[GradientTarget, torch.Tensor]:
    torch.manual_seed(derive_seed(0, "dla", ansatz, m, layers, k))
    params = VQC.Params(encoding="fourier", qubits_per_feature=m, reupload=False, layers=layers,
                        observable="tensor_z", ansatz=ansatz)  # fmt: skip
    model = VQC(params, (1,), 1).double()
    x, y = torch.rand(1, 1, dtype=torch.float64), torch.rand(1, dtype=torch.float64) * 2 - 1
    model.zero_grad()
    SquaredError()(model(x), y).backward()
    update = {"quantum.weights": -0.1 * model.quantum.weights.grad.detach().clone()}
    return GradientTarget(
        model=model, update=update, num_examples=1, lr=0.1, local_steps=1, batch_size=1,
        input_shape=(1,), num_classes=0, server_round=1, client=k, known_labels=y,
    ), x  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    attack = QuantumDlaSnapshot(QuantumDlaSnapshot.Params(labels="known"), seed=0)
    out = {}
    for ansatz, m, layers in SETTINGS:
        started, rows = time.perf_counter(), []
        for k in range(EXPERIMENTS):
            observed, x = target(ansatz, m, layers, k)
            recon = attack.reconstruct(observed)
            distance = circular_distance(recon.images.double().flatten(), x.flatten()).item()
            rows.append({"distance": distance, "attack_loss": recon.attack_loss,
                         **{key: recon.details[key] for key in ("dla_dimension", "module_dimension", "rank", "equations")}})  # fmt: skip
        key = f"{ansatz}:m={m}:L={layers}"
        out[key] = {"rows": rows, "summary": summary([r["distance"] for r in rows]),
                    "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        first = rows[0]
        console.print(f"{key}: dim g {first['dla_dimension']}, dim V {first['module_dimension']}, rank M {first['rank']} of d {first['equations']}; success {out[key]['summary']} ({out[key]['seconds']} s)")
    (ROOT / "docs" / "quantum" / "dla.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
