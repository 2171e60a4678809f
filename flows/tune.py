"""`mergeline tune PIPELINE`: search a recipe's weights and densities on validation items, then
send the best recipe through the normal pipeline, judged on test items, beside the untuned one.

1. Search (the Prefect flow `mergeline-tune`). Optuna (Akiba et al. 2019; TPE by default,
   Bergstra et al. 2011; CMA-ES with `--sampler cmaes`, Hansen 2016) proposes per-model weights
   and densities (tasks/tune_tasks.py). Each trial is the pipeline's own tasks: `merge_model`
   then `evaluate_model` on the suite's validation part (evaluation/splits.py), both cached by
   content, so a point seen before costs nothing. A batch of `runner.max_workers` trials runs at
   once on the pipeline's task runner. The objective is the gate's rules as one number
   (evaluation/objective.py). Trial 0 is the recipe's own point (when it lies on the grid), so
   the best is never worse on validation than the untuned recipe, and the report can set the
   gain on validation against the difference on test items: a gain that does not hold there is
   the search fitting the validation items, and the report says so.
   Each trial is an MLflow child run of a `tune:NAME` parent run.
   The study lives in WORKDIR/tune/optuna.db (SQLite; `--storage memory` for none), never in the
   MLflow or Prefect database; a rerun resumes it up to `--trials` finished trials.
2. The best recipe is written as a plain mergekit recipe, WORKDIR/tune/STUDY/best_recipe.yaml,
   with a pipeline file beside it: the same pipeline with that recipe, the suite scoring its test
   part, and the original recipe as the baseline `untuned`.
3. That pipeline runs (flows/pipeline.py `run_pipeline`): check, merges, evaluation on test
   items, gate, registry. WORKDIR/tune/STUDY/tune_report.md says which items did what.

Tuning on the items that then judge the result would let the search fit the gate's own
evidence, so a suite without `splits:` is refused unless `--allow-no-split` (recorded).

A TIES recipe with `parameters: {sign_source: validation}` gets the validation-guided sign search
instead of step 1 (flows/sign_search.py; Yadav et al. 2023, sec. 7): per layer group, the
magnitude-elected signs or one fine-tune's own, greedily, each candidate a trial as above. Its
best_recipe.yaml records the choices (`sign_choices`), and the baseline `untuned` is the plain
election.

    mergeline tune configs/pipeline_demo.yaml --trials 20
    mergeline tune WORKDIR/pipeline.yaml --minutes 30 --sampler cmaes
    mergeline tune PIPELINE_WITH_SIGN_SOURCE.yaml          # sign_source: validation in its recipe
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import yaml
from prefect import flow

from mergeline.flows import sign_search as signs
from mergeline.flows.pipeline import candidates, run_pipeline, task_runner
from mergeline.flows.pipeline_config import Pipeline, PipelineError, check_retention_names, load_pipeline
from mergeline.flows.progress import say
from mergeline.flows.servers import check_dask, check_servers, default_environment, resolve_tracking
from mergeline.flows.workdir import workdir_lock
from mergeline.tasks import tracking
from mergeline.tasks.caching import key_of
from mergeline.tasks.eval_tasks import combine, evaluate_model
from mergeline.tasks.merge_tasks import merge_key, merge_model
from mergeline.tasks.recipes import base_name, inputs
from mergeline.tasks.tune_tasks import STEP, apply, log_trial, recipe_point, space

SAMPLERS = ("tpe", "cmaes")
STORAGES = ("sqlite", "memory")
UNTUNED = "untuned"


class TuneError(PipelineError):
    """A tuning request that cannot be run (exit 2); the message names the option or key."""


def _sampler(kind: str, seed: int):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed)


def _suites(pipe: Pipeline, allow_no_split: bool):
    """(validation suite, test suite, split note) for the pipeline's suite."""
    from mergeline.evaluation.splits import describe
    from mergeline.evaluation.suite import check_ready, load_suite

    suite = load_suite(pipe.path(pipe.eval_suite) if isinstance(pipe.eval_suite, str) else pipe.eval_suite,
                       pipe.placeholders)
    check_ready(suite)
    if suite.splits is None:
        if not allow_no_split:
            raise TuneError(f"{pipe.eval_suite if isinstance(pipe.eval_suite, str) else 'eval_suite'}: "
                            "declares no splits, so tuning would fit the items the gate then judges; add "
                            "e.g. `splits: {validation: [0, 20], test: [20, 40]}` (and drop `limit`), "
                            "or pass --allow-no-split to tune on the gate's items anyway (recorded)")
        note = ("NO SPLIT (--allow-no-split): the same items were used to tune and to judge; "
                "the gate's evidence is not independent of the search")
        return suite, suite, {"tuning": describe(suite), "gate": describe(suite), "warning": note}
    val, test = suite.for_part("validation"), suite.for_part("test")
    return val, test, {"tuning": describe(val), "gate": describe(test)}


