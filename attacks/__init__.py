"""Attacks: each module registers one attack family in fedsim.core.registry.ATTACKS."""

from importlib.util import find_spec

from fedsim.attacks import dlg  # noqa: F401  (registers 'dlg' and 'idlg')
from fedsim.attacks import gmi  # noqa: F401  (registers 'gmi')
from fedsim.attacks import ked_mi  # noqa: F401  (registers 'ked_mi')
from fedsim.attacks import model_inversion  # noqa: F401  (registers 'mi_face')
from fedsim.attacks import fedavg_inversion  # noqa: F401  (registers 'fedavg_inversion')
from fedsim.attacks import inverting_gradients  # noqa: F401  (registers 'ig')
from fedsim.attacks import generative_inversion  # noqa: F401  (registers 'gan_latent')
from fedsim.attacks import gifd  # noqa: F401  (registers 'gifd')

if find_spec("pennylane") is not None:  # attacks on variational quantum circuits (model 'vqc')
    from fedsim.attacks import quantum_landscape  # noqa: F401  (registers 'quantum_grid_scan')
    from fedsim.attacks import quantum_learned  # noqa: F401  (registers 'quantum_learned')
    from fedsim.attacks import quantum_matching  # noqa: F401  (registers 'quantum_gradient_matching')
