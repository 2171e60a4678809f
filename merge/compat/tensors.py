"""Tensor check: names, shapes and dtypes from the safetensors headers alone.

No tensor data is read (`Checkpoint.infos()` parses only the JSON headers), so this is
instant even for a 70B checkpoint. Missing or extra tensors and shape mismatches fail, because
a merge would have to skip or broadcast them; a dtype difference only warns, since the merge
computes in one dtype anyway. One name difference only warns: an output head stored by one
model and tied to the input embedding in another (`merge.plan_types.TIED_HEADS`), which the merge
reads from the embedding, as mergekit does.

    python -c "from mergeline.merge.checkpoint import Checkpoint; print(len(Checkpoint('MODEL_DIR').infos()))"
"""
from __future__ import annotations

from mergeline.merge.checkpoint import TensorInfo
from mergeline.merge.plan_types import TIED_HEADS

from .report import Check

EXAMPLES = 5  # names shown in messages; details keep the full lists


def check_tensors(infos: dict[str, dict[str, TensorInfo]], base: str) -> list[Check]:
    """`infos` maps model name -> {tensor name -> TensorInfo}, the base under `base`."""
    ref = infos[base]
    others = {n: i for n, i in infos.items() if n != base}
    return [_names(ref, others), _shapes(ref, others), _dtypes(ref, others)]


def _names(ref, others) -> Check:
    per_model, tied = {}, {}
    for name, info in others.items():
        missing = sorted(set(ref) - set(info))
        extra = sorted(set(info) - set(ref))
        heads = [t for t in missing if _tied(t, info)] + [t for t in extra if _tied(t, ref)]
        missing, extra = [t for t in missing if t not in heads], [t for t in extra if t not in heads]
        if missing or extra:
            per_model[name] = {"missing": missing, "extra": extra}
        if heads:
            tied[name] = heads
    if not per_model and tied:
        ex = "; ".join(f"{n}: {', '.join(h)}" for n, h in tied.items())
        return Check("tensors.names", "warn", f"an output head stored in one model is tied to the embedding in "
                     f"the other (merged against the embedding): {ex}", {"tied_heads": tied})
    if not per_model:
        return Check("tensors.names", "pass", f"all models have the base's {len(ref)} tensors")
    parts = [f"{n}: {len(d['missing'])} missing {_ex(d['missing'])}, {len(d['extra'])} extra {_ex(d['extra'])}"
             for n, d in per_model.items()]
    return Check("tensors.names", "fail", "tensor names differ from the base: " + "; ".join(parts), per_model)


def _tied(head: str, infos) -> bool:
    """`head` is an output head that `infos` does not store but ties to its embedding."""
    return any(alt in infos for alt in TIED_HEADS.get(head, ()))


def _shapes(ref, others) -> Check:
    per_model = {}
    for name, info in others.items():
        bad = {t: {"base": list(ref[t].shape), name: list(info[t].shape)}
               for t in ref if t in info and ref[t].shape != info[t].shape}
        if bad:
            per_model[name] = bad
    if not per_model:
        return Check("tensors.shapes", "pass", "every shared tensor has the base's shape")
    parts = []
    for name, bad in per_model.items():
        t, shapes = next(iter(bad.items()))
        parts.append(f"{name}: {len(bad)} tensors, e.g. {t} {tuple(shapes[name])} vs base {tuple(shapes['base'])}")
    return Check("tensors.shapes", "fail", "shape mismatch: " + "; ".join(parts), per_model)


def _dtypes(ref, others) -> Check:
    per_model = {}
    for name, info in others.items():
        pairs = sorted({(ref[t].dtype, info[t].dtype) for t in ref if t in info and ref[t].dtype != info[t].dtype})
        if pairs:
            n = sum(1 for t in ref if t in info and ref[t].dtype != info[t].dtype)
            per_model[name] = {"tensors": n, "base_to_model": [f"{a}->{b}" for a, b in pairs]}
    if not per_model:
        dtypes = sorted({i.dtype for i in ref.values()})
        return Check("tensors.dtypes", "pass", f"dtypes match the base ({', '.join(dtypes)})", {"dtypes": dtypes})
    parts = [f"{n}: {d['tensors']} tensors ({', '.join(d['base_to_model'])})" for n, d in per_model.items()]
    return Check("tensors.dtypes", "warn", "dtype differs from the base: " + "; ".join(parts), per_model)


def _ex(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:EXAMPLES])
    return f"({shown}{', ...' if len(names) > EXAMPLES else ''})"
