"""Every bound the served model enforces, in one place.

`ServeLimits()` holds the defaults; the HTTP server (`model.serve`) takes an instance, and the
pyfunc's in-process `predict` applies the defaults. Sizes are bytes, times seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeLimits:
    # request
    max_header_bytes: int = 16 * 1024     # request line and headers together
    header_timeout_s: float = 10.0        # the headers must arrive within this (slowloris)
    max_body_bytes: int = 48 * MiB        # refused from Content-Length, or while reading, before parsing
    body_timeout_s: float = 30.0          # the whole body must arrive within this (slow senders)
    max_json_depth: int = 6               # the contract needs 4 (dataframe_split.data[row][cell])
    max_json_containers: int = 1024       # arrays + objects in one body
    max_rows: int = 64
    # fields
    max_question_chars: int = 4000
    max_image_bytes: int = 32 * MiB       # decoded size of one image
    max_image_pixels: int = 40_000_000    # from the header, before a pixel is decoded
    # generation
    max_new_tokens: int = 1024            # the most a request may ask for (params.max_new_tokens)
    deadline_s: float = 60.0              # per request, queueing included; generation stops at it
    workers: int = 1                      # generations at once
    max_queue: int = 8                    # requests admitted beyond the running ones; then 503
    # server
    max_connections: int = 64             # open connections; uvicorn answers 503 beyond
    graceful_shutdown_s: float = 10.0     # after SIGTERM/SIGINT, then in-flight requests are cut

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServeLimits":
        """From a config mapping; unknown keys and values of the wrong type are refused."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"serve limits: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
        out = {}
        for name, value in values.items():
            kind = float if known[name].type in ("float", float) else int
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(f"serve limits: {name} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
            if value < 0 or (value == 0 and name != "max_queue"):
                raise ValueError(f"serve limits: {name} must be positive, got {value!r}")
            out[name] = kind(value)
        return replace(cls(), **out)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_LIMITS = ServeLimits()
