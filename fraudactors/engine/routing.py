"""The routing document: which model version each variant runs, with what weight, since when.

It lives under one key (``routing``) on the compacted control topic (``topics.control``); every
replica follows it (:mod:`fraudactors.engine.control`) and ``fraudactors models`` writes it. With
no document the configuration's ``[models.variants]`` route (revision 0). A document carries the
routing it replaced (``previous``, one level deep) so ``rollback`` and a replica that cannot load
the newest one know what ran before, and the sha256 of each version's ``model.onnx`` as the writer
verified it (``models``): a replica whose files differ refuses the document.

The changes (:meth:`Routing.with_weights`, :meth:`Routing.promoted`, :meth:`Routing.rolled_back`)
return a new document with ``revision + 1``; :meth:`Routing.validate` is what every reader applies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson

from fraudactors.errors import RoutingRefused
from fraudactors.settings import ModelSettings, VariantSettings

ROUTING_KEY = b"routing"
# A version names a directory under models.dir: no separators, no leading dot (no "..").
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_REASON = 500


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Routing:
    revision: int
    variants: Mapping[str, VariantSettings]
    # version -> sha256 of its model.onnx as the writer verified it (empty for the configuration)
    models: Mapping[str, str] = field(default_factory=dict)
    issued_at: str = ""
    reason: str = ""
    previous: Routing | None = None

    @classmethod
    def from_settings(cls, models: ModelSettings) -> Routing:
        """Revision 0: the configuration's variants (what routes while the control topic is empty)."""
        return cls(0, dict(models.variants), reason="configuration [models.variants]")

    @property
    def deciding(self) -> dict[str, VariantSettings]:
        return {n: v for n, v in self.variants.items() if not v.shadow and v.weight > 0}

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions that score: each deciding variant's (weight > 0) and each shadow's."""
        return tuple(sorted({v.version for v in self.variants.values() if v.shadow or v.weight > 0}))

    def validate(self) -> Routing:
        """Raise :class:`RoutingRefused` naming what is wrong; returns self."""
        if self.revision < 0:
            _refuse(f"revision must be >= 0, got {self.revision}")
        if not self.variants:
            _refuse("no variants")
        for name, v in self.variants.items():
            if not _VARIANT.fullmatch(name):
                _refuse(f"variant name {name!r} must be 1-32 letters, digits, '_' or '-'")
            if not _VERSION.fullmatch(v.version):
                _refuse(f"variant {name}: version {v.version!r} must be 1-64 letters, digits, '.', '_' or '-' "
                        "(a directory under models.dir)")
            if not (math.isfinite(v.weight) and v.weight >= 0):
                _refuse(f"variant {name}: weight must be a finite number >= 0, got {v.weight!r}")
        if not self.deciding:
            _refuse("at least one variant must decide (not shadow, weight > 0)")
        for version, sha in self.models.items():
            if not _SHA256.fullmatch(sha):
                _refuse(f"models.{version}: {sha!r} is not a sha256 (64 lower-case hex digits)")
        if self.previous is not None:
            if self.previous.revision >= self.revision:
                _refuse(f"previous revision {self.previous.revision} is not older than {self.revision}")
            self.previous.validate()
        return self

    # ------------------------------------------------------------------ JSON
    def to_obj(self, *, with_previous: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "revision": self.revision,
            "variants": {n: {"version": v.version, "weight": v.weight, "shadow": v.shadow}
                         for n, v in sorted(self.variants.items())},
            "models": dict(sorted(self.models.items())),
            "issued_at": self.issued_at,
            "reason": self.reason,
        }
        if with_previous and self.previous is not None:
            obj["previous"] = self.previous.to_obj(with_previous=False)
        return obj

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_obj())

    @classmethod
    def from_json(cls, data: bytes) -> Routing:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RoutingRefused(f"routing document is not JSON: {exc}") from None
        return cls.from_obj(obj).validate()

    @classmethod
    def from_obj(cls, obj: Any, *, nested: bool = False) -> Routing:
        if not isinstance(obj, dict):
            _refuse("routing document is not a JSON object")
        unknown = set(obj) - {"revision", "variants", "models", "issued_at", "reason", "previous"}
        if unknown:
            _refuse(f"unknown key(s) {sorted(unknown)}")
        revision = obj.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool):
            _refuse(f"revision must be an integer, got {revision!r}")
        raw = obj.get("variants")
        if not isinstance(raw, dict):
            _refuse("variants must be an object {name: {version, weight, shadow}}")
        variants = {str(name): _variant(str(name), spec) for name, spec in raw.items()}
        models = obj.get("models", {})
        if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
            _refuse("models must be an object {version: sha256}")
        issued_at, reason = obj.get("issued_at", ""), obj.get("reason", "")
        if not isinstance(issued_at, str) or not isinstance(reason, str):
            _refuse("issued_at and reason must be strings")
        previous = None
        if obj.get("previous") is not None:
            if nested:
                _refuse("previous must not nest another previous")
            previous = cls.from_obj(obj["previous"], nested=True)
        return cls(revision, variants, dict(models), issued_at, reason[:_MAX_REASON], previous)

    # ------------------------------------------------------------------ changes (revision + 1)
    def _next(self, variants: Mapping[str, VariantSettings], pins: Mapping[str, str], reason: str) -> Routing:
        keep = {v.version for v in variants.values()}
        models = {k: s for k, s in {**self.models, **pins}.items() if k in keep}
        return Routing(self.revision + 1, dict(variants), models, _now(), reason[:_MAX_REASON],
                       replace(self, previous=None)).validate()

    def with_weights(self, weights: Mapping[str, float], pins: Mapping[str, str], reason: str = "") -> Routing:
        """Set the weights of deciding variants (named ones only; the others keep theirs)."""
        variants = dict(self.variants)
        for name, weight in weights.items():
            if name not in variants:
                _refuse(f"no variant {name} (variants: {', '.join(sorted(variants))})")
            if variants[name].shadow:
                _refuse(f"variant {name} is a shadow; make it decide with `promote {variants[name].version} "
                        f"--variant {name} --weight W`")
            variants[name] = replace(variants[name], weight=weight)
        return self._next(variants, pins, reason or "set-weights " + _weights_text(weights))

    def promoted(self, version: str, variant: str, pins: Mapping[str, str], *, weight: float | None = None,
                 shadow: bool = False, reason: str = "") -> Routing:
        """Put ``version`` in ``variant`` (created if new). A shadow has weight 0; a deciding
        variant keeps its weight unless ``weight`` is given (a new or former shadow needs one)."""
        old = self.variants.get(variant)
        if shadow:
            if weight not in (None, 0):
                _refuse("a shadow variant has no weight (drop --weight, or drop --shadow)")
            new = VariantSettings(version, 0.0, True)
        else:
            if weight is None:
                if old is None or old.shadow:
                    _refuse(f"variant {variant} {'is new' if old is None else 'is a shadow'}: "
                            "give it a weight (--weight W)")
                weight = old.weight
            new = VariantSettings(version, weight, False)
        kind = "shadow" if shadow else f"weight {weight:g}"
        return self._next({**self.variants, variant: new}, pins,
                          reason or f"promote {version} to variant {variant} ({kind})")

    def rolled_back(self, reason: str = "") -> Routing:
        """The previous routing again, as a new revision (its own previous is this one)."""
        if self.previous is None:
            _refuse(f"revision {self.revision} has no previous routing to roll back to")
        prev = self.previous
        return Routing(self.revision + 1, dict(prev.variants), dict(prev.models), _now(),
                       (reason or f"rollback to revision {prev.revision}")[:_MAX_REASON],
                       replace(self, previous=None)).validate()

    def describe(self) -> str:
        """One line per variant, for `fraudactors models list` and logs."""
        lines = []
        for name, v in sorted(self.variants.items()):
            role = "shadow" if v.shadow else f"weight {v.weight:g}"
            sha = self.models.get(v.version)
            lines.append(f"  {name}: {v.version} ({role})" + (f" sha256 {sha[:12]}" if sha else ""))
        return "\n".join(lines)


def _variant(name: str, spec: Any) -> VariantSettings:
    if not isinstance(spec, dict) or set(spec) - {"version", "weight", "shadow"}:
        _refuse(f"variant {name} must be {{version, weight, shadow}}, got {spec!r}")
    version, weight, shadow = spec.get("version"), spec.get("weight", 0.0), spec.get("shadow", False)
    if not isinstance(version, str):
        _refuse(f"variant {name}: version must be a string")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        _refuse(f"variant {name}: weight must be a number")
    if not isinstance(shadow, bool):
        _refuse(f"variant {name}: shadow must be true or false")
    return VariantSettings(version, float(weight), shadow)


def _weights_text(weights: Mapping[str, float]) -> str:
    return " ".join(f"{n}={w:g}" for n, w in sorted(weights.items()))


def _refuse(problem: str) -> NoReturn:
    raise RoutingRefused(f"routing refused: {problem}")
