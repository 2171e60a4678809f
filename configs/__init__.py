"""The default configs: gate and compatibility policies, the eval suite, the demo pipeline and
example recipes. They ship as package data, so an installed mergeline finds them without a
checkout.

    python -c "from mergeline.configs import DIR; print(sorted(p.name for p in DIR.glob('*.yaml')))"
"""
from pathlib import Path

DIR = Path(__file__).resolve().parent
