from setuptools import setup

# The metadata is in pyproject.toml; this file keeps the layout. The design card fixes the
# top-level folders; package_dir maps them under one import root so nothing is ever imported
# as a bare `supervisor` (PyPI's supervisord owns that name) or `http` (the standard library
# owns that one). http/ has no __init__.py on purpose: tests/unit/test_layout.py says why.
setup(
    packages=[
        "gpu_orchestrator.supervisor",
        "gpu_orchestrator.supervisor.commands",
        "gpu_orchestrator.loaders",
        "gpu_orchestrator.http",
    ],
    package_dir={
        "gpu_orchestrator.supervisor": "supervisor",
        "gpu_orchestrator.loaders": "loaders",
        "gpu_orchestrator.http": "http",
    },
    # The web page is read beside http/page.py at run time.
    package_data={"gpu_orchestrator.http": ["page.html"]},
    # MANIFEST.in adds the unit files, monitoring files and tests to the sdist; none is installed.
    include_package_data=False,
)
