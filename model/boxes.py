"""Boxes in text (SPEC §2): the 0-999 grid codec, the formatter and a forgiving parser.

Everything that writes a box (dataset builders, prompts) goes through `format_*`, and
everything that reads one (the evaluator, validation) goes through `parse_*`, so the two
can never drift apart. The parser must never raise: it reads raw model output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Released prompts and evaluator use integers 0..999 (the paper's "[0, 1000)" is the same
# set of integers, but we scale by 999 so that the right/bottom edge maps to 999 exactly).
GRID = 999


def _clamp(v: int) -> int:
    return max(0, min(GRID, v))


def encode_box(box_xyxy, width: float, height: float) -> list[int]:
    """Pixel box [x1, y1, x2, y2] on the original image -> grid integers, clamped to 0..999.

    Python's round() (half to even) is used because SPEC §2 writes the rule as round();
    either tie rule stays within half a grid cell of the true position.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box_xyxy
    return [
        _clamp(round(x1 / width * GRID)),
        _clamp(round(y1 / height * GRID)),
        _clamp(round(x2 / width * GRID)),
        _clamp(round(y2 / height * GRID)),
    ]


def decode_box(grid_box, width: float, height: float) -> list[float]:
    """Grid integers -> pixel coordinates on the original image (x / 999 * W)."""
    x1, y1, x2, y2 = grid_box
    return [x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height]


def format_box(boxes) -> str:
    """`<box>[[x1, y1, x2, y2], [..]]</box>` with the ", " separators of the SPEC examples."""
    inner = ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in boxes)
    return f"<box>[{inner}]</box>"


def format_region(name: str, boxes) -> str:
    return f"<ref>{name}</ref>{format_box(boxes)}"


def format_regions(regions) -> str:
    """Several objects, each `(name, boxes)`, joined by ", " (SPEC §2)."""
    return ", ".join(format_region(name, boxes) for name, boxes in regions)


@dataclass
class ParseResult:
    # One entry per valid box; the name is the <ref> that introduced its <box> group, or None.
    regions: list[tuple[str | None, list[int]]] = field(default_factory=list)
    # False when no valid box was found or any box syntax was malformed.
    ok: bool = False
    # Grounded-report description after the last box (`: ...` / `：...`), else None.
    text: str | None = None
    # Boxes that were written but rejected (bad syntax, out of range, empty area). The
    # evaluator counts them as predictions so a garbage box cannot raise precision.
    n_invalid: int = 0
    # True when the boxes were read from bare `name[[..]]` text (no <ref>/<box> tags), by
    # `parse_answer_regions`; `parse_regions` never sets it.
    untagged: bool = False

    @property
    def boxes(self) -> list[list[int]]:
        return [box for _, box in self.regions]


# A <ref> or a <box> group, in reading order. Non-greedy so adjacent groups stay separate.
_TOKEN = re.compile(r"<ref>(?P<ref>.*?)</ref>|<box>(?P<box>.*?)</box>", re.DOTALL)
# The list of boxes inside <box>..</box>: "[[a, b, c, d], [..]]". A single "[a, b, c, d]"
# is also accepted: it is unambiguous and models trained on the double form do emit it.
_INNER = re.compile(r"\[([^\[\]]*)\]")
_OUTER_DOUBLE = re.compile(r"^\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]$")
_OUTER_SINGLE = re.compile(r"^\[[^\[\]]*\]$")
# At most 6 digits: keeps int() far away from Python's huge-integer conversion limit.
_INT = re.compile(r"^\s*(-?\d{1,6})\s*$")
_DESCRIPTION = re.compile(r"^\s*[:：]\s*(.*)$", re.DOTALL)


def _parse_one(coords: str) -> list[int] | None:
    """`a, b, c, d` -> a valid grid box, or None (wrong arity, non-integer, range, area)."""
    parts = coords.split(",")
    if len(parts) != 4:
        return None
    values = []
    for p in parts:
        m = _INT.match(p)
        if not m:
            return None
        values.append(int(m.group(1)))
    x1, y1, x2, y2 = values
    if not all(0 <= v <= GRID for v in values) or x1 >= x2 or y1 >= y2:
        return None
    return values


