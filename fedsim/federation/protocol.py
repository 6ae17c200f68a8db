"""The message protocol between fedsim's ServerApp and ClientApp: the record keys both sides
(and the plugins that extend them) read and write, in one place.

A train message's `config` carries `SCENARIO_KEY` (the resolved public scenario, YAML text);
a reply carries `TRUTH_KEY` (simulation-only ground truth, stripped by the observer before the
strategy or an attacker sees the reply). Aggregates standing for several clients (SecAgg+) carry
`AGGREGATE_KEY`; SecAgg+'s legacy exchange carries `ARRAY_NAMES_KEY` and `ROUNDING_SEED_KEY`.
"""

SCENARIO_KEY = "fedsim.scenario"
"""Train/evaluate config entry: the resolved scenario the client builds itself from."""
TRUTH_KEY = "fedsim.truth"
"""Reply record (simulation only): `batches`, the indices of the examples trained on."""
AGGREGATE_KEY = "fedsim.aggregate"
"""Reply record of an aggregate standing for several clients: `clients` (JSON list of metrics)."""
ARRAY_NAMES_KEY = "fedsim.array-names"
"""SecAgg+ exchange: the parameter names of the flattened arrays, in order."""
ROUNDING_SEED_KEY = "fedsim.secagg-rounding-seed"
"""SecAgg+ exchange: seed of the client's stochastic rounding (from its node secret)."""
