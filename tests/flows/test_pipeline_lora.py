"""The demo pipeline with its fine-tunes given as LoRA adapters (`BASE+ADAPTER`).

Each zoo fine-tune moves only the token embedding, so its SVD gives a PEFT embedding adapter
(at the delta's full rank) that reproduces it to float32 rounding. The pipeline then checks,
merges and evaluates the adapters (lm-eval runs them through `peft=`), and must reach the same
decision as the demo, with a merged model equal to the merge of the full fine-tunes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values
from mergeline.zoo.merges import demo_recipe
from mergeline.flows.pipeline import run_pipeline
from mergeline.merge.checkpoint import Checkpoint
from mergeline.merge.executor import run_merge


def adapter_from_finetune(base: Path, finetune: Path, out: Path) -> Path:
    """A PEFT embedding LoRA equal to `finetune - base` (which must differ only in wte)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    b, f = Checkpoint(base), Checkpoint(finetune)
    assert [n for n in b.names() if not torch.equal(b.get(n), f.get(n))] == ["transformer.wte.weight"]
    delta = (f.get("transformer.wte.weight").double() - b.get("transformer.wte.weight").double()).T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = int((s > s[0] * 1e-6).sum())
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=r, target_modules=["wte"]))  # scale alpha / r = 1
    wte = model.base_model.model.transformer.wte
    wte.lora_embedding_A["default"].data = (s[:r].sqrt()[:, None] * vh[:r]).float()  # B @ A = delta^T
    wte.lora_embedding_B["default"].data = (u[:, :r] * s[:r].sqrt()).float()
    model.save_pretrained(out)
    return out


def test_demo_pipeline_on_lora_adapters(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    values = zoo_values(zoo)
    for skill, folder in zoo.finetunes.items():
        values[skill] = f"{zoo.base}+{adapter_from_finetune(zoo.base, folder, tmp_path / 'adapters' / skill)}"
    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", tmp_path / "work", values)

    summary = run_pipeline(path)
    assert summary["decision"] == "GO", summary
    report = json.loads(Path(summary["reports"]["json"]).read_text())
    assert report["inputs"]["models"]["addition"]["path"] == values["addition"]

    # the merged model is the merge of the full fine-tunes (the adapters reproduce them)
    recipe = demo_recipe("ties", zoo.base, zoo.finetunes)  # the demo pipeline's own TIES recipe
    full = Checkpoint(run_merge(recipe, tmp_path / "full", device="cpu", progress=False).path)
    ours = Checkpoint(summary["models"]["ties"])
    for name in full.names():
        torch.testing.assert_close(ours.get(name), full.get(name), rtol=0, atol=1e-6)
    lineage = json.loads((Path(summary["models"]["ties"]) / "lineage.json").read_text())
    assert {p["path"] for p in lineage["parents"]} == {values[s] for s in zoo.finetunes}
