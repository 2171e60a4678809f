"""Merge lineage: `lineage.json` and a Hugging Face model card beside every merged model.

mergekit leaves only the recipe in a README, with no hashes; here each merged folder records its
base and parents with their sources and content hashes (`merge.hashing.content_hash`), the recipe
and its hash, the method, seed, mergeline version, time and MLflow run id, and the compatibility
checks the merge ran (merge/compat): every verdict, and each failed check that was merged anyway
with who waived it (`--allow-crimes` or the policy), also stated at the top of the model card.
A parent that is itself a merge carries its own lineage, which is embedded at write time, so the
tree of a merge of merges survives even when the intermediate folders are gone.

    python -m mergeline.merge.lineage MODEL_DIR        # print the lineage tree as text
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mergeline.merge.hashing import content_hash, text_hash

LINEAGE_FILE = "lineage.json"
SCHEMA_VERSION = 1


def mergeline_version() -> str:
    try:
        return version("mergeline")
    except PackageNotFoundError:
        return "0+unknown"


def recipe_hash(recipe: dict) -> str:
    """Hash of the recipe's canonical JSON: key order and YAML formatting do not matter."""
    return text_hash(json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str))


def load_lineage(folder: str | Path) -> dict | None:
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def describe_input(name: str, ref: str, path: str | Path) -> dict:
    """One parent (or the base): where it came from, what it is, and its own lineage if it is a
    merge."""
    path = Path(path)
    entry = {"name": name, "source": ref, "path": str(path.resolve()),
             "content_hash": content_hash(path)}
    parent_lineage = load_lineage(path)
    if parent_lineage is not None:
        entry["lineage"] = parent_lineage
    return entry


def build_lineage(*, name: str, model_dir: str | Path, recipe: dict, method: str,
                  base: dict | None, parents: list[dict], seed: int = 0,
                  mlflow_run_id: str | None = None, extra: dict | None = None,
                  checks: dict | None = None) -> dict:
    """The lineage record of the merged model in `model_dir` (inputs from `describe_input`);
    `checks`: the compatibility checks of the merge (`merge.compat.gate.summary`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "content_hash": content_hash(model_dir),
        "method": method,
        "seed": seed,
        "recipe": recipe,
        "recipe_hash": recipe_hash(recipe),
        "base": base,
        "parents": parents,
        "mergeline_version": mergeline_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlflow_run_id": mlflow_run_id,
        "checks": checks,
        **(extra or {}),
    }


def write_lineage(model_dir: str | Path, lineage: dict) -> Path:
    """Write lineage.json and the model card README.md (each via a temp file, then renamed)."""
    model_dir = Path(model_dir)
    _write_atomic(model_dir / LINEAGE_FILE, json.dumps(lineage, indent=2, default=str) + "\n")
    model_card(lineage).save(str(model_dir / "README.md.tmp"))
    os.replace(model_dir / "README.md.tmp", model_dir / "README.md")
    return model_dir / LINEAGE_FILE


def set_run_id(model_dir: str | Path, run_id: str) -> None:
    """Record the MLflow run id once it is known (e.g. a cached merge logged by a later run)."""
    lineage = load_lineage(model_dir)
    if lineage is not None and lineage.get("mlflow_run_id") != run_id:
        lineage["mlflow_run_id"] = run_id
        write_lineage(model_dir, lineage)


def model_card(lineage: dict):
    """A huggingface_hub ModelCard with `base_model`, tags and the recipe."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    base = lineage.get("base") or {}
    parents = lineage.get("parents") or []
    data = ModelCardData(
        base_model=base.get("source") or None,
        tags=["merge", "mergeline", lineage.get("method", "merge")],
        library_name="transformers",
    )
    rows = "\n".join(f"| {p['name']} | `{p['source']}` | `{p['content_hash'][:19]}` |" for p in parents)
    body = f"""
# {lineage.get('name', 'merged model')}
{_checks_section(lineage.get('checks'))}
A merge of {len(parents)} model(s) with **{lineage.get('method')}**, made by mergeline
{lineage.get('mergeline_version')} on {lineage.get('created')}.

- base: `{base.get('source')}` (`{base.get('content_hash', '')[:19]}`)
- content hash: `{lineage.get('content_hash')}`
- recipe hash: `{lineage.get('recipe_hash')}`; seed {lineage.get('seed')}
- MLflow run: `{lineage.get('mlflow_run_id')}`

| parent | source | content hash |
|---|---|---|
{rows}

## Recipe

```yaml
{yaml.safe_dump(lineage.get('recipe'), sort_keys=False).strip()}
```

The full lineage, with the parents' own lineage when they are merges, is in `lineage.json`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _checks_section(checks: dict | None) -> str:
    """The model card's statement of the compatibility checks: failures merged anyway come first."""
    if not checks:  # not recorded (e.g. checked by the pipeline before the merge)
        return ""
    waived = checks.get("waived") or []
    crimes = [w for w in waived if w.get("by") != "policy"]
    lines = []
    if crimes:
        lines += [f"> **Warning: merged with `{crimes[0]['by']}`.** {len(crimes)} compatibility check(s) failed "
                  "and were waived; the merge may be meaningless:", ">"]
        lines += [f"> - `{w['name']}`: {w['message']}" for w in crimes]
        lines.append("")
    verdict = f"**fail**, merged anyway with `{crimes[0]['by']}`" if crimes else f"**{checks.get('status')}**"
    lines.append(f"Compatibility checks: {verdict}.")
    by_policy = [w for w in waived if w.get("by") == "policy"]
    if by_policy:
        lines.append("Waived by the compatibility policy: " + ", ".join(f"`{w['name']}` ({w['status']})" for w in by_policy) + ".")
    warned = [c for c in checks.get("checks") or [] if c["status"] == "warn"]
    if warned:
        lines.append("Warnings: " + "; ".join(f"`{c['name']}`: {c['message']}" for c in warned))
    return "\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the tree


def tree(lineage: dict) -> dict:
    """Nested {"label", "hash", "children"} nodes, following parents that are merges (from the
    embedded lineage, else from the parent's folder if it still has a lineage.json)."""
    children = []
    base = lineage.get("base")
    if base:
        children.append(_input_node(base, role="base"))
    for p in lineage.get("parents") or []:
        if base and p.get("content_hash") == base.get("content_hash"):
            continue  # the base listed again among the models (mergekit adds it)
        children.append(_input_node(p, role="parent"))
    return {"label": f"{lineage.get('name')} [{lineage.get('method')}]",
            "hash": lineage.get("content_hash"), "children": children}


def _input_node(entry: dict, role: str) -> dict:
    sub = entry.get("lineage")
    if sub is None and entry.get("path"):
        try:
            sub = load_lineage(entry["path"])
        except (OSError, ValueError):
            sub = None
    label = f"{role}: {entry.get('name')} ({entry.get('source')})"
    if sub is not None:
        node = tree(sub)
        node["label"] = f"{label} <- {node['label']}"
        return node
    return {"label": label, "hash": entry.get("content_hash"), "children": []}


def format_tree(node: dict, prefix: str = "") -> str:
    lines = [f"{node['label']}  {(node.get('hash') or '')[:19]}"] if not prefix else []
    kids = node["children"]
    for i, child in enumerate(kids):
        last = i == len(kids) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{child['label']}  {(child.get('hash') or '')[:19]}")
        sub = format_tree(child, prefix + ("    " if last else "│   "))
        if sub:
            lines.append(sub)
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    lin = load_lineage(sys.argv[1])
    if lin is None:
        sys.exit(f"{sys.argv[1]}: no {LINEAGE_FILE}")
    print(format_tree(tree(lin)))
