"""The `mergeline` command line.

Every subcommand imports its heavy machinery (torch, prefect, mlflow, lm_eval) inside its
own body, so `mergeline --help` stays instant.

    mergeline --help
    mergeline demo

Exit codes (flows/errors.py): 0 success or GO, 1 NO-GO or a failed check, 2 unusable input,
3 INCONCLUSIVE, 4 an unexpected error (one line; the traceback goes to a log file it names),
130 Ctrl-C, 143 SIGTERM. Every command runs under one handler (`Commands`) that keeps those
promises (flows/handler.py), so no command can end in a traceback or exit 0/1 on a crash.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mergeline.flows.errors import EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, exit_code_for
from mergeline.flows.handler import App, Commands, err, fail

app = App(
    cls=Commands,
    help="Merge LLM fine-tunes with TIES and gate the release on evidence.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(cls=Commands, help="The tiny zoo of genuine fine-tunes used by the demo and tests.",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out_dir: Optional[Path] = typer.Argument(None, help="Where to put the zoo (default: the machine-wide cache)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and training."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached zoo with the same inputs exists."),
):
    """Build (or reuse) the zoo: a base, its fine-tunes, negative specimens, eval data."""
    from rich.table import Table

    from mergeline.zoo import build_zoo
    from mergeline.zoo.build import ZooBuildError

    try:
        zoo = build_zoo(out_dir, seed=seed, force=force)
    except FileExistsError as e:
        fail(str(e), EXIT_BAD_INPUT)
    except ZooBuildError as e:
        fail(f"zoo build failed its own check: {e}", EXIT_FAILED)
    matrix = zoo.manifest["task_matrix"]
    table = Table(title=f"task matrix (seed {zoo.manifest['seed']})")
    table.add_column("model")
    for task in zoo.tasks:
        table.add_column(task, justify="right")
    for name, scores in matrix.items():
        table.add_row(name, *(f"{scores[t]:.2f}" for t in zoo.tasks))
    out = Console()
    out.print(f"zoo: {zoo.root}", highlight=False, soft_wrap=True)
    out.print(table)


@zoo_app.command("recipes")
def zoo_recipes(
    out_dir: Path = typer.Argument(..., help="Folder to write the example recipes into."),
    zoo: Optional[Path] = typer.Option(None, "--zoo", help="A built zoo (default: the cached one, built if missing)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace recipes already in OUT_DIR."),
):
    """Write configs/recipes/ with the zoo's folders in place of models/base, models/ft_a, ...

    Then every example runs as is: `mergeline check OUT_DIR/ties.yaml`, `mergeline merge ...`."""
    from mergeline.flows.demo import write_zoo_recipes, zoo_or_build

    try:
        written, skipped = write_zoo_recipes(zoo_or_build(zoo), out_dir, overwrite=overwrite)
    except FileExistsError as e:
        fail(str(e))
    for p in written:
        typer.echo(str(p))
    for name, why in skipped.items():
        err.print(f"skipped {name}: {why}", highlight=False, soft_wrap=True, markup=False)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(
        None, help="Folder for merged models, reports and the MLflow store "
                   "(default: mergeline-runs/demo, or mergeline-runs/demo-nogo with --nogo)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier demo run."),
    nogo: bool = typer.Option(False, "--nogo", help="Run the NO-GO pipeline (a different-base specimen)."),
    zoo: Optional[Path] = typer.Option(None, "--zoo", help="Use this built zoo instead of the cached one."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lm-eval's, Prefect's and MLflow's own output."),
):
    """Run the whole pipeline on the built-in zoo and print the decision.

    The first run on a machine builds the zoo (~2-3 min); every run starts Prefect's temporary
    server (~20 s) and evaluates 7 models with lm-eval. Exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE."""
    from mergeline.flows.demo import default_workdir, run_demo
    from mergeline.flows.progress import quiet

    quiet(verbose)
    summary = run_demo(workdir or default_workdir(nogo), overwrite=overwrite, nogo=nogo, zoo_dir=zoo)
    _print_summary(summary)
    raise typer.Exit(exit_code_for(summary["decision"]))


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="A mergekit YAML recipe."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    policy: Optional[Path] = typer.Option(None, help="Compatibility policy YAML (thresholds, waivers)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .bin pickle checkpoints (weights_only)."),
):
    """Check that the recipe's models can be merged, before spending compute.

    Exit 0 on pass or warn, 1 when a check fails, 2 when an input is unusable."""
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mergeline.flows.errors import INPUT_ERRORS
    from mergeline.merge.compat import check_recipe

    # The header checks take milliseconds; the norm pass reads every model once: a bar for that.
    bar = Progress(TextColumn("[bold]base-delta norms"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=err)
    task = bar.add_task("norms", total=None)
    try:
        with bar:
            report = check_recipe(recipe, policy, allow_pickle=allow_pickle,
                                  on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    except INPUT_ERRORS as e:
        fail(str(e) + _example_hint(recipe, e))
    need = _estimate(recipe, allow_pickle)  # memory and disk the merge will need, from the headers
    if json_out:
        typer.echo(json.dumps({**report.to_dict(), "estimate": need.model_dump() if need else None}, indent=2))
    else:
        from rich.table import Table

        colour = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim", "waived": "magenta"}
        table = Table(title=f"compatibility: {recipe}", show_lines=False)
        for col in ("check", "status", "message"):
            table.add_column(col, overflow="fold")
        for c in report.checks:
            table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.message)
        out = Console(width=max(Console().width, 120))
        out.print(table)
        per_model = report.norms.get("per_model") or {}
        if per_model:
            norms = Table(title="base-delta norms (relative: ||ft - base|| / ||base||, weight matrices)")
            for col in ("model", "delta norm", "relative", "cos(ft, base)", "max |cos| to another task vector"):
                norms.add_column(col, justify="right" if col != "model" else "left")
            cosine = report.norms.get("cosine") or {}
            for name, v in per_model.items():
                others = [abs(c) for o, c in cosine.get(name, {}).items() if o != name and c is not None]
                fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
                norms.add_row(name, fmt(v["delta_norm"]), fmt(v.get("relative_delta_matrices")),
                              fmt(v.get("weight_cosine")), fmt(max(others) if others else None))
            out.print(norms)
        if need is not None:
            out.print(f"merge needs {need.text()}", highlight=False)
        out.print(f"status: [{colour[report.status]}]{report.status}[/]")
    raise typer.Exit(EXIT_FAILED if report.status == "fail" else EXIT_OK)


def _estimate(recipe: Path, allow_pickle: bool, out_shard_size: str = "5GB"):
    """merge/estimate.py's Estimate of a one-stage recipe, or None where no plan can be built from
    the headers (a multi-stage file, an input the checks already refused): it informs, never blocks."""
    from mergeline.merge.estimate import estimate

    try:
        return estimate(recipe, out_shard_size, allow_pickle=allow_pickle)
    except Exception:  # the checks and the merge report what is wrong with the inputs
        return None


def _example_hint(recipe: Path, e: Exception) -> str:
    """configs/recipes/ name models/base etc. as mergekit's examples do: say how to fill them."""
    from mergeline.flows.demo import CONFIGS

    if type(e).__name__ == "ModelNotFound" and recipe.resolve().parent == CONFIGS / "recipes":
        return (f" (the example recipes name models/base, models/ft_a, ...: `mergeline zoo recipes DIR` "
                f"writes them with the demo zoo's folders, then `mergeline check DIR/{recipe.name}`)")
    return ""


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="A mergekit YAML recipe."),
    output_dir: Path = typer.Argument(..., help="Folder to write the merged model into."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 500MB, 5GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    seed: int = typer.Option(0, help="Seed for the random methods (DARE, DELLA)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load .bin pickle checkpoints (weights_only)."),
    policy: Optional[Path] = typer.Option(None, help="Compatibility policy YAML (thresholds, waivers), as for check."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes",
                                      help="Merge even when a compatibility check fails; the waived failures "
                                           "are recorded in lineage.json and README.md."),
    intermediate_dir: Optional[Path] = typer.Option(
        None, help="Multi-stage recipes: where the intermediate stages go (default .OUTPUT_DIR.stages/)."),
):
    """Merge the models of a mergekit recipe into OUTPUT_DIR, after the compatibility checks.

    A file of several recipes (mergekit-multi: YAML documents with a `name:`, later ones naming
    earlier ones) runs stage by stage; each intermediate model is kept and reused when unchanged.

    The checks of `mergeline check` run inside the merge (headers before any tensor is read, the
    norms from the merge's own read). Exit 0 merged, 1 a check failed (nothing written), 2 unusable input."""
    from rich.markup import escape

    from mergeline.merge.checkpoint import CheckpointError
    from mergeline.merge.compat import INPUT_ERRORS, ChecksFailed
    from mergeline.merge.device import DeviceError
    from mergeline.merge.multistage import merge_file
    from mergeline.merge.plan import MergeError
    from mergeline.merge.writer import OutputError

    need = _estimate(recipe, allow_pickle, out_shard_size)
    if need is not None:
        err.print(f"estimate: this merge needs {escape(need.summary())}", highlight=False, soft_wrap=True)
    try:
        out = merge_file(recipe, output_dir, intermediate_dir, device=device, out_shard_size=out_shard_size, overwrite=overwrite,
                        seed=seed, allow_pickle=allow_pickle, progress=True, policy=policy, allow_crimes=allow_crimes)
    except ChecksFailed as e:
        fail(escape(str(e)), EXIT_FAILED)
    except (MergeError, CheckpointError, DeviceError, OutputError, *INPUT_ERRORS) as e:
        fail(escape(str(e)))
    rate = out.stats.get("sign_conflict", {}).get("rate")
    conflict = f"{rate:.1%}" if rate is not None else "n/a"
    Console().print(
        f"merged [bold]{out.method}[/]: {out.tensors} tensors, {out.nbytes / 1e9:.2f} GB in {out.seconds:.1f} s "
        f"-> {escape(str(out.path))} (sign conflicts {conflict})", highlight=False, soft_wrap=True)
    if out.waived:
        err.print(f"[bold yellow]warning:[/] merged with --allow-crimes although {', '.join(out.waived)} failed "
                  "(recorded in lineage.json and README.md)", highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., help="A Hugging Face model folder."),
    suite: Path = typer.Option(..., help="Eval suite YAML."),
    out: Optional[Path] = typer.Option(None, help="Write scores.csv and samples.csv here."),
    device: Optional[str] = typer.Option(None, help="Override the suite's device (cpu, cuda, cuda:N)."),
    batch_size: Optional[int] = typer.Option(None, help="Override the suite's batch size."),
    zoo: Optional[Path] = typer.Option(None, help="Zoo root: fills the suite's ${zoo} placeholder with its task folder."),
    cache_dir: Optional[Path] = typer.Option(None, help="Score cache folder (default: no cache)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files in --out."),
):
    """Evaluate one model folder with lm-eval on the suite's tasks."""
    from mergeline.evaluation.suite import SuiteError, load_suite

    placeholders = {}
    if zoo is not None:
        from mergeline.zoo import load_zoo
        try:
            placeholders["zoo"] = load_zoo(zoo).tasks_dir
        except Exception as e:  # the zoo loader names the file at fault
            fail(f"--zoo {zoo}: {e}")
    try:
        s = load_suite(suite, placeholders)
    except SuiteError as e:
        fail(str(e))
    updates = {k: v for k, v in {"device": device, "batch_size": batch_size}.items() if v is not None}
    s = s.model_copy(update=updates)
    if not model_dir.is_dir():
        fail(f"{model_dir}: model folder not found")
    targets = [out / "scores.csv", out / "samples.csv"] if out else []
    if not overwrite and (existing := [str(p) for p in targets if p.exists()]):
        fail(f"{existing} already exist (pass --overwrite to replace)")

    from mergeline.evaluation.evaluate import evaluate_models
    try:
        table = evaluate_models(s, {model_dir.name: model_dir}, cache_dir, roles={model_dir.name: "candidate"},
                                log=lambda m: err.print(m, highlight=False))
    except (SuiteError, FileNotFoundError) as e:
        fail(str(e))
    primary = table.primary()[["task", "value"]]
    Console().print(primary.to_string(index=False, float_format=lambda v: f"{v:.3f}"), highlight=False)
    if out:
        import os
        out.mkdir(parents=True, exist_ok=True)
        for frame, target in ((table.scores, targets[0]), (table.samples, targets[1])):
            tmp = target.with_name(f".{target.name}.tmp")
            frame.to_csv(tmp, index=False)
            os.replace(tmp, target)  # never a half-written file under the final name
        err.print(f"wrote {targets[0]} and {targets[1]}", highlight=False)