def study_name(pipe: Pipeline, main: dict, val_suite, policy, kind: str, seed: int, layer_groups: int = 1) -> str:
    """Same recipe, suite, policy, space and sampler -> same study (resumed); else a new one."""
    h = key_of("tune", main, val_suite.model_dump(mode="json"), policy, space(main, layer_groups), STEP, kind, seed)
    return f"{pipe.name}-{kind}-{h[:10]}"


@flow(name="mergeline-tune", log_prints=True)
def tune_flow(pipeline: str, trials: int, minutes: float | None = None, sampler: str = "tpe",
              seed: int = 0, storage: str = "sqlite", allow_no_split: bool = False,
              started: float | None = None, sign_block: int | None = None, layer_groups: int = 1) -> dict:
    """Run the search; returns the study's trials, the best recipe and the tuned pipeline file.
    `layer_groups` K > 1: each weight and density a gradient of K values over the layers.
    The time budget runs from `started` (epoch seconds; default: now). A TIES recipe asking for
    `sign_source: validation` gets the greedy sign search instead (flows/sign_search.py; blocks
    of `sign_block` layers; `trials`, `minutes`, `sampler` and `storage` do not apply)."""
    started = started or time.time()
    pipe = load_pipeline(pipeline)
    work = pipe.workdir_path
    track = resolve_tracking(work, pipe.tracking.mlflow_tracking_uri, pipe.tracking.prefect_api_url)
    primary, recipes = candidates(pipe)
    main = recipes[primary]
    policy = pipe.load(pipe.gate_policy)[0] or {}
    val, test, splits_note = _suites(pipe, allow_no_split)
    by_signs = signs.wants_signs(main)
    if by_signs:
        signs.check_recipe(main)
        name = f"{pipe.name}-signs-{key_of('signs', main, val.model_dump(mode='json'), policy, sign_block)[:10]}"
    else:
        dims = space(main, layer_groups)
        name = study_name(pipe, main, val, policy, sampler, seed, layer_groups)
    out_dir = work / "tune" / name
    out_dir.mkdir(parents=True, exist_ok=True)

    c = tracking.client(track.mlflow_uri)
    exp = tracking.ensure_experiment(c, pipe.tracking.experiment, track.artifact_location)
    parent = tracking.start_run(c, exp, f"tune:{pipe.name}", tags={
        "mergeline.pipeline": str(Path(pipeline).resolve()), "mergeline.study": name,
        "mergeline.split.tuning": splits_note["tuning"], "mergeline.split.gate": splits_note["gate"],
        **({"mergeline.override": "--allow-no-split"} if "warning" in splits_note else {})})
    try:
        if by_signs:
            tracking.log_params(c, parent, {"search": "signs", "sign_block": sign_block, "recipe": main})
            search = _sign_search(pipe, main, primary, val, policy, sign_block, c, parent)
            best = {"trial": search.pop("best_number"), "objective": search.pop("best_value"),
                    "values": search.pop("best_values")}
            best_recipe, baseline, url = signs.with_choices(main, best["values"]), signs.untuned(main), None
            kind = "signs"
            search["untuned"] = _first(search["trials_run"])  # all groups elected
        else:
            start = recipe_point(main, layer_groups)
            search, best, url = _optuna(pipe, name, main, primary, dims, val, policy, trials, minutes, sampler,
                                        seed, storage, started, c, parent, start)
            best_recipe, baseline, kind = apply(main, best["values"]), main, sampler
            search["untuned"] = _at_point(search["all_trials"], start)
    except BaseException:
        c.set_terminated(parent, "FAILED")
        raise
    best_path = _write(out_dir / "best_recipe.yaml", yaml.safe_dump(best_recipe, sort_keys=False))
    tuned = _write(out_dir / "pipeline.yaml", yaml.safe_dump(
        tuned_pipeline(pipe, best_path, baseline, primary, test), sort_keys=False))
    tracking.log_metrics(c, parent, {"best_objective": best["objective"], "best_trial": best["trial"]})
    tracking.set_tags(c, parent, {f"mergeline.best.{k}": v for k, v in best["values"].items()})
    tracking.log_artifact(c, parent, best_path, "tune")
    c.set_terminated(parent, "FINISHED")
    return {"study": name, "storage": url or "memory", "sampler": kind, "seed": seed,
            "mlflow_run_id": parent, "mlflow_uri": track.mlflow_uri, "splits": splits_note, "best": best,
            "best_recipe": str(best_path), "pipeline": str(tuned), "out_dir": str(out_dir), **search}


