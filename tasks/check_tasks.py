"""Prefect task: the compatibility gate (merge.compat) before any merge is computed.

    from mergeline.tasks.check_tasks import check_compat
"""
from __future__ import annotations

from prefect import task

from mergeline.tasks.caching import code_version, key_of
from mergeline.tasks.recipes import input_hashes


def check_key(context, parameters: dict) -> str:
    return key_of("check", parameters["recipe"], input_hashes(parameters["recipe"]),
                  parameters.get("policy"), code_version("merge"))


@task(name="check", cache_key_fn=check_key, persist_result=True)
def check_compat(recipe: dict, policy: dict | None = None) -> dict:
    """The CompatReport of the recipe's models as a dict (status pass / warn / fail)."""
    from mergeline.merge.compat import check_recipe
    from mergeline.merge.recipe import load_recipe

    return check_recipe(load_recipe(recipe), policy).to_dict()
