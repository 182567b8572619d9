"""The one grammar of imret's component specs: ``kind[:target][?key=value&key=value]``.

Backends (``faiss:IVF4096,SQ8?nprobe=32``), re-rankers (``sift:100?min_inliers=12``) and local
features (``cnn?level=-2``) are named by such strings on the command line, in YAML files,
in HTTP requests and in store.json. :func:`split_spec` cuts one into its parts and refuses what
no caller could mean (empty or repeated keys, a ``?`` with no parameter); :func:`spec_value`
reads a parameter's text as the scalar it spells. Each caller checks its own kinds, targets
and parameter names.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

__all__ = ["split_spec", "spec_value"]


def split_spec(spec: str, what: str) -> tuple[str, str, str, dict[str, str]]:
    """``"kind:target?k=v&..." -> (kind, colon, target, {k: v})``; ``kind`` lower-cased and
    stripped, ``colon`` is ``":"`` when a target part was given (possibly empty), parameter
    values are the decoded text. ``what`` names the spec in errors ("backend spec", ...)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} must be a non-empty string, got {spec!r}")
    text = spec.strip()
    head, question, query = text.partition("?")
    kind, colon, target = head.partition(":")
    params: dict[str, str] = {}
    if question:
        for key, value in parse_qsl(query, keep_blank_values=True):
            if not key or key in params:
                raise ValueError(f"bad or repeated parameter {key!r} in {what} {text!r}")
            params[key] = value
        if not params:
            raise ValueError(f"bad parameters {query!r} in {what} {text!r}; expected key=value&key=value")
    return kind.strip().lower(), colon, target, params


def spec_value(text: str) -> Any:
    """A parameter's text as the scalar it spells: ``true``/``false`` -> bool, ``none``/``null``
    -> None, then int, then float; anything else stays text."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t
