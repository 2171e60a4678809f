"""Merge-method registry: recipe ``merge_method`` name -> pure tensor function + typed parameters.

In the manner of mergekit's ``merge_methods/registry.py``, with mergekit's names and defaults.
Every ``fn`` has the signature

    fn(base, models, model_params, params, *, generator=None, thresholds=None) -> MethodResult

where ``models`` are the non-base models for ``requires_base`` methods, every recipe model for
``linear`` (``base`` may be None there), and ``[v1]`` for slerp (``base`` is v0). Values arrive
resolved per tensor as plain floats in ``model_params`` (one ``model_params`` instance per model)
and ``params`` (the method's ``global_params``). ``generator`` feeds the random methods;
``thresholds`` are per-model magnitude thresholds for whole-model trimming (see
``select.MagnitudeHistogram``).

Papers: task arithmetic arXiv:2212.04089, TIES arXiv:2306.01708, DARE arXiv:2311.03099,
Model Breadcrumbs arXiv:2312.06795, DELLA arXiv:2406.11617, SLERP (Shoemake 1985).

Run: python -c "from merge.methods.registry import METHODS; print(sorted(METHODS))"
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, create_model
from torch import Tensor

from merge.methods.linear import linear
from merge.methods.slerp import slerp
from merge.methods.stats import TensorStats
from merge.methods.ties import generalized_task_arithmetic


@dataclass
class MethodResult:
    tensor: Tensor
    stats: TensorStats | None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., MethodResult]
    model_params: type[BaseModel]
    global_params: type[BaseModel]
    requires_base: bool
    randomized: bool


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- per-model parameters (mergekit's NON_BASE / INPUT scope) ---
class WeightParams(_Params):
    weight: float


class TaskVectorParams(WeightParams):
    density: float = Field(1.0, gt=0, le=1)


class BreadcrumbsParams(TaskVectorParams):
    gamma: float = Field(0.01, ge=0, lt=1)


class DellaParams(TaskVectorParams):
    epsilon: float = Field(0.15, ge=0, lt=1)


class NoModelParams(_Params):
    pass


# --- global (mergekit's SHARED scope) parameters; defaults differ per method ---
class GTAGlobals(_Params):
    int8_mask: bool = False  # accepted for recipe compatibility; masks here are always bool
    normalize: bool = False
    rescale: bool = False
    lambda_: float = Field(1.0, alias="lambda")


def _gta_globals(name: str, normalize: bool, rescale: bool) -> type[BaseModel]:
    """GTAGlobals with this method's defaults for normalize and rescale (as mergekit's spec)."""
    return create_model(f"{name}_globals", __base__=GTAGlobals,
                        normalize=(bool, normalize), rescale=(bool, rescale))


class LinearGlobals(_Params):
    normalize: bool = True


class SlerpGlobals(_Params):
    t: float


def _gta(name: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: bool,
         model_params: type[BaseModel] = TaskVectorParams) -> MergeMethod:
    fn = partial(generalized_task_arithmetic, name=name, sparsification=sparsification, consensus=consensus)
    return MergeMethod(name, fn, model_params, _gta_globals(name, normalize, rescale), requires_base=True,
                       randomized=sparsification in ("random", "della_magprune"))


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", linear, WeightParams, LinearGlobals, requires_base=False, randomized=False),
        MergeMethod("slerp", slerp, NoModelParams, SlerpGlobals, requires_base=True, randomized=False),
        _gta("task_arithmetic", None, consensus=False, normalize=False, rescale=False),
        _gta("ties", "magnitude", consensus=True, normalize=True, rescale=False),
        _gta("dare_ties", "random", consensus=True, normalize=False, rescale=True),
        _gta("dare_linear", "random", consensus=False, normalize=False, rescale=True),
        _gta("breadcrumbs", "magnitude_outliers", False, False, False, BreadcrumbsParams),
        _gta("breadcrumbs_ties", "magnitude_outliers", True, False, False, BreadcrumbsParams),
        _gta("della", "della_magprune", consensus=True, normalize=True, rescale=True, model_params=DellaParams),
        _gta("della_linear", "della_magprune", False, False, True, DellaParams),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge_method {name!r}; allowed: {', '.join(sorted(METHODS))}") from None
