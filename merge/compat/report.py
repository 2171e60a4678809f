"""The compatibility report: a list of named checks, each pass/warn/fail, plus the norms.

A check carries the values it measured (`details`) so a reader can see *why*, not just
*that*. A waived check keeps its original verdict in `details["waived_status"]` and is
shown as "waived": waivers never hide anything.

    python -c "from mergeline.merge.compat.report import CompatReport; print(CompatReport().to_dict())"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
# Severity order used to fold checks into the report's status; "skip" and "waived" are neutral.
RANK = {"pass": 0, "skip": 0, "waived": 0, "warn": 1, "fail": 2}


@dataclass
class Check:
    name: str  # dotted, e.g. "tokenizer.vocab"; waivers and severities match on it
    status: str  # pass | warn | fail | skip | waived
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    waived: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message,
                "details": self.details, "waived": self.waived}


@dataclass
class CompatReport:
    checks: list[Check] = field(default_factory=list)
    norms: dict[str, Any] = field(default_factory=lambda: {"per_model": {}, "cosine": {}})
    base: str = ""
    models: dict[str, str] = field(default_factory=dict)  # short name -> folder

    @property
    def status(self) -> str:
        worst = max((RANK[c.status] for c in self.checks), default=0)
        return {0: "pass", 1: "warn", 2: "fail"}[worst]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "base": self.base,
            "models": self.models,
            "checks": [c.to_dict() for c in self.checks],
            "norms": self.norms,
        }
