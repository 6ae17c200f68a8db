"""Attacks: each module registers one attack family in fedsim.registry.ATTACKS."""

from importlib.util import find_spec

from attacks import dlg  # noqa: F401  (registers 'dlg' and 'idlg')
from attacks import gmi  # noqa: F401  (registers 'gmi')
from attacks import ked_mi  # noqa: F401  (registers 'ked_mi')
from attacks import model_inversion  # noqa: F401  (registers 'mi_face')
from attacks import fedavg_inversion  # noqa: F401  (registers 'fedavg_inversion')
from attacks import inverting_gradients  # noqa: F401  (registers 'ig')
from attacks import generative_inversion  # noqa: F401  (registers 'gan_latent')
from attacks import gifd  # noqa: F401  (registers 'gifd')

if find_spec("pennylane") is not None:  # attacks on variational quantum circuits (model 'vqc')
    from attacks import quantum_landscape  # noqa: F401  (registers 'quantum_grid_scan')
    from attacks import quantum_learned  # noqa: F401  (registers 'quantum_learned')
    from attacks import quantum_matching  # noqa: F401  (registers 'quantum_gradient_matching')