@app.command()
def gate(
    report: Path = typer.Argument(..., help="A report.json written by mergeline."),
    policy: Path = typer.Option(..., help="Gate policy YAML."),
    json_out: bool = typer.Option(False, "--json", help="Print the decision as JSON (decision.json's shape)."),
):
    """Decide from a report and a policy: exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 unusable input."""
    from mergeline.evaluation.gate import ReportError, decide, load_report
    from mergeline.evaluation.policy import PolicyError, load_policy

    try:
        # The report is typed (evaluation/schema.py): a broken or renamed key is a ReportError
        # naming the file and the key, never a KeyError deep in the gate.
        gate_policy = load_policy(policy)
        decision = decide(load_report(report), gate_policy)
    except (ReportError, PolicyError) as e:
        fail(str(e))
    if json_out:
        print(decision.model_dump_json(indent=2))
    else:
        Console().print(decision.text(), highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(exit_code_for(decision.verdict))


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="A pipeline YAML."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs of an earlier run."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lm-eval's, Prefect's and MLflow's own output."),
):
    """Run a pipeline file: check, merge, evaluate, gate, register.

    Exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 unusable input or a workdir another run holds."""
    from mergeline.flows.pipeline import run_pipeline
    from mergeline.flows.progress import quiet

    quiet(verbose)
    summary = run_pipeline(pipeline, refresh=overwrite)
    _print_summary(summary)
    raise typer.Exit(exit_code_for(summary["decision"]))


