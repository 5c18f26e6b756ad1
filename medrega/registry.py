"""The model registry's rules: which version is `champion`, and why.

Every registered version carries its evaluation figures as tags `metric.<task>[.<lang>].<figure>`
(written by tasks/register.py). Promotion compares the challenger's gate figures with the
champion's: it moves `champion` only if no gate figure drops by more than the tolerance.
All figures are "higher is better" (F1, accuracy). Every decision, with every compared figure,
is written as tags on the challenger version, so the registry itself is the audit log.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from medrega.errors import BadInput, Transient

METRIC_PREFIX = "metric."


class PromotionError(BadInput):
    """A promotion or rollback request that cannot be carried out (no challenger, no reason...)."""


class RegistryUnavailable(Transient):
    """The registry did not answer (or answered with a server error): no decision can be taken."""


@dataclass
class Comparison:
    metric: str
    challenger: float | None
    champion: float | None
    delta: float | None
    status: str  # ok | regressed | not measured | missing on challenger | new


@dataclass
class Decision:
    promote: bool
    reason: str
    rows: list[Comparison] = field(default_factory=list)

    @property
    def regressed(self) -> list[str]:
        return [r.metric for r in self.rows if r.status in ("regressed", "missing on challenger")]


def compare(challenger: dict[str, float], champion: dict[str, float] | None,
            gates: list[str], tolerance: float) -> Decision:
    """Pure decision: promote unless a gate figure regresses by more than `tolerance` (absolute).

    A gate figure neither version measured is reported and ignored (e.g. grounded reports when
    the evaluation had none); one the champion has and the challenger lacks counts as a regression.
    """
    if champion is None:
        rows = [Comparison(g, challenger.get(g), None, None, "new") for g in gates]
        return Decision(True, "no champion yet: the first version becomes champion", rows)
    rows = []
    for gate in gates:
        new, old = challenger.get(gate), champion.get(gate)
        if new is None and old is None:
            rows.append(Comparison(gate, None, None, None, "not measured"))
        elif new is None:
            rows.append(Comparison(gate, None, old, None, "missing on challenger"))
        elif old is None:
            rows.append(Comparison(gate, new, None, None, "new"))
        else:
            delta = new - old
            rows.append(Comparison(gate, new, old, delta, "regressed" if delta < -tolerance else "ok"))
    decision = Decision(True, f"no gate metric regressed by more than {tolerance}", rows)
    if decision.regressed:
        decision.promote = False
        decision.reason = "gate metrics regressed: " + ", ".join(decision.regressed)
    return decision


def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    """`metric.<name>` tags of a model version -> {name: value}."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_PREFIX):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                out[key[len(METRIC_PREFIX):]] = number
    return out


# what the registry says when a model or alias simply does not exist (SQLite store and server)
_ABSENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


def _alias_version(client, name: str, alias: str):
    """The version holding `alias`, or None when the model or alias does not exist. Any other
    failure (unreachable server, 5xx) is RegistryUnavailable: "no champion" must never be assumed
    from an error, or a challenger would become champion without passing the gate."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in _ABSENT:
            return None
        raise RegistryUnavailable(f"model registry: cannot read alias {alias!r} of {name!r} ({err.error_code}: "
                                  f"{err.message.splitlines()[0] if err.message else err})") from None
    except Exception as err:  # noqa: BLE001 - connection errors surface as requests/OS errors too
        raise RegistryUnavailable(f"model registry: cannot read alias {alias!r} of {name!r} "
                                  f"({type(err).__name__}: {err})") from None


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code in _ABSENT:
            raise PromotionError(f"model {name!r} has no version {version}") from None
        raise RegistryUnavailable(f"model registry: cannot read version {version} of {name!r} ({err.error_code})") \
            from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(client, name: str, gates: list[str], tolerance: float, *, challenger_alias: str = "challenger",
            champion_alias: str = "champion", version: str | None = None,
            override_reason: str | None = None) -> dict[str, Any]:
    """Compare the challenger (or `version`) with the champion and move `champion` if it passes.

    `override_reason` promotes regardless of the gates; the reason is mandatory and recorded.
    """
    if override_reason is not None and not override_reason.strip():
        raise PromotionError("a manual override needs a reason (--reason)")
    if version is not None:
        candidate = _version(client, name, str(version))
    else:
        candidate = _alias_version(client, name, challenger_alias)
        if candidate is None:
            raise PromotionError(f"model {name!r} has no version with alias {challenger_alias!r}")
    champion = _alias_version(client, name, champion_alias)
    if champion is not None and champion.version == candidate.version:
        return {"model_name": name, "version": candidate.version, "decision": "unchanged",
                "promoted": False, "reason": f"version {candidate.version} already is {champion_alias}",
                "champion": champion.version, "rows": []}

    decision = compare(version_metrics(candidate.tags), version_metrics(champion.tags) if champion else None,
                       gates, tolerance)
    label = "promoted" if decision.promote else "refused"
    if override_reason is not None:
        label, decision.promote = ("override" if not decision.promote else "promoted"), True
        decision.reason = f"manual override: {override_reason.strip()} (gates: {decision.reason})"

    tags = {"promotion.decision": label, "promotion.reason": decision.reason, "promotion.time": _now(),
            "promotion.compared_to": champion.version if champion else "none",
            "promotion.tolerance": str(tolerance)}
    if override_reason is not None:
        tags["promotion.override_reason"] = override_reason.strip()
    for row in decision.rows:
        for key in ("challenger", "champion", "delta"):
            value = getattr(row, key)
            tags[f"promotion.{row.metric}.{key}"] = "" if value is None else f"{value:.6g}"
        tags[f"promotion.{row.metric}.status"] = row.status
    if decision.promote:
        tags["promotion.previous_champion"] = champion.version if champion else "none"
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, champion_alias, candidate.version)
    return {"model_name": name, "version": candidate.version, "decision": label, "promoted": decision.promote,
            "reason": decision.reason, "champion": candidate.version if decision.promote else (champion.version if champion else None),
            "previous_champion": champion.version if champion else None,
            "rows": [asdict(r) for r in decision.rows]}


def rollback(client, name: str, *, champion_alias: str = "champion", to: str | None = None,
             reason: str = "rollback") -> dict[str, Any]:
    """Move `champion` back to the version it replaced (or to `to`), recording why."""
    current = _alias_version(client, name, champion_alias)
    if current is None:
        raise PromotionError(f"model {name!r} has no {champion_alias!r} to roll back")
    target = str(to) if to is not None else current.tags.get("promotion.previous_champion", "none")
    if target in ("", "none"):
        raise PromotionError(f"version {current.version} has no previous {champion_alias}; name one with --to")
    _version(client, name, target)  # fails clearly if it does not exist
    client.set_registered_model_alias(name, champion_alias, target)
    stamp = _now()
    client.set_model_version_tag(name, current.version, "promotion.rolled_back", f"{stamp}: {reason}")
    client.set_model_version_tag(name, target, "promotion.restored", f"{stamp}: from {current.version}: {reason}")
    return {"model_name": name, "champion": target, "previous_champion": current.version, "reason": reason}