def _first(rows: list[dict]) -> dict | None:
    """The sign search's first candidate (every group elected: the untuned merge) on validation."""
    row = rows[0] if rows else None
    return {"trial": row["trial"], "objective": row["objective"]} if row and "objective" in row else None


def _at_point(trials: list[dict], point: dict | None) -> dict | None:
    """The finished trial at the recipe's own point (the untuned recipe) on validation, if any."""
    for t in trials:
        if point and t["state"] == "COMPLETE" and t["values"].keys() == point.keys() and all(
                abs(t["values"][k] - v) < 1e-9 for k, v in point.items()):
            return {"trial": t["trial"], "objective": t["objective"]}
    return None


def _optuna(pipe: Pipeline, name: str, main: dict, primary: str, dims: dict, val, policy: dict, trials: int,
            minutes: float | None, sampler: str, seed: int, storage: str, started: float, c, parent: str,
            start: dict | None):
    """The weight/density search: (search summary, best {trial, objective, values, ...}, storage url)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines instead
    work = pipe.workdir_path
    url = f"sqlite:///{work / 'tune' / 'optuna.db'}" if storage == "sqlite" else None
    study = optuna.create_study(study_name=name, storage=url, sampler=_sampler(sampler, seed),
                                direction="maximize", load_if_exists=True)
    _requeue_interrupted(study)
    if not study.trials and start is not None:  # trial 0: the untuned recipe, the reference
        study.enqueue_trial(start)
    if study.trials:  # resumed: a sampler seeded as at the start would propose the same points again
        study.sampler = _sampler(sampler, seed + len(study.trials))
    tracking.log_params(c, parent, {"sampler": sampler, "seed": seed, "trials": trials, "minutes": minutes,
                                    "storage": url or "memory", "space": {k: list(v) for k, v in dims.items()},
                                    "step": STEP, "recipe": main})
    deadline = started + minutes * 60 if minutes else None
    search = _search(pipe, study, main, primary, dims, val, policy, trials, deadline, c, parent)
    b = study.best_trial
    tracking.log_metrics(c, parent, {f"best.{k}": v for k, v in b.params.items()})
    return search, {"trial": b.number, "objective": b.value, "values": b.params, **(b.user_attrs or {})}, url


class _Trials:
    """Runs trial recipes as the pipeline's own tasks: `merge_model`, then `evaluate_model` on the
    validation items (both cached by content), scored by the objective; each trial is logged as
    an MLflow child run. The base's and fine-tunes' validation scores are evaluated first."""

    def __init__(self, pipe: Pipeline, main: dict, primary: str, val, policy: dict, c, parent: str):
        work = pipe.workdir_path
        self.pipe, self.primary, self.val, self.policy, self.c, self.parent = pipe, primary, val, policy, c, parent
        self.opts = dict(result_storage=work / "prefect-results")
        self.val_dict, self.cache = val.model_dump(mode="json"), str(work / "score-cache")
        folders, base = inputs(main), base_name(main)
        check_retention_names(val, folders, base)
        t0 = time.time()
        refs = [self._evaluate("base", folders[base], "base")]
        refs += [self._evaluate(n, folders[n], "finetune") for n in val.retention]
        self.ref_tables = [f.result() for f in refs]
        self.ref_seconds = time.time() - t0

    def _evaluate(self, name, path, role):
        return evaluate_model.with_options(**self.opts).submit(name=name, path=str(path), role=role,
                                                               suite=self.val_dict, cache_dir=self.cache)

    def run(self, batch: list[tuple[int, dict, dict]]) -> list[dict]:
        """[(trial number, values, recipe)] -> one dict per trial, in order: trial, values, cached,
        error, result (the objective's dict, None when the trial failed). Merges of a batch run
        side by side; each evaluation starts as soon as its merge is done."""
        from mergeline.evaluation.objective import objective

        pipe, work = self.pipe, self.pipe.workdir_path
        merges = [(n, values, recipe, merge_model.with_options(**self.opts).submit(
            name=self.primary, recipe=recipe, models_dir=str(work / "models"), key=merge_key(recipe, pipe.merge.seed),
            seed=pipe.merge.seed, device=pipe.merge.device, out_shard_size=pipe.merge.out_shard_size,
            allow_pickle=pipe.merge.allow_pickle, mlflow_run_id=self.parent)) for n, values, recipe in batch]
        running = []
        for n, values, recipe, fut in merges:
            try:
                m = fut.result()
            except Exception as e:  # noqa: BLE001 - one failed point must not end the search
                running.append((n, values, recipe, None, None, f"merge: {type(e).__name__}: {e}"))
                continue
            reused = m.reused or fut.state.name == "Cached"
            running.append((n, values, recipe, self._evaluate(self.primary, m.path, "candidate"), reused, None))
        out = []
        for n, values, recipe, ev, reused, error in running:
            result = None
            if ev is not None:
                try:
                    table = combine(self.ref_tables + [ev.result()])
                    result = objective(table, self.val, self.policy, self.primary)
                except Exception as e:  # noqa: BLE001
                    error = f"evaluate: {type(e).__name__}: {e}"
            # served from the caches: an evaluation cached (the same merged content seen before)
            cached = ev is not None and ev.state.name == "Cached"
            log_trial(self.c, self.parent, n, values, recipe, result, cached, error)
            out.append({"trial": n, "values": values, "cached": cached, "merge_reused": bool(reused),
                        "error": error, "result": result})
        return out


def _row(t: dict) -> dict:
    """A trial as tune_report.json lists it."""
    r = t["result"]
    return {k: t[k] for k in ("trial", "values", "cached", "error")} | (
        {"objective": r["value"], "mean_retention": r["mean_retention"],
         "worst_regression": r["worst_regression"], "feasible": r["feasible"]} if r else {})


def _requeue_interrupted(study) -> None:
    """Trials left RUNNING by a stopped run (we hold the workdir's lock, so no live process owns
    them) are marked failed and their points asked again first: the rerun redoes them, its
    merges and evaluations served from the caches where the stopped run had finished them."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:  # stopped before its point was drawn: nothing to redo
            study.enqueue_trial(t.params, skip_if_exists=False)
    if stale:
        say(f"tune: {len(stale)} trials interrupted by an earlier run are redone at their points")


def _search(pipe: Pipeline, study, main: dict, primary: str, dims: dict, val, policy: dict,
            trials: int, deadline: float | None, c, parent: str) -> dict:
    """Ask/tell in batches of `runner.max_workers` trials until `trials` are finished or the
    `deadline` (epoch seconds) has passed (a batch in flight finishes)."""
    from optuna.trial import TrialState

    say(f"tune: study {study.study_name}, {len(dims)} parameters, validation part of the suite")
    runner = _Trials(pipe, main, primary, val, policy, c, parent)

    def finished() -> int:
        return sum(t.state == TrialState.COMPLETE for t in study.trials)

    start_done, new, cached_trials, failed = finished(), [], 0, 0
    t1 = time.time()  # the references are evaluated: from here on, trials only
    if start_done >= trials:
        say(f"tune: the study already has {start_done} finished trials (--trials {trials}); nothing to run")
    while finished() < trials and (deadline is None or time.time() < deadline):
        asked, batch = {}, []
        for _ in range(min(pipe.runner.max_workers, trials - finished())):
            t = study.ask()
            values = {k: t.suggest_float(k, lo, hi, step=STEP) for k, (lo, hi) in dims.items()}
            asked[t.number] = t
            batch.append((t.number, values, apply(main, values)))
        for row in runner.run(batch):
            t, result = asked[row["trial"]], row["result"]
            if result is None:
                study.tell(t, state=TrialState.FAIL)
                failed += 1
                say(f"trial {t.number}: FAILED ({row['error']})")
            else:
                for k in ("mean_retention", "worst_regression", "feasible"):
                    t.set_user_attr(k, result[k])
                study.tell(t, result["value"])
                cached_trials += row["cached"]
                say(_progress(f"trial {t.number} ({finished()}/{trials})", result, row["cached"],
                              f"best {study.best_trial.value:.3f} at trial {study.best_trial.number}"))
            new.append(_row(row))
        if failed and failed >= max(3, len(new)):
            raise RuntimeError(f"tune: every trial so far failed; last: {new[-1]['error']}")
    if finished() == 0:
        raise TuneError("tune: no trial finished within the budget (raise --minutes or --trials)")
    return {"trials_run": new, "trials_cached": cached_trials, "trials_failed": failed,
            "trials_finished": finished(), "seconds": {"references": round(runner.ref_seconds, 2),
                                                       "trials": round(time.time() - t1, 2)},
            "budget_spent": deadline is not None and time.time() >= deadline,
            "all_trials": [{"trial": t.number, "state": t.state.name, "objective": t.value, "values": t.params}
                           for t in study.trials]}


def _sign_search(pipe: Pipeline, main: dict, primary: str, val, policy: dict, block: int | None,
                 c, parent: str) -> dict:
    """The greedy sign search (flows/sign_search.py) on the pipeline's tasks, `runner.max_workers`
    candidates at a time; returns the search's summary with the best sign table."""
    runner = _Trials(pipe, main, primary, val, policy, c, parent)
    group_names, models = signs.groups(signs.layer_count(main), block), signs.finetunes(main)
    say(f"tune: sign search over {len(group_names)} groups ({', '.join(group_names)}) x "
        f"{len(models)} fine-tunes' own signs, validation part of the suite")
    rows: list[dict] = []
    t1 = time.time()

    def score(tables: list[dict]) -> list[float | None]:
        out = []
        for i in range(0, len(tables), pipe.runner.max_workers):
            chunk = tables[i:i + pipe.runner.max_workers]
            done = runner.run([(len(rows) + j, t, signs.with_choices(main, t)) for j, t in enumerate(chunk)])
            rows.extend(done)
            out += [d["result"]["value"] if d["result"] else None for d in done]
        return out

    def report(table, value, best, best_value):
        row = next(r for r in reversed(rows) if r["values"] is table)
        changed = [f"{g}={m}" for g, m in table.items() if m != signs.ELECTED] or ["all elected"]
        label = f"signs {', '.join(changed)} ({row['trial'] + 1}/{1 + len(group_names) * len(models)})"
        if value is None:
            say(f"{label}: FAILED ({row['error']})")
            return
        shown = [f"{g}={m}" for g, m in best.items() if m != signs.ELECTED] or ["all elected"]
        say(_progress(label, row["result"], row["cached"], f"best {best_value:.3f} ({', '.join(shown)})"))

    best, value = signs.greedy(group_names, models, score, report)
    number = next(r["trial"] for r in rows if r["values"] == best and r["result"])
    return {"best_values": best, "best_value": value, "best_number": number,
            "trials_run": [_row(r) for r in rows], "trials_cached": sum(r["cached"] for r in rows),
            "trials_failed": sum(r["result"] is None for r in rows), "trials_finished": sum(
                r["result"] is not None for r in rows),
            "seconds": {"references": round(runner.ref_seconds, 2), "trials": round(time.time() - t1, 2)},
            "budget_spent": False, "groups": group_names}


def _progress(label: str, result: dict, cached: bool, best: str) -> str:
    """trial 3 (4/20): objective 0.912 (mean retention 0.912, worst regression -0.020); best 0.950 at trial 1"""
    worst = result["worst_regression"]
    details = [f"mean retention {result['mean_retention']:.3f}"]
    details += [f"worst regression {worst:+.3f}"] if worst is not None else []
    details += ["cached"] if cached else []
    return f"{label}: objective {result['value']:.3f} ({', '.join(details)}); {best}"


def tuned_pipeline(pipe: Pipeline, best_path: Path, main: dict, primary: str, test_suite) -> dict:
    """The pipeline file for the final run: the tuned recipe, the suite scoring its test part
    (inline, so nothing can make it score validation), the untuned recipe `main` as a baseline,
    and every path absolute."""
    data = pipe.model_dump(mode="json", exclude={"source_dir"}, exclude_none=True)
    data["name"] = f"{pipe.name}-tuned"
    data["workdir"] = str(pipe.workdir_path)
    data["recipe"] = str(best_path)
    data["primary"] = primary
    data["eval_suite"] = test_suite.model_dump(mode="json", exclude_none=True)
    for key in ("gate_policy", "compat_policy"):
        if isinstance(data.get(key), str):
            data[key] = str(pipe.path(data[key]).resolve())
    baselines = []
    for b in data.get("baselines", []):
        if isinstance(b, dict) and isinstance(b.get("recipe"), str):
            b = {**b, "recipe": str(pipe.path(b["recipe"]).resolve())}
        if (b if isinstance(b, str) else b["name"]) != UNTUNED:
            baselines.append(b)
    data["baselines"] = baselines + [{"name": UNTUNED, "recipe": main}]
    return data


def _write(path: Path, text: str) -> Path:
    """Write whole or not at all (staged, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_tune(path: str | Path, trials: int = 20, minutes: float | None = None, sampler: str = "tpe",
             seed: int = 0, storage: str = "sqlite", allow_no_split: bool = False,
             sign_block: int | None = None, layer_groups: int = 1) -> dict:
    """Hold the workdir's lock, search, then run the tuned pipeline; returns {search, final, report,
    test (tuned vs untuned on test items), held_out (did the validation gain hold there)}.
    `sign_block`: layers per group of the sign search (a recipe with `sign_source: validation`);
    `layer_groups`: points of each weight's and density's gradient over the layers (1: one value)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if sampler not in SAMPLERS:
        raise TuneError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if storage not in STORAGES:
        raise TuneError(f"--storage {storage!r}: choose one of {', '.join(STORAGES)}")
    if trials < 1 or (minutes is not None and minutes <= 0):
        raise TuneError("--trials must be >= 1 and --minutes > 0")
    started = time.time()  # --minutes counts from here
    default_environment()
    pipe = load_pipeline(path)
    with workdir_lock(pipe.workdir_path):
        api = PREFECT_API_URL.value() or None
        track = resolve_tracking(pipe.workdir_path, pipe.tracking.mlflow_tracking_uri,
                                 pipe.tracking.prefect_api_url or api)
        check_servers(track)
        primary, recipes = candidates(pipe)
        by_signs = signs.wants_signs(recipes[primary])
        try:  # a recipe that cannot be tuned fails here, before any server starts
            if by_signs and layer_groups != 1:
                raise ValueError("--layer-groups applies to the weight/density search; this recipe asks for "
                                 "the sign search (sign_source: validation), whose groups --sign-block sets")
            signs.check_recipe(recipes[primary]) if by_signs else space(recipes[primary], layer_groups)
        except ValueError as e:
            raise TuneError(f"{pipe.name}: {e}") from None
        if pipe.runner.kind == "dask" and pipe.runner.dask_address:  # worker processes, maybe elsewhere
            check_dask(pipe.runner.dask_address, track,
                       [pipe.workdir_path, *(str(p) for p in inputs(recipes[primary]).values())])
        _suites(pipe, allow_no_split)
        say(f"tune {pipe.name}: workdir {pipe.workdir_path}, " + (
            "validation-guided TIES signs (sign_source: validation)" if by_signs else
            f"{sampler}, budget {trials} trials" + (f" or {minutes:g} min" if minutes else "")
            + (f", weights and densities as gradients of {layer_groups} points over the layers"
               if layer_groups > 1 else "")))
        flow_fn = tune_flow.with_options(task_runner=task_runner(pipe))
        settings = (temporary_settings({PREFECT_API_URL: track.prefect_api_url})
                    if track.prefect_api_url and track.prefect_api_url != api else nullcontext())
        with settings:
            search = flow_fn(pipeline=str(Path(path).resolve()), trials=trials, minutes=minutes,
                             sampler=sampler, seed=seed, storage=storage, allow_no_split=allow_no_split,
                             started=started, sign_block=sign_block, layer_groups=layer_groups)
            say(f"tune: best trial {search['best']['trial']} (objective {search['best']['objective']:.3f}); "
                f"judging it on the test items: {search['pipeline']}")
            final = run_pipeline(search["pipeline"])
    report, cmp, verdict = write_report(search, final)
    c = tracking.client(search["mlflow_uri"])
    tracking.set_tags(c, search["mlflow_run_id"], {"mergeline.final_run_id": final["mlflow_run_id"],
                                                   "mergeline.decision": final["decision"],
                                                   "mergeline.held_out": verdict["verdict"]})
    if verdict["validation_gain"] is not None:
        tracking.log_metrics(c, search["mlflow_run_id"], {"validation_gain": verdict["validation_gain"]})
    return {"search": search, "final": final, "report": str(report), "test": cmp, "held_out": verdict}