def _print_summary(summary: dict) -> None:
    color = {"GO": "green", "INCONCLUSIVE": "yellow"}.get(summary["decision"], "red")
    out = Console(soft_wrap=True)  # a log file gets whole lines
    out.print(f"[bold {color}]{summary['decision']}[/] (stage: {summary.get('stage')})")
    for reason in summary.get("reasons") or []:
        out.print(f"  - {reason}", highlight=False, markup=False)
    reused = summary.get("reused") or {}
    if any(reused.values()):
        out.print("reused from earlier runs: " + "; ".join(
            f"{kind} {', '.join(names)}" for kind, names in reused.items() if names), highlight=False, markup=False)
    r = summary.get("registered")
    if r:
        how = "already registered as" if r.get("reused") else "registered:"
        out.print(f"{how} {r['name']} version {r['version']} (aliases: {', '.join(r['aliases']) or 'none'})",
                  highlight=False, markup=False)
    for problem in summary.get("problems") or []:
        out.print(f"warning: {problem}", highlight=False, markup=False)
    reports = summary.get("reports") or {}
    out.print(f"report: {summary.get('report')}", highlight=False, markup=False)
    if reports.get("html"):
        out.print(f"html report: {reports['html']}", highlight=False, markup=False)
    store = summary.get("mlflow_uri", "")
    if store:
        out.print(f"MLflow UI: {_mlflow_ui(store)}", highlight=False, markup=False)


