"""Datasets and partitioners, declared in `fedsim.core.registry` (`Registry.lazy`): their
module, `fedsim.data.datasets`, loads when a scenario first names one."""

from fedsim.core.registry import DATASETS, PARTITIONERS

for _name in ("digits", "regression", "sparse_regression", "synthetic", "huggingface", "local"):
    DATASETS.lazy(_name, "fedsim.data.datasets")
for _name in ("iid", "dirichlet", "classes"):
    PARTITIONERS.lazy(_name, "fedsim.data.datasets")
