"""The model registry's rules: which version is `champion`, and why.

Every registered version carries, as tags (written by tasks/register.py), its gate and headline
figures `metric.<task>[.<lang>].<figure>` and what they were measured on, `measured.<key>`: the
evaluation settings (protocol, IoU threshold, name matching, generation length) and, per task, the
sample count and a hash of the evaluated test items. Promotion compares the challenger's gate
figures with the champion's, but only figures measured the same way: a 20-sample accuracy is not
weighed against a 4-sample one. When they differ the decision is "not comparable", with why.
Otherwise `champion` moves only if no gate figure drops by more than the tolerance. All gate
figures are "higher is better" (config.py admits only score figures). Every decision is written
as tags on the challenger version, so the registry itself is the audit log.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from medrega.errors import BadInput, Transient

METRIC_PREFIX = "metric."
MEASURED_PREFIX = "measured."
NOT_COMPARABLE = "not comparable"


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
    status: str  # ok | regressed | not measured | missing on challenger | new | not comparable
    note: str = ""  # why a figure is not comparable


@dataclass
class Decision:
    promote: bool
    reason: str
    rows: list[Comparison] = field(default_factory=list)
    comparable: bool = True

    @property
    def regressed(self) -> list[str]:
        return [r.metric for r in self.rows if r.status in ("regressed", "missing on challenger")]


@dataclass(frozen=True)
class Evidence:
    """A version's figures and what they were measured on (`measured` is None for a version
    that does not record it: its figures cannot be shown comparable to anything)."""

    figures: dict[str, float]
    measured: dict[str, str] | None


def _differences(task: str, new: dict[str, str] | None, old: dict[str, str] | None) -> str:
    """Why `task`'s figures of two versions were not measured the same way ("" when they were).
    Settings (keys without a task) apply to every task; `<task>.n`/`<task>.items` to one."""
    if new is None or old is None:
        return f"the {'challenger' if new is None else 'champion'} does not record what its figures were measured on"
    keys = sorted(k for k in set(new) | set(old) if "." not in k or k.startswith(task + "."))
    diffs = [f"{k} {new.get(k, 'absent')} vs {old.get(k, 'absent')}" if not k.endswith(".items")
             else f"{k} differ (another test set)" for k in keys if new.get(k) != old.get(k)]
    if not any(k.startswith(task + ".") for k in keys):
        diffs.append(f"no record of the {task} test items")
    return "; ".join(diffs)


def compare(challenger: Evidence, champion: Evidence | None, gates: list[str], tolerance: float) -> Decision:
    """Pure decision: promote unless a gate figure regresses by more than `tolerance` (absolute),
    comparing only figures measured the same way (else "not comparable", with the differences).

    A gate figure neither version measured is reported and ignored (e.g. grounded reports when
    the evaluation had none); one the champion has and the challenger lacks counts as a regression.
    """
    if champion is None:
        rows = [Comparison(g, challenger.figures.get(g), None, None, "new") for g in gates]
        return Decision(True, "no champion yet: the first version becomes champion", rows)
    rows = []
    for gate in gates:
        new, old = challenger.figures.get(gate), champion.figures.get(gate)
        if new is None and old is None:
            rows.append(Comparison(gate, None, None, None, "not measured"))
        elif new is None:
            rows.append(Comparison(gate, None, old, None, "missing on challenger"))
        elif old is None:
            rows.append(Comparison(gate, new, None, None, "new"))
        elif why := _differences(gate.split(".")[0], challenger.measured, champion.measured):
            rows.append(Comparison(gate, new, old, new - old, NOT_COMPARABLE, why))
        else:
            delta = new - old
            rows.append(Comparison(gate, new, old, delta, "regressed" if delta < -tolerance else "ok"))
    decision = Decision(True, f"no gate metric regressed by more than {tolerance}", rows)
    unfair = {r.metric.split(".")[0]: r.note for r in rows if r.status == NOT_COMPARABLE}
    if unfair:
        decision.promote, decision.comparable = False, False
        decision.reason = "not comparable: " + "; ".join(f"{task} figures measured differently ({why})"
                                                         for task, why in unfair.items())
        if decision.regressed:
            decision.reason += "; also regressed: " + ", ".join(decision.regressed)
    elif decision.regressed:
        decision.promote = False
        decision.reason = "gate metrics regressed: " + ", ".join(decision.regressed)
    return decision


def _numbers(tags: dict[str, str], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                out[key[len(prefix):]] = number
    return out


def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    """`metric.<name>` tags of a model version -> {name: value}."""
    return _numbers(tags, METRIC_PREFIX)


def version_evidence(tags: dict[str, str]) -> Evidence:
    """A version's gate evidence from its tags."""
    measured = {k[len(MEASURED_PREFIX):]: v for k, v in tags.items() if k.startswith(MEASURED_PREFIX)}
    return Evidence(version_metrics(tags), measured or None)


