"""Every epsilon with its unit: which mechanism spent it, at what level, relation, delta.

An epsilon alone is not a guarantee: DP-SGD's protects one training example, central DP's one
whole client, local DP's one client even against the server. Each defense (and a private
strategy such as `dp_gd`/`diff2`) states its unit in `privacy_unit()`; this module pairs the
units with the flat epsilon keys of a metrics.jsonl record and sorts them into kinds, the
columns of the results table:

- `example`: example-level (DP-SGD, DP-GD, DIFF2);
- `client`: client-level, noised by the server (central DP), so it holds against the
  model's users but not against the server;
- `local`: client-level, noised by the client itself (local DP), so it holds against the
  server too;
- `unstated`: an epsilon whose defense states no unit (a plugin's; never mixed with the rest).

An entry (in metrics.jsonl's per-round `privacy` list and summary.json's `privacy`) is
`{"key", "epsilon", "kind", "defense", "level", "relation", "delta", "accountant",
"not_covered", "unit"}`; `unit` is the human label the tables and plots print.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedsim.core.defense import Defense, PrivacyUnit

KINDS = ("example", "client", "local", "unstated")


@dataclass(frozen=True)
class Claim:
    """One mechanism's epsilon: the record key that holds it and the unit it is in."""

    source: str
    key: str
    unit: PrivacyUnit

    @property
    def kind(self) -> str:
        if self.unit.level == "example":
            return "example"
        return "client" if self.key.startswith("central_") else "local"


def strategy_unit(registered: Any, params: Any, built: Any) -> PrivacyUnit | None:
    """The unit of a private strategy's epsilon: asked of the built strategy, else of its
    registered class with the scenario's params; None for an ordinary strategy."""
    if callable(method := getattr(built, "privacy_unit", None)):
        return method()
    if callable(method := getattr(registered, "privacy_unit", None)):
        return method(params)
    return None


def claims(
    names: Sequence[str],
    defenses: Sequence[Defense],
    strategy: tuple[str, PrivacyUnit | None],
    clear_text_metrics: bool = False,
) -> list[Claim]:
    """The scenario's epsilon claims: a server-time defense's round metric is recorded as
    `central_<metric>`, a client's (train/update-time defense, mod, private strategy) as
    `max_client_<metric>` (see `fedsim.federation.server`). With `training.clear_text_metrics` a
    client's claim says it does not cover the plain metrics the client then sends."""

    def client_unit(unit: PrivacyUnit) -> PrivacyUnit:
        return unit.with_clear_text_metrics() if clear_text_metrics else unit

    found = []
    for name, defense in zip(names, defenses, strict=True):
        if (unit := defense.privacy_unit()) is not None:
            if defense.stage == "server":
                found.append(Claim(name, f"central_{unit.metric}", unit))
            else:
                found.append(Claim(name, f"max_client_{unit.metric}", client_unit(unit)))
    strategy_name, unit = strategy
    if unit is not None:
        found.append(Claim(strategy_name, f"max_client_{unit.metric}", client_unit(unit)))
    return found


def entries(record: dict[str, Any], claimed: Sequence[Claim]) -> list[dict[str, Any]]:
    """The epsilons of one metrics record, each with its unit; an epsilon key no claim names
    is listed as kind `unstated` rather than dropped or guessed."""
    out = []
    for claim in claimed:
        if claim.key in record:
            unit = claim.unit
            out.append(
                {
                    "key": claim.key,
                    "epsilon": record[claim.key],
                    "kind": claim.kind,
                    "defense": claim.source,
                    "level": unit.level,
                    "relation": unit.relation,
                    "delta": unit.delta,
                    "accountant": unit.accountant,
                    "not_covered": unit.not_covered,
                    "unit": f"{unit.label()}, {claim.source}",
                }
            )
    named = {claim.key for claim in claimed}
    for key in sorted(k for k in record if k.endswith("epsilon") and k not in named):
        out.append(
            {
                "key": key,
                "epsilon": record[key],
                "kind": "unstated",
                "defense": None,
                "level": None,
                "relation": None,
                "delta": None,
                "accountant": None,
                "not_covered": "",
                "unit": f"unit not stated ({key})",
            }
        )
    return out


def by_kind(privacy: Sequence[dict[str, Any]] | dict[str, float]) -> dict[str, tuple[float, str]]:
    """kind -> (epsilon, unit label) of a run's entries; when two mechanisms of one kind
    report, the largest epsilon (a lower bound on what the two spend together) and both
    labels. A mapping {key: epsilon} (summary.json written before units were recorded, e.g.
    a cell a resumed sweep keeps) counts as `unstated`."""
    if isinstance(privacy, dict):
        privacy = entries(privacy, [])
    out: dict[str, tuple[float, str]] = {}
    for entry in privacy:
        kind = entry["kind"]
        if kind in out:
            epsilon, label = out[kind]
            out[kind] = (max(epsilon, entry["epsilon"]), f"{label}; {entry['unit']}")
        else:
            out[kind] = (entry["epsilon"], entry["unit"])
    return out