def comparison(final: dict) -> dict:
    """Tuned vs untuned on the test items, from the final pipeline's report.json (none when the
    compatibility gate stopped the run before any merge)."""
    if not (final.get("reports") or {}).get("json"):
        return {"primary": None, "tuned": {}, "untuned": {}, "difference": None, "difference_interval": None,
                "suite_part": None, "splits": None}
    rep = json.loads(Path(final["reports"]["json"]).read_text())
    primary = rep["primary"]
    row = next((r for r in rep["baselines"]["comparisons"] if r["baseline"] == UNTUNED), None)
    summaries = {n: c.get("summary", {}) for n, c in rep["candidates"].items()}
    return {"primary": primary, "tuned": summaries.get(primary, {}), "untuned": summaries.get(UNTUNED, {}),
            "difference": row and row.get("difference"), "difference_interval": row and row.get("difference_interval"),
            "suite_part": (rep["inputs"]["suite"] or {}).get("part"),
            "splits": (rep["inputs"]["suite"] or {}).get("splits")}


def _test_interval(cmp: dict):
    """The final run's paired interval, tuned - untuned, as an `Interval` (None without bounds)."""
    from mergeline.evaluation.stats import Interval

    iv = cmp.get("difference_interval")
    return Interval(**iv) if iv and iv.get("low") is not None else None


