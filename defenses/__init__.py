"""Defenses: each module registers its defenses in fedsim.core.registry.DEFENSES (some also a
strategy, its client action or a model), declared here by name so that a scenario naming one
imports only that module (`Registry.lazy`)."""

from fedsim.core.registry import CLIENT_ACTIONS, DEFENSES, MODELS, STRATEGIES

DEFENSES.lazy("central_dp_fixed", "fedsim.defenses.central_dp")
DEFENSES.lazy("central_dp_fixed_client", "fedsim.defenses.central_dp")
DEFENSES.lazy("central_dp_adaptive", "fedsim.defenses.central_dp")
DEFENSES.lazy("central_dp_adaptive_client", "fedsim.defenses.central_dp")
DEFENSES.lazy("norm_clip", "fedsim.defenses.clipping")
DEFENSES.lazy("dp_sgd", "fedsim.defenses.dp_sgd")
DEFENSES.lazy("local_dp", "fedsim.defenses.local_dp")
DEFENSES.lazy("mid", "fedsim.defenses.mid")
DEFENSES.lazy("gaussian_noise", "fedsim.defenses.noise")
DEFENSES.lazy("laplace_noise", "fedsim.defenses.noise")
DEFENSES.lazy("topk", "fedsim.defenses.pruning")
DEFENSES.lazy("quantize", "fedsim.defenses.quantisation")
DEFENSES.lazy("secagg_plus", "fedsim.defenses.secagg")
STRATEGIES.lazy("dp_gd", "fedsim.defenses.diff2")
STRATEGIES.lazy("diff2", "fedsim.defenses.diff2")
CLIENT_ACTIONS.lazy("diff2", "fedsim.defenses.diff2")
MODELS.lazy("kde", "fedsim.defenses.dp_kde")
MODELS.lazy("distance", "fedsim.defenses.dp_distance")
STRATEGIES.lazy("dp_kde", "fedsim.defenses.dp_kde")
CLIENT_ACTIONS.lazy("dp_kde", "fedsim.defenses.dp_kde")
STRATEGIES.lazy("ldp_sparse_regression", "fedsim.defenses.ldp_sparse_regression")
CLIENT_ACTIONS.lazy("ldp_sparse_regression", "fedsim.defenses.ldp_sparse_regression")
