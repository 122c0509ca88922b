from setuptools import setup

# The design card fixes the top-level folders; package_dir maps them under one
# import root so nothing is ever imported as a bare `supervisor` (PyPI's
# supervisord owns that name) or `http` (the standard library owns that one).
# http/ has no __init__.py on purpose: tests/unit/test_layout.py says why.
setup(
    name="gpu-orchestrator",
    version="0.1.0",
    description="Preloads and verifies ML models, runs NVIDIA MPS and loaders, serves GPU state on :8014",
    python_requires=">=3.11",
    packages=[
        "gpu_orchestrator.supervisor",
        "gpu_orchestrator.loaders",
        "gpu_orchestrator.http",
    ],
    package_dir={
        "gpu_orchestrator.supervisor": "supervisor",
        "gpu_orchestrator.loaders": "loaders",
        "gpu_orchestrator.http": "http",
    },
    # The lowest releases that pass the unit tests and the HTTP/telemetry tests on CPython 3.11,
    # installed as wheels (.ci/run checks them on every run). Below them: psutil 5.9.3 and older
    # have no 3.11 wheel (building one needs a compiler); nvidia-ml-py 11.450 and older have no
    # wheel; msgspec 0.15 lacks msgspec.convert; falcon 3.1 lacks HTTPError.status_code and
    # HTTPContentTooLarge, so every error became a 500; with waitress 2.1.2 and older a POST whose
    # 70 KB body the app refuses (413) gets no answer at all; prometheus_client 0.7 and older
    # have no wheel.
    install_requires=[
        "psutil>=5.9.4",
        "nvidia-ml-py>=11.495.46",
        "msgspec>=0.16",
        "falcon>=4.0",
        "waitress>=3.0",
        "prometheus_client>=0.8",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        # safetensors before 0.8 refuses the F4, F6 and FNUZ files the model check accepts.
        "torch": ["torch>=2.1", "safetensors>=0.8"],
    },
    entry_points={
        "console_scripts": ["gpu-orchestrator=gpu_orchestrator.supervisor.cli:main"],
    },
)
