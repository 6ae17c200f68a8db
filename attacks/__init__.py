"""Attacks: each module registers its attacks in fedsim.core.registry.ATTACKS, declared here
by name so that a scenario naming one imports only that module (`Registry.lazy`)."""

from importlib.util import find_spec

from fedsim.core.registry import ATTACKS

ATTACKS.lazy("dlg", "fedsim.attacks.dlg")
ATTACKS.lazy("idlg", "fedsim.attacks.dlg")
ATTACKS.lazy("gmi", "fedsim.attacks.gmi")
ATTACKS.lazy("ked_mi", "fedsim.attacks.ked_mi")
ATTACKS.lazy("mi_face", "fedsim.attacks.model_inversion")
ATTACKS.lazy("fedavg_inversion", "fedsim.attacks.fedavg_inversion")
ATTACKS.lazy("ig", "fedsim.attacks.inverting_gradients")
ATTACKS.lazy("grad_inversion", "fedsim.attacks.grad_inversion")
ATTACKS.lazy("analytic_fc", "fedsim.attacks.analytic_fc")
ATTACKS.lazy("spear", "fedsim.attacks.spear")
ATTACKS.lazy("imprint", "fedsim.attacks.imprint")
ATTACKS.lazy("trap_weights", "fedsim.attacks.trap_weights")
ATTACKS.lazy("gan_latent", "fedsim.attacks.generative_inversion")
ATTACKS.lazy("gifd", "fedsim.attacks.gifd")
ATTACKS.lazy("loss_threshold", "fedsim.attacks.loss_threshold")
ATTACKS.lazy("lira", "fedsim.attacks.lira")
ATTACKS.lazy("lira_offline", "fedsim.attacks.lira")
ATTACKS.lazy("rmia", "fedsim.attacks.rmia")
ATTACKS.lazy("update_membership", "fedsim.attacks.update_membership")
ATTACKS.lazy("client_membership", "fedsim.attacks.client_membership")
ATTACKS.lazy("canary_audit", "fedsim.attacks.canary_audit")
ATTACKS.lazy("canary_update_audit", "fedsim.attacks.canary_audit")
ATTACKS.lazy("canary_gradient_audit", "fedsim.attacks.canary_audit")
ATTACKS.lazy("canary_client_audit", "fedsim.attacks.canary_audit")

if find_spec("pennylane") is not None:  # attacks on variational quantum circuits (model 'vqc')
    ATTACKS.lazy("quantum_dla_snapshot", "fedsim.attacks.quantum_dla_snapshot")
    ATTACKS.lazy("quantum_grid_scan", "fedsim.attacks.quantum_landscape")
    ATTACKS.lazy("quantum_learned", "fedsim.attacks.quantum_learned")
    ATTACKS.lazy("quantum_gradient_matching", "fedsim.attacks.quantum_matching")
    ATTACKS.lazy("quantum_numerical", "fedsim.attacks.quantum_numerical")
