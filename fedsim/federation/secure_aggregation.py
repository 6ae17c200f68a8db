"""fedsim's Message-API train exchange carried through Flower's SecAgg+ protocol.

Flower 1.41 implements SecAgg+ (Bell et al. 2020) only for its legacy API: the server side is
`SecAggPlusWorkflow`, which speaks `FitIns`/`FitRes`, and the client side is `secaggplus_mod`,
which masks the `FitRes` parameters before they leave the client. fedsim's ClientApp speaks
the Message API (`arrays` + `config` in, `arrays` + `metrics` out), so this module converts
between the two at both ends; the protocol itself (key agreement, Shamir shares, pairwise and
private masks, quantisation, unmasking) is entirely Flower's.

- `to_fitins` (server side) turns one train message into the `FitIns` the workflow sends.
  Legacy `Parameters` lose the array names, so the names travel in the config
  (`ARRAY_NAMES_KEY`); so does a seed for Flower's stochastic quantiser (`ROUNDING_SEED_KEY`).
- `secaggplus_when_requested` (client side, a Flower mod on the train handler: the
  `secagg_plus` defense's `transport_mod`) runs Flower's `secaggplus_mod` for messages that
  carry SecAgg+ configs and lets every other message through untouched, so a federation
  without secure aggregation is unchanged.

Flower's quantiser rounds stochastically with numpy's global generator; the mod seeds it from
the node's secret and the round (and restores it afterwards), so the same scenario gives the
same aggregate and the server cannot replay the rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat

from fedsim.core.errors import UserError
from fedsim.core.seeding import node_secret, numpy_global_seed
from fedsim.federation.protocol import ARRAY_NAMES_KEY, ROUNDING_SEED_KEY

FITINS_CONFIG = "fitins.config"


def to_fitins(content: RecordDict, rounding_seed: int) -> FitIns:
    """The legacy `FitIns` for a Message-API train message (`arrays` + `config`)."""
    arrays: ArrayRecord = content["arrays"]
    config = dict(content["config"])
    config[ARRAY_NAMES_KEY] = list(arrays.keys())
    config[ROUNDING_SEED_KEY] = rounding_seed
    return FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)


def named_arrays(names: list[str], arrays: list[np.ndarray], like: ArrayRecord | None = None) -> ArrayRecord:
    """An ArrayRecord from legacy (unnamed) arrays; cast to the dtypes of `like` if given."""
    if like is not None:
        arrays = [np.asarray(a).astype(like[n].numpy().dtype) for n, a in zip(names, arrays, strict=True)]
    return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in zip(names, arrays, strict=True)})


def _from_fitins(content: RecordDict) -> RecordDict:
    """fedsim's train content (`arrays` + `config`) from a legacy fitins RecordDict."""
    config = dict(content.config_records[FITINS_CONFIG])
    names = list(config.pop(ARRAY_NAMES_KEY))
    config.pop(ROUNDING_SEED_KEY)
    parameters = compat.arrayrecord_to_parameters(content.array_records["fitins.parameters"], keep_input=True)
    arrays = named_arrays(names, [bytes_to_ndarray(t) for t in parameters.tensors])
    return RecordDict({"arrays": arrays, "config": ConfigRecord(config)})


def _to_fitres(reply: RecordDict) -> RecordDict:
    """A legacy fitres RecordDict from fedsim's train reply; other config records ride along."""
    metrics: MetricRecord = reply["metrics"]
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=compat.arrayrecord_to_parameters(reply["arrays"], keep_input=True),
        num_examples=int(metrics["num-examples"]),
        metrics=dict(metrics),
    )
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    for name, record in reply.config_records.items():
        content[name] = record
    return content


def _check_quantisation_range(reply: RecordDict, context: Context) -> None:
    """Refuse a reply that SecAgg+ would silently distort.

    A client sends its weights w scaled by its share r = num_examples / max_weight, clipped
    to [-clipping_range, clipping_range] before quantisation: r must be at most 1 and r*|w|
    must stay inside the clipping range, or the aggregate is wrong without any error.
    """
    state = context.state.config_records[RECORD_KEY_STATE]
    max_weight, clip = float(state["max_weight"]), float(state["clipping_range"])
    examples = int(reply["metrics"]["num-examples"])
    if examples > max_weight:
        raise UserError(
            f"defenses.secagg_plus.max_weight={max_weight:g} is below a client's {examples} "
            "examples; raise max_weight"
        )
    largest = max(float(np.abs(a.numpy()).max()) for a in reply["arrays"].values() if a.numpy().size)
    if largest * examples / max_weight > clip:
        raise UserError(
            f"defenses.secagg_plus.clipping_range={clip:g}: a client's weight {largest:.3g} "
            f"times its share {examples}/{max_weight:g} falls outside it; raise clipping_range"
        )


def _message_api(call_next: ClientAppCallable) -> ClientAppCallable:
    """Wrap fedsim's train handler so that it takes legacy FitIns and returns FitRes content."""

    def handle(message: Message, context: Context) -> Message:
        message.content = _from_fitins(message.content)
        reply = call_next(message, context)
        if reply.has_error():
            return reply
        _check_quantisation_range(reply.content, context)
        return Message(_to_fitres(reply.content), reply_to=message)

    return handle


def secaggplus_when_requested(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: Flower's `secaggplus_mod` for SecAgg+ train messages, a no-op otherwise."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    fitins_config: Any = message.content.config_records.get(FITINS_CONFIG)
    if fitins_config is None:  # a key-exchange or unmasking stage: no training, no rounding
        return secaggplus_mod(message, context, _message_api(call_next))
    # the server's per-round seed only varies the rounds; the node's secret keeps them private
    with numpy_global_seed(node_secret(context), "secagg-rounding", int(fitins_config[ROUNDING_SEED_KEY])):
        return secaggplus_mod(message, context, _message_api(call_next))