def measured_tags(measured_on: dict[str, Any]) -> dict[str, str]:
    """evaluate's `measured_on` block (breakdown.json) as `measured.<key>` tags: settings flat,
    then `<task>.n` and `<task>.items` per task."""
    tags = {f"{MEASURED_PREFIX}{k}": str(v) for k, v in measured_on.items() if k != "tasks"}
    for task, m in (measured_on.get("tasks") or {}).items():
        tags[f"{MEASURED_PREFIX}{task}.n"] = str(m["n"])
        tags[f"{MEASURED_PREFIX}{task}.items"] = str(m["items"])
    return tags


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
    except Exception as err:  # noqa: BLE001 - connection errors surface as requests/OS errors too
        raise RegistryUnavailable(f"model registry: cannot read version {version} of {name!r} "
                                  f"({type(err).__name__}: {err})") from None


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

    decision = compare(version_evidence(candidate.tags), version_evidence(champion.tags) if champion else None,
                       gates, tolerance)
    label = "promoted" if decision.promote else ("refused" if decision.comparable else NOT_COMPARABLE)
    if override_reason is not None:
        label, decision.promote = ("override" if not decision.promote else "promoted"), True
        decision.reason = f"manual override: {override_reason.strip()} (gates: {decision.reason})"

    tags = {"promotion.decision": label, "promotion.reason": decision.reason, "promotion.time": _now(),
            "promotion.compared_to": champion.version if champion else "none",
            "promotion.tolerance": str(tolerance),
            # every compared figure in one tag (not four tags per gate: the version page stays readable)
            "promotion.rows": json.dumps([asdict(r) for r in decision.rows], ensure_ascii=False)}
    if override_reason is not None:
        tags["promotion.override_reason"] = override_reason.strip()
    if decision.promote:
        tags["promotion.previous_champion"] = champion.version if champion else "none"
    _write(f"record the decision on version {candidate.version} of {name!r}",
           lambda: [client.set_model_version_tag(name, candidate.version, k, v) for k, v in tags.items()])
    if decision.promote:
        _write(f"move {champion_alias!r} of {name!r} to version {candidate.version}",
               lambda: client.set_registered_model_alias(name, champion_alias, candidate.version))
    return {"model_name": name, "version": candidate.version, "decision": label, "promoted": decision.promote,
            "reason": decision.reason, "champion": candidate.version if decision.promote else (champion.version if champion else None),
            "previous_champion": champion.version if champion else None,
            "rows": [asdict(r) for r in decision.rows]}


def _write(what: str, action) -> None:
    """A registry write; a failure is RegistryUnavailable (the decision stands unrecorded, the
    alias unmoved when the tags could not be written first)."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - MlflowException, requests and OS errors alike
        message = getattr(err, "message", None) or str(err)
        raise RegistryUnavailable(f"model registry: cannot {what} ({type(err).__name__}: "
                                  f"{message.splitlines()[0] if message else ''})") from None


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
    _write(f"move {champion_alias!r} of {name!r} to version {target}",
           lambda: client.set_registered_model_alias(name, champion_alias, target))
    stamp = _now()
    _write("record the rollback", lambda: (
        client.set_model_version_tag(name, current.version, "promotion.rolled_back", f"{stamp}: {reason}"),
        client.set_model_version_tag(name, target, "promotion.restored", f"{stamp}: from {current.version}: {reason}")))
    return {"model_name": name, "champion": target, "previous_champion": current.version, "reason": reason}
