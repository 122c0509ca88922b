"""The distributions, built offline with the build backend pyproject.toml names, as pip would."""

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/gpu-orchestrator"  # the venv README's "Installing" makes and the units run from


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the project's files, sdist, wheel), built from a copy of the working tree, never in it."""
    tmp = tmp_path_factory.mktemp("packaging")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    files = sorted(f for f in listed if (REPO / f).is_file())
    source = tmp / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    out = tmp / "dist"
    out.mkdir()
    # The backend rewrites sys.argv as it runs: the folder is read from it first.
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as backend; "
                    "out = sys.argv[1]; backend.build_sdist(out); backend.build_wheel(out)", str(out)],
                   cwd=source, check=True, capture_output=True, timeout=120)
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return files, sdist, wheel


def test_the_sdist_carries_units_monitoring_files_and_tests(built):
    files, sdist, _ = built
    with tarfile.open(sdist) as archive:
        carried = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {f for f in files if f.startswith(("scripts/", "tests/", "http/", "supervisor/", "loaders/"))}
    assert {"scripts/systemd/gpu-orchestrator.service", "scripts/systemd/gpu-client@.service",
            "scripts/prometheus/gpu-orchestrator.rules.yml", "tests/conftest.py"} <= wanted
    assert wanted - carried == set()
    assert {"pyproject.toml", "setup.py", "README.md", "ARCHITECTURE.md", "MANIFEST.in"} <= carried


def test_the_wheel_has_the_page_and_complete_metadata(built, tmp_path):
    _, _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "gpu_orchestrator/http/page.html" in names
    assert "gpu_orchestrator/http/__init__.py" not in names  # it would shadow the standard library's http
    assert not any(name.startswith(("tests/", "scripts/")) for name in names)
    for field in ("Requires-Python: >=3.11", "License-Expression: ", "Project-URL: Documentation, ",
                  "Classifier: Programming Language :: Python :: 3.11", "Description-Content-Type: text/markdown",
                  "Requires-Dist: falcon>=4.0"):
        assert field in metadata, field
    # Installed from the wheel (not this checkout), the page is found beside its module.
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, timeout=120)
    found = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from gpu_orchestrator.http import page; print(page.__file__, len(page.TEMPLATE))",
                            str(target)], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert found[0].startswith(str(target)) and int(found[1]) > 1000


def test_the_units_run_the_command_the_documented_install_puts_there():
    readme = (REPO / "README.md").read_text()
    assert f"python3 -m venv {PREFIX}" in readme and f"{PREFIX}/bin/pip install" in readme
    for unit in ("gpu-orchestrator.service", "gpu-client@.service", "gpu-gate.conf"):
        commands = [line.split("=", 1)[1] for line in (REPO / "scripts/systemd" / unit).read_text().splitlines()
                    if line.startswith(("ExecStart=", "ExecStartPre=")) and "gpu-orchestrator " in line]
        assert commands and all(c.startswith(f"{PREFIX}/bin/gpu-orchestrator ") for c in commands), unit
