"""Merge-method registry: recipe ``merge_method`` name -> pure tensor function + typed parameters.

In the manner of mergekit's ``merge_methods/registry.py``, with mergekit's names and defaults.
Every ``fn`` has the signature

    fn(base, models, model_params, params, *, generator=None, thresholds=None) -> MethodResult

where ``models`` are the non-base models for ``requires_base`` methods (``base`` is None where the
base is optional and the recipe names none: nuslerp, multislerp), every recipe input for methods
that ignore the base (linear, karcher, passthrough; ``base`` None, or for linear's statistics
only), and ``[v1]`` for slerp (``base`` is v0). Values arrive
resolved per tensor as plain floats in ``model_params`` (one ``model_params`` instance per model)
and ``params`` (the method's ``global_params``). ``generator`` feeds the random methods;
``thresholds`` are per-model magnitude thresholds for whole-model trimming (see
``select.MagnitudeHistogram``).

``inputs`` is mergekit's ``InputContract``: whether the method takes a base, and how many models
(counted as mergekit counts them: every recipe input, the base included); the recipe check refuses
a wrong count before any tensor is read. ``requires_base`` says whether the executor hands the base
separately (``base``) or among ``models``; a method whose base is optional gets ``base=None``
when the recipe names none.

Papers: task arithmetic arXiv:2212.04089, TIES arXiv:2306.01708, DARE arXiv:2311.03099,
Model Breadcrumbs arXiv:2312.06795, DELLA arXiv:2406.11617, SLERP (Shoemake 1985),
Model Stock arXiv:2403.19522, SCE arXiv:2408.07990, RAM arXiv:2601.13572, Karcher mean
arXiv:2603.04972; NuSLERP, Multi-SLERP, NearSwap and Arcee Fusion as mergekit defines them.

Run: python -c "from mergeline.merge.methods.registry import METHODS; print(sorted(METHODS))"
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, create_model

from mergeline.merge.methods.arcee_fusion import arcee_fusion
from mergeline.merge.methods.karcher import karcher
from mergeline.merge.methods.linear import linear
from mergeline.merge.methods.model_stock import model_stock
from mergeline.merge.methods.multislerp import multislerp
from mergeline.merge.methods.nearswap import nearswap
from mergeline.merge.methods.nuslerp import nuslerp
from mergeline.merge.methods.passthrough import passthrough
from mergeline.merge.methods.ram import ram, ramplus_tl
from mergeline.merge.methods.sce import sce
from mergeline.merge.methods.slerp import slerp
from mergeline.merge.methods.stats import MethodResult
from mergeline.merge.methods.ties import SignChoice, generalized_task_arithmetic


@dataclass(frozen=True)
class Inputs:
    """mergekit's ``InputContract``: the base policy and how many models a method takes.

    ``base``: "required", "optional" or "ignored" (a base named in the recipe is then one more
    ordinary input, as mergekit appends it). Counts are of all inputs (``min_models``,
    ``max_models``) and of the non-base ones (``min_others``, ``max_others``)."""

    base: str = "ignored"
    min_models: int = 1
    max_models: int | None = None
    min_others: int | None = None
    max_others: int | None = None

    def problem(self, n_models: int, has_base: bool) -> str | None:
        """Why ``n_models`` inputs (the base among them when ``has_base``) do not fit, or None."""
        if self.base == "required" and not has_base:
            return "needs 'base_model'"
        has_base = has_base and self.base != "ignored"
        others = n_models - int(has_base)
        for what, count, lo, hi in (("models", n_models, self.min_models, self.max_models),
                                    ("models besides the base", others, self.min_others, self.max_others)):
            if lo is None and hi is None:
                continue
            lo = lo or 0
            if count < lo or (hi is not None and count > hi):
                n = lo if lo == hi or count < lo else hi
                want = f"exactly {n}" if lo == hi else f"at least {n}" if count < lo else f"at most {n}"
                noun = what.replace("models", "model", 1) if n == 1 else what
                return f"takes {want} {noun}, got {count}"
        return None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., MethodResult]
    model_params: type[BaseModel]
    global_params: type[BaseModel]
    requires_base: bool
    randomized: bool
    inputs: Inputs = Inputs()


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


class ScaleParams(_Params):
    scale: float | None = None  # passthrough: multiply the one model's tensors (None: copy)


# --- global (mergekit's SHARED scope) parameters; defaults differ per method ---
class GTAGlobals(_Params):
    int8_mask: bool = False  # accepted for recipe compatibility; masks here are always bool
    normalize: bool = False
    rescale: bool = False
    lambda_: float = Field(1.0, alias="lambda")


def _gta_globals(name: str, normalize: bool, rescale: bool, extra: type[BaseModel] | None = None) -> type[BaseModel]:
    """GTAGlobals with this method's defaults for normalize and rescale (as mergekit's spec),
    plus `extra`'s fields (TIES: SignChoice)."""
    return create_model(f"{name}_globals", __base__=(GTAGlobals, extra) if extra else GTAGlobals,
                        normalize=(bool, normalize), rescale=(bool, rescale))


