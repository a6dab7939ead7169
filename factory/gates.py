"""Gates: the one definition of how a measured value is checked against a recipe's threshold.

A gate is a recipe key `<metric>_min` (the metric must be at least the threshold) or `<metric>_max` (at most);
an unset (None) threshold is no gate. The same keys gate the recogniser (`GateConfig`), the pipeline stages
(each pipeline kind's gate configs, `factory.pipelines`) and the phone (`mobile_harness`, which reads them from the
manifest's resolved recipe), so every place that checks a gate calls `evaluate` here. This module imports
nothing heavy: the harness runs it on a lab machine without the factory's toolchain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# A value equal to its threshold passes, within float noise: differences of fold-averaged accuracies carry it
# (82.00% - 81.50% = 0.0050000000000000044), far below one pair in any protocol.
GATE_TOLERANCE = 1e-9

_OPS = {"_min": ">=", "_max": "<="}


def checks(gate: object) -> list[tuple[str, float, str]]:
    """(metric, threshold, op) of each set gate of a gate dataclass or a mapping of its keys, in key order."""
    if gate is None:
        return []
    if dataclasses.is_dataclass(gate) and not isinstance(gate, type):
        items = [(f.name, getattr(gate, f.name)) for f in dataclasses.fields(gate)]
    elif isinstance(gate, Mapping):
        items = list(gate.items())
    else:
        raise TypeError(f"a gate is a gate dataclass or a mapping of its keys, not {type(gate).__name__}")
    found = []
    for key, threshold in items:
        suffix = key[-4:]
        if suffix not in _OPS:
            raise ValueError(f"gate key {key!r} names no bound: gate keys end in _min or _max")
        if threshold is not None:
            found.append((key[:-4], float(threshold), _OPS[suffix]))
    return found


def evaluate(gate: object, measured: Mapping[str, Any], unmeasured: str | None = None) -> list[dict[str, Any]]:
    """Each set gate with its measured value, whether it passed, and by how much.

    A gated metric missing from `measured` is a bug on the host (KeyError), unless `unmeasured` says why it
    cannot be measured there (the phone: LFW accuracy needs the full 10-fold protocol); then it is listed with
    value and passed None and that note, not dropped.
    """
    results: list[dict[str, Any]] = []
    for metric, threshold, op in checks(gate):
        row: dict[str, Any] = {"name": f"{metric} {op} {threshold}", "metric": metric, "threshold": threshold,
                               "op": op}
        if metric not in measured and unmeasured is not None:
            results.append({**row, "value": None, "passed": None, "note": unmeasured})
            continue
        value = float(measured[metric])
        passed = value >= threshold - GATE_TOLERANCE if op == ">=" else value <= threshold + GATE_TOLERANCE
        results.append({**row, "value": value, "passed": bool(passed),
                        "margin": value - threshold if op == ">=" else threshold - value})
    return results