def held_out(search: dict, cmp: dict) -> dict:
    """Does what the search gained on validation items show on the test items? The validation
    gain is the best objective minus the untuned recipe's (trial 0, or the sign search's start);
    the test difference is the final run's paired interval of mean retention, tuned - untuned.
    verdict: "held" (interval above 0), "worse" (below 0), "not shown" (a validation gain the
    interval cannot tell from 0: the search fit the validation items' noise, or too few test
    items to see it), "no gain" (nothing gained on validation), "n/a" (no comparison)."""
    ref, best = search.get("untuned"), search["best"]["objective"]
    gain = None if ref is None or ref["objective"] is None else best - ref["objective"]
    iv = _test_interval(cmp)
    said = f"validation gain {gain:+.3f} (objective)" if gain is not None else "the untuned recipe was not scored on validation"
    if iv is None:
        verdict, why = "n/a", f"{said}; no paired test difference (the final run compared nothing)"
    elif iv.low > 0:
        verdict, why = "held", f"{said}; on test items tuned - untuned {iv.text()}, above 0"
    elif iv.high < 0:
        verdict, why = "worse", (f"{said}; on test items tuned - untuned {iv.text()}, below 0: the search fit the "
                                 "validation items and the untuned recipe is better on unseen ones")
    elif gain is None or gain > 0:
        verdict, why = "not shown", (f"{said}; on test items tuned - untuned {iv.text()} includes 0: the gain on "
                                     "validation does not show on unseen items (the search may have fit the "
                                     "validation items' noise); more validation items would tell")
    else:
        verdict, why = "no gain", f"{said}; on test items tuned - untuned {iv.text()}: the search kept the untuned recipe"
    return {"validation_gain": gain, "test_difference": iv.model_dump() if iv else None, "verdict": verdict, "why": why}