class LinearGlobals(_Params):
    normalize: bool = True


class SlerpGlobals(_Params):
    t: float


class NoGlobals(_Params):
    pass


class ModelStockGlobals(_Params):
    filter_wise: bool = False


class NuSlerpGlobals(_Params):
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


class MultiSlerpGlobals(_Params):
    normalize_weights: bool = True
    eps: float = Field(1e-8, ge=0)


class SceGlobals(_Params):
    int8_mask: bool = False  # accepted for recipe compatibility; masks here are always bool
    select_topk: float = Field(1.0, ge=0, le=1)


class KarcherGlobals(_Params):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, ge=0)


class NearSwapGlobals(_Params):
    t: float


class RamGlobals(_Params):
    epsilon: float = Field(1e-5, ge=0)


class RamPlusGlobals(RamGlobals):
    r: float = 0.1
    alpha: float = 0.2


def _gta(name: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: bool,
         model_params: type[BaseModel] = TaskVectorParams, extra: type[BaseModel] | None = None) -> MergeMethod:
    fn = partial(generalized_task_arithmetic, name=name, sparsification=sparsification, consensus=consensus)
    return MergeMethod(name, fn, model_params, _gta_globals(name, normalize, rescale, extra), requires_base=True,
                       randomized=sparsification in ("random", "della_magprune"), inputs=BASE)


BASE = Inputs(base="required")
BASE_AND_ONE = Inputs(base="required", min_models=2, max_models=2)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", linear, WeightParams, LinearGlobals, requires_base=False, randomized=False),
        MergeMethod("slerp", slerp, NoModelParams, SlerpGlobals, requires_base=True, randomized=False,
                    inputs=BASE_AND_ONE),
        _gta("task_arithmetic", None, consensus=False, normalize=False, rescale=False),
        _gta("ties", "magnitude", consensus=True, normalize=True, rescale=False, extra=SignChoice),
        _gta("dare_ties", "random", consensus=True, normalize=False, rescale=True),
        _gta("dare_linear", "random", consensus=False, normalize=False, rescale=True),
        _gta("breadcrumbs", "magnitude_outliers", False, False, False, BreadcrumbsParams),
        _gta("breadcrumbs_ties", "magnitude_outliers", True, False, False, BreadcrumbsParams),
        _gta("della", "della_magprune", consensus=True, normalize=True, rescale=True, model_params=DellaParams),
        _gta("della_linear", "della_magprune", False, False, True, DellaParams),
        MergeMethod("passthrough", passthrough, ScaleParams, NoGlobals, requires_base=False, randomized=False,
                    inputs=Inputs(max_models=1)),
        MergeMethod("model_stock", model_stock, NoModelParams, ModelStockGlobals, requires_base=True,
                    randomized=False, inputs=Inputs(base="required", min_models=3)),
        MergeMethod("nuslerp", nuslerp, WeightParams, NuSlerpGlobals, requires_base=True, randomized=False,
                    inputs=Inputs(base="optional", min_others=2, max_others=2)),
        MergeMethod("multislerp", multislerp, WeightParams, MultiSlerpGlobals, requires_base=True,
                    randomized=False, inputs=Inputs(base="optional", min_others=1)),
        MergeMethod("sce", sce, NoModelParams, SceGlobals, requires_base=True, randomized=False, inputs=BASE),
        MergeMethod("karcher", karcher, NoModelParams, KarcherGlobals, requires_base=False, randomized=False),
        MergeMethod("nearswap", nearswap, NoModelParams, NearSwapGlobals, requires_base=True, randomized=False,
                    inputs=BASE_AND_ONE),
        # random only above 1M entries, where the quantiles are estimated from a sample
        MergeMethod("arcee_fusion", arcee_fusion, NoModelParams, NoGlobals, requires_base=True,
                    randomized=True, inputs=BASE_AND_ONE),
        MergeMethod("ram", ram, NoModelParams, RamGlobals, requires_base=True, randomized=False, inputs=BASE),
        MergeMethod("ramplus_tl", ramplus_tl, NoModelParams, RamPlusGlobals, requires_base=True,
                    randomized=False, inputs=BASE),
    )
}


def parameter_keys(method: MergeMethod) -> set[str]:
    """The YAML keys (aliases included) a method takes, per model or global."""
    return {f.alias or n for cls in (method.model_params, method.global_params) for n, f in cls.model_fields.items()}


# Keys some method takes: on another method they are ignored with a warning (as mergekit ignores
# them); a key in no method is a typo and refused.
KNOWN_KEYS: frozenset[str] = frozenset().union(*(parameter_keys(m) for m in METHODS.values()))


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge_method {name!r}; allowed: {', '.join(sorted(METHODS))}") from None