def _mlflow_ui(store: str) -> str:
    """A command that works from where the user stands (no activated venv needed); MLflow 3
    lists pipeline runs under "Model training" in the experiment's page."""
    if not store.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql")):
        return f"open {store} (runs under the experiment's \"Model training\" tab)"
    mlflow = Path(sys.executable).parent / "mlflow"
    return (f"{mlflow} ui --backend-store-uri {store}  then http://127.0.0.1:5000 "
            f"(runs under the experiment's \"Model training\" tab)")


@app.command()
def lineage(
    target: str = typer.Argument(..., help="A merged model folder, or a registered NAME@alias."),
    json_out: bool = typer.Option(False, "--json"),
    tracking_uri: Optional[str] = typer.Option(
        None, envvar="MLFLOW_TRACKING_URI",
        help="MLflow store for NAME@alias (default: ./mlflow.db or ./mergeline-runs/*/mlflow.db, "
             "whichever holds NAME; nothing is created)."),
):
    """Print the merge lineage tree of a model, across generations."""
    import json

    from mergeline.merge.lineage import load_lineage, tree

    folder = Path(target)
    if not folder.is_dir():
        if "@" not in target:
            fail(f"{target}: not a folder, and not a registered NAME@alias")
        from mergeline.tasks.tracking import folder_of, open_existing_store

        uri = tracking_uri or _find_store(target.partition("@")[0])
        try:
            folder = folder_of(open_existing_store(uri), target)
        except Exception as e:  # MlflowException (unknown name/alias) or a non-local source
            fail(f"{target}: {e}")
    try:
        lin = load_lineage(folder)
    except ValueError as e:
        fail(str(e))
    if lin is None:
        fail(f"{folder}: no lineage.json (not a model merged by mergeline)", EXIT_FAILED)
    if json_out:
        typer.echo(json.dumps(lin, indent=2))
        return
    from rich.markup import escape
    from rich.tree import Tree

    def add(branch, node):
        for child in node["children"]:
            add(branch.add(f"{escape(child['label'])}  [dim]{(child.get('hash') or '')[:19]}[/]"), child)

    root = tree(lin)
    rich_tree = Tree(f"[bold]{escape(root['label'])}[/]  [dim]{(root.get('hash') or '')[:19]}[/]")
    add(rich_tree, root)
    out = Console()
    if not out.is_terminal:  # a pipe or a log file gets whole lines, not the 80 columns rich assumes
        out = Console(width=10_000)
    out.print(rich_tree)