def write_report(search: dict, final: dict) -> tuple[Path, dict, dict]:
    """tune_report.json and tune_report.md in the study's folder; (the .md's path, `comparison`,
    `held_out`)."""
    cmp = comparison(final)
    verdict = held_out(search, cmp)
    data = {"search": search, "final": {k: final.get(k) for k in ("decision", "reasons", "report", "mlflow_run_id",
                                                                  "run_dir")}, "test": cmp, "held_out": verdict}
    out = Path(search["out_dir"])
    _write(out / "tune_report.json", json.dumps(data, indent=2, default=str))
    iv = _test_interval(cmp)
    diff = (iv.text() if iv is not None
            else f"{cmp['difference']:+.3f}" if cmp["difference"] is not None else "n/a")
    t, u = cmp["tuned"], cmp["untuned"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"# Tuning: {search['study']}", "",
             "## Which items did what", "",
             f"- tuning (objective, {search['trials_finished']} trials): {search['splits']['tuning']}",
             f"- gate (the final run below): {search['splits']['gate']}"]
    if "warning" in search["splits"]:
        lines.append(f"- WARNING: {search['splits']['warning']}")
    lines += ["", "## Search", "",
              (f"- greedy sign search over groups {', '.join(search['groups'])} (flows/sign_search.py)"
               if search["sampler"] == "signs" else
               f"- sampler {search['sampler']} (seed {search['seed']}), study storage {search['storage']}"),
              f"- this run: {len(search['trials_run'])} trials ({search['trials_cached']} served from the caches, "
              f"{search['trials_failed']} failed) in {search['seconds']['trials']:.0f} s, after "
              f"{search['seconds']['references']:.0f} s for the base's and fine-tunes' validation scores"
              + ("; stopped by --minutes" if search["budget_spent"] else ""),
              f"- best: trial {search['best']['trial']}, objective {search['best']['objective']:.3f} on validation",
              f"- best recipe: {search['best_recipe']}", "",
              "| parameter | best |", "|---|---|"]
    lines += [f"| {k} | {v if isinstance(v, str) else format(v, 'g')} |" for k, v in search["best"]["values"].items()]
    if search["sampler"] == "signs":  # every candidate: what it changed from the election, and its score
        lines += ["", "| candidate | signs (not elected) | validation objective | cached |", "|---|---|---|---|"]
        lines += [f"| {t['trial']} | {', '.join(f'{g}={m}' for g, m in t['values'].items() if m != 'elected') or '-'} "
                  f"| {f(t.get('objective'))} | {'yes' if t['cached'] else ''} |" for t in search["trials_run"]]
    lines += ["", "## Test items: tuned vs untuned", "",
              f"- decision: **{final['decision']}** (report: {final.get('report')})",
              f"- mean retention: tuned ({cmp['primary']}) {f(t.get('mean_retention'))}, "
              f"untuned {f(u.get('mean_retention'))}; difference {diff}",
              f"- worst regression: tuned {f(t.get('worst_regression'))}, untuned {f(u.get('worst_regression'))}"]
    lines += [f"  - {r}" for r in final.get("reasons") or []]
    lines += ["", "## Did the validation gain hold on the test items?", "", f"**{verdict['verdict']}**: {verdict['why']}"]
    path = _write(out / "tune_report.md", "\n".join(lines) + "\n")
    say(f"tune report: {path}")
    return path, cmp, verdict
