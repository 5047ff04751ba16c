"""What `pip install .` puts into site-packages: one top-level package, `streamcl`.

The repository keeps its top-level folders (ingest/, memory/, ...); pyproject's package-dir
maps them under the `streamcl` namespace so an install cannot collide with other packages
named `memory` or `deploy`. Built through pip from this checkout, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("ingest", "memory", "learner", "evaluation", "deploy")


def test_an_install_adds_one_top_level_package_and_its_modules_import(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    top = {p.name for p in target.iterdir()} - {"bin"}
    assert {n for n in top if not n.endswith(".dist-info")} == {"streamcl"}
    assert not (target / "streamcl" / "__init__.py").exists()  # a namespace package
    assert {p.name for p in (target / "streamcl").iterdir()} >= set(PARTS)
    packaged = {p.relative_to(target / "streamcl") for p in (target / "streamcl").rglob("*.py")}
    in_repo = {p.relative_to(ROOT) for part in PARTS for p in (ROOT / part).rglob("*.py")}
    assert packaged == in_repo, "a subpackage missing from pyproject's package list"
    # The installed copy imports, and the console script's entry point is in it.
    probe = "import streamcl.deploy.cli.main as m; print(m.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target), "PATH": ""},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert Path(out.strip()).is_relative_to(target)
