"""Compatibility policy: thresholds for the norm flags, severities, and waivers.

Loaded from YAML (`configs/compat_policy.yaml` is the default). Unknown keys are errors,
so a typo in a threshold or a waiver never silently changes what is checked.

    python -c "from mergeline.merge.compat.policy import load_policy; print(load_policy(None))"
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergeline.configs import DIR as CONFIGS
from mergeline.merge.config_files import explain, read_yaml_mapping

DEFAULT_POLICY = CONFIGS / "compat_policy.yaml"

# Every check the gate can emit. Waivers and severities must name one of these (or a group
# prefix such as "tokenizer", or "architecture.<config field>" to waive a single field).
KNOWN_CHECKS = (
    "architecture",
    "tensors.names", "tensors.shapes", "tensors.dtypes",
    "tokenizer.present", "tokenizer.vocab", "tokenizer.merges", "tokenizer.normalization",
    "tokenizer.special_tokens", "tokenizer.added_tokens", "tokenizer.chat_template",
    "norms.finite", "norms.identical", "norms.too_large", "norms.unrelated", "norms.outlier", "norms.duplicate",
)
GROUPS = sorted({c.split(".")[0] for c in KNOWN_CHECKS})


class NormsPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # ||theta_i - theta_0|| / ||theta_0|| over weight matrices above this cannot be a fine-tune of
    # the base. Real LLM fine-tunes sit at 0.001-0.05; the demo zoo's tiny full fine-tunes reach
    # about 1.0; two unrelated initialisations of equal norm sit at sqrt(2) ~ 1.41 or above.
    # Too coarse alone, hence the weight cosine below, which separates the two cleanly.
    max_relative_delta: float = Field(1.25, gt=0)
    # cos(theta_i, theta_0) over weight matrices below this: the weights share nothing with the
    # base's (independent initialisations are ~orthogonal). A fine-tune that moved as far as the
    # base's own norm, in an unrelated direction, still has 0.71.
    min_weight_cosine: float = Field(0.5, ge=-1, le=1)
    # A model whose relative delta exceeds this multiple of the median of the OTHER models'
    # relative deltas is an outlier (only the high side is flagged; with two models the
    # larger of the two is the suspect).
    outlier_ratio: float = Field(5.0, gt=1)
    # At or below this relative delta the model is the base itself: nothing to merge.
    identical_tolerance: float = Field(0.0, ge=0)
    # Two models whose task vectors have cosine above this and equal norms are one model twice.
    duplicate_cosine: float = Field(0.9999, gt=0, le=1)
    # Elements per job of the norm pass: a large tensor is split into chunks of this size so the
    # threads share it (the files are memory-mapped: a chunk costs no extra memory).
    chunk_elements: int = Field(1 << 22, gt=0)


class ArchitecturePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # config.json keys that describe how a file was written, not what the model computes.
    ignore_fields: list[str] = Field(default_factory=lambda: [
        "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
        "_attn_implementation", "_attn_implementation_autoset", "output_attentions",
        "output_hidden_states", "return_dict", "_commit_hash",
    ])


class CompatPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1
    norms: NormsPolicy = Field(default_factory=NormsPolicy)
    architecture: ArchitecturePolicy = Field(default_factory=ArchitecturePolicy)
    # Verdict of a check that finds a problem, overriding its built-in severity.
    severity: dict[str, Literal["warn", "fail"]] = Field(default_factory=dict)
    # Checks reported as "waived" instead of warn/fail (still shown, never hidden).
    waive: list[str] = Field(default_factory=list)

    @field_validator("severity")
    @classmethod
    def _known_severity(cls, v: dict) -> dict:
        for name in v:
            if name not in KNOWN_CHECKS:
                raise ValueError(f"severity: unknown check {name!r}; known: {', '.join(KNOWN_CHECKS)}")
        return v

    @field_validator("waive")
    @classmethod
    def _known_waiver(cls, v: list) -> list:
        for name in v:
            if not (name in KNOWN_CHECKS or name in GROUPS or name.startswith("architecture.")):
                raise ValueError(f"waive: unknown check {name!r}; known: {', '.join(KNOWN_CHECKS)}")
        return v

    def is_waived(self, check: str) -> bool:
        return any(check == w or check.startswith(w + ".") for w in self.waive)

    def waived_fields(self) -> set[str]:
        """Config fields waived one by one with `architecture.<field>`."""
        return {w.split(".", 1)[1] for w in self.waive if w.startswith("architecture.")}


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and key."""


def load_policy(source: str | Path | dict | CompatPolicy | None = None) -> CompatPolicy:
    """A policy from a YAML path, a dict, an instance, or None (the default file)."""
    if isinstance(source, CompatPolicy):
        return source
    where = "policy"
    if source is None:
        source = DEFAULT_POLICY if DEFAULT_POLICY.is_file() else {}
    if isinstance(source, (str, Path)):
        where = str(source)
        source = read_yaml_mapping(source, "compatibility policy", PolicyError)
    try:
        return CompatPolicy.model_validate(source)
    except ValidationError as e:
        raise PolicyError(f"{where}: {explain(e)}") from None