def _parse_group(body: str) -> tuple[list[list[int]], int, bool]:
    """Contents of one <box>: (valid boxes, number of rejected boxes, syntax ok)."""
    body = body.strip()
    if _OUTER_DOUBLE.match(body) or _OUTER_SINGLE.match(body):
        chunks = _INNER.findall(body)
    else:
        # Unreadable bracket structure: count it as one rejected box.
        return [], 1, False
    valid, invalid = [], 0
    for chunk in chunks:
        box = _parse_one(chunk)
        if box is None:
            invalid += 1
        else:
            valid.append(box)
    return valid, invalid, invalid == 0


def parse_regions(text) -> ParseResult:
    """Read `<ref>name</ref><box>[[..]]</box>` groups from free text. Never raises."""
    result = ParseResult()
    if not isinstance(text, str):
        return result
    malformed = False
    pending_name: str | None = None
    last_end = None
    leftover = []  # text outside the matched groups, to spot unclosed tags
    pos = 0
    for m in _TOKEN.finditer(text):
        leftover.append(text[pos:m.start()])
        pos = m.end()
        if m.group("ref") is not None:
            # A ref binds to the next box group only; a later bare box stays unnamed.
            pending_name = m.group("ref").strip()
            continue
        boxes, invalid, good = _parse_group(m.group("box"))
        malformed |= not good
        result.n_invalid += invalid
        result.regions.extend((pending_name, b) for b in boxes)
        pending_name = None
        last_end = m.end()
    leftover.append(text[pos:])
    rest = "".join(leftover)
    if "<box>" in rest or "</box>" in rest:
        # An unclosed or stray box tag: a box was attempted but cannot be read.
        malformed = True
        result.n_invalid += rest.count("<box>")
    if last_end is not None:
        d = _DESCRIPTION.match(text[last_end:])
        if d:
            result.text = d.group(1).strip()
    result.ok = bool(result.regions) and not malformed
    return result


# --- answers decoded without their special tokens (SPEC §6) -------------------------------
# The authors' inference decodes with special tokens skipped, so `<ref>liver</ref><box>[[..]]</box>`
# reaches their answers files as `liver[[..]]`. `parse_answer_regions` reads such an answer for
# our protocol: only when it has no <box> tag at all, each bare `[[..]]` list is one box group and
# its name is the text since the previous list (or the start), trimmed of separators.
_BARE_LIST = re.compile(r"\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]")
_REF_TAGS = re.compile(r"</?ref>")
_NAME_TRIM = " \t\r\n,，;；、:："


def _untagged_name(segment: str) -> str | None:
    name = _REF_TAGS.sub("", segment).strip(_NAME_TRIM)
    return name or None


def parse_answer_regions(text) -> ParseResult:
    """A model answer: `parse_regions`, or, for an answer without any <box> tag, its bare
    `name[[x1, y1, x2, y2]], name[[..]]` groups (`untagged` set). Never raises."""
    tagged = parse_regions(text)
    if not isinstance(text, str) or "<box>" in text or "</box>" in text:
        return tagged
    lists = list(_BARE_LIST.finditer(text))
    if not lists:
        return tagged
    result = ParseResult(untagged=True)
    malformed, pos = False, 0
    for m in lists:
        boxes, invalid, good = _parse_group(m.group(0))
        malformed |= not good
        result.n_invalid += invalid
        name = _untagged_name(text[pos:m.start()])
        result.regions.extend((name, b) for b in boxes)
        pos = m.end()
    d = _DESCRIPTION.match(text[pos:])
    if d:
        result.text = d.group(1).strip()
    result.ok = bool(result.regions) and not malformed
    return result


def parse_question_box(text) -> list[list[int]]:
    """The valid box(es) in a Region-to-Text question, e.g. "What is <box>[[..]]</box>?"."""
    return parse_regions(text).boxes
