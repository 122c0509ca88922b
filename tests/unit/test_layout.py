"""http/ has no __init__.py, so the standard library's http wins from the repo root."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_repo_http_folder_is_not_a_package():
    assert (REPO / "http").is_dir()
    assert not (REPO / "http" / "__init__.py").exists()


def test_python_from_repo_root_imports_the_standard_library_http():
    out = subprocess.run([sys.executable, "-c", "import http, falcon, waitress; print(http.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().is_relative_to(STDLIB), out


def test_pytest_process_uses_the_standard_library_http():
    import http
    assert Path(http.__file__).resolve().is_relative_to(STDLIB)


def test_the_app_still_imports_through_the_package_mapping():
    out = subprocess.run([sys.executable, "-c", "import gpu_orchestrator.http.app as a; print(a.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == (REPO / "http" / "app.py").resolve() or out.endswith("gpu_orchestrator/http/app.py")
