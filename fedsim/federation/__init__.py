"""The federation: Flower apps, engines and strategies. The built-in strategies are declared in
`fedsim.core.registry.STRATEGIES` (`Registry.lazy`); their module loads when one is first named."""

from fedsim.core.registry import STRATEGIES

for _name in (
    "fedavg", "fedprox", "fedadam", "fedavgm",
    "fedyogi", "fedadagrad", "krum", "multikrum", "fedtrimmedavg", "fedmedian", "bulyan",
):  # fmt: skip
    STRATEGIES.lazy(_name, "fedsim.federation.strategies")
