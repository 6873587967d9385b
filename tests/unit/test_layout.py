"""The layout rules, kept by tests: pure cores never import Ray (Ray shells live in ``runtime/``),
the driver (``orchestration/``) imports Ray only through ``runtime/``, and no module under
``worldagent_ray/`` grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "worldagent_ray"
PURE = ("schemas", "config", "stats.py", "models.py", "env.py", "checks.py", "engines", "agents", "world", "critic", "memory", "rl",
        "datasets")


def _modules(parts: tuple[str, ...]) -> list[Path]:
    out = []
    for p in parts:
        path = PKG / p
        out += [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every imported module (absolute, relative ones resolved), at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = ["worldagent_ray", *path.relative_to(PKG).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def _violations(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for line, mod in _imports(f):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    return bad


def test_pure_cores_never_import_ray_nor_the_shells():
    files = _modules(PURE)
    assert len(files) > 30
    assert _violations(files, ("ray", "worldagent_ray.runtime", "worldagent_ray.orchestration")) == []


def test_the_driver_reaches_ray_only_through_runtime():
    assert _violations(_modules(("orchestration",)), ("ray",)) == []


def test_the_rule_checker_catches_a_violation(tmp_path):
    bad = PKG / "rl" / "_layout_probe.py"
    try:
        bad.write_text("def f():\n    from ray import train\n    from ..runtime import apps\n")
        found = _violations([bad], ("ray", "worldagent_ray.runtime"))
        assert len(found) == 2 and "ray" in found[0] and "worldagent_ray.runtime" in found[1]
    finally:
        bad.unlink()


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_is_longer_than_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600


LIGHT_MODULES = ["worldagent_ray.runtime.agent_deployments", "worldagent_ray.runtime.world_deployment",
                 "worldagent_ray.orchestration.main"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_replicas_and_the_driver_that_run_no_model_never_import_torch(module):
    """The agents' and the sandbox world's Serve replicas and the driver run no model: importing
    torch would cost each replica start seconds of CPU (engines, memory and the learner load it)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "False"], f"{module} imports torch or transformers"