def _find_store(name: str) -> str:
    """The SQLite store that registered `name`: ./mlflow.db or a pipeline workdir's under
    ./mergeline-runs; opening an existing file only (MLflow would create an empty one)."""
    from mergeline.tasks.tracking import open_existing_store

    found = [p for p in [Path("mlflow.db"), *sorted(Path("mergeline-runs").glob("*/mlflow.db"))] if p.is_file()]
    for p in found:
        uri = f"sqlite:///{p.resolve()}"
        try:
            open_existing_store(uri).get_registered_model(name)
            return uri
        except Exception:  # not in this store (or not an MLflow store): try the next
            continue
    looked = ", ".join(str(p) for p in found) or "no ./mlflow.db, no ./mergeline-runs/*/mlflow.db"
    fail(f"no MLflow store here has a registered model {name!r} ({looked}); pass the pipeline's store, "
         f"e.g. --tracking-uri sqlite:///mergeline-runs/demo/mlflow.db, or set MLFLOW_TRACKING_URI")


@app.command()
def schedule(
    pipeline: Path = typer.Argument(..., help="A pipeline YAML."),
    cron: str = typer.Option(..., help='Cron schedule, e.g. "0 3 * * *".'),
    name: Optional[str] = typer.Option(None, help="Deployment name."),
):
    """Create and serve a Prefect deployment that runs the pipeline on a cron schedule."""
    from mergeline.flows.schedule import serve

    serve(pipeline, cron, name)


@app.command()
def tune(
    pipeline: Path = typer.Argument(..., help="A pipeline YAML whose eval suite declares validation/test splits."),
    trials: int = typer.Option(20, "--trials", help="Finished trials the study should hold (a rerun resumes it)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Start no new trial once this many minutes have passed since the command started."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (default) or cmaes."),
    seed: int = typer.Option(0, "--seed", help="The sampler's seed."),
    storage: str = typer.Option("sqlite", "--storage", help="sqlite (WORKDIR/tune/optuna.db, resumable) or memory."),
    allow_no_split: bool = typer.Option(False, "--allow-no-split",
                                        help="Tune on the gate's own items when the suite has no splits (recorded)."),
    sign_block: Optional[int] = typer.Option(None, "--sign-block", min=1,
                                             help="Layers per group of the sign search (a TIES recipe with "
                                                  "sign_source: validation); default: at most 4 layer groups."),
    layer_groups: int = typer.Option(1, "--layer-groups", min=1,
                                     help="Search each model's weight and density as a mergekit gradient of this "
                                          "many values over the layers (1: one value per model)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lm-eval's, Prefect's and MLflow's own output."),
):
    """Search the recipe's weights and densities on validation items (Optuna), or for a TIES
    recipe with `sign_source: validation` its sign vector per layer group, then run the pipeline
    on the best recipe, judged on test items, with the untuned recipe as a baseline.

    Exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE (the tuned recipe's gate), 2 unusable input."""
    from mergeline.flows.progress import quiet
    from mergeline.flows.tune import run_tune

    quiet(verbose)
    out = run_tune(pipeline, trials=trials, minutes=minutes, sampler=sampler, seed=seed, storage=storage,
                   allow_no_split=allow_no_split, sign_block=sign_block, layer_groups=layer_groups)
    _print_summary(out["final"])
    best, held = out["search"]["best"], out["held_out"]
    Console(soft_wrap=True).print(f"best trial {best['trial']}: objective {best['objective']:.3f} on validation; "
                                  f"recipe {out['search']['best_recipe']}\n"
                                  f"held on test items? {held['verdict']}: {held['why']}\ntune report: {out['report']}",
                                  highlight=False, markup=False)
    raise typer.Exit(exit_code_for(out["final"]["decision"]))


if __name__ == "__main__":
    app()
