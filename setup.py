from setuptools import setup

# The design card fixes the top-level folders; package_dir maps them under one
# import root so nothing is ever imported as a bare `supervisor` (PyPI's
# supervisord owns that name) or `http` (the standard library owns that one).
# http/ has no __init__.py on purpose: see DESIGN.md, "Layout".
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
    install_requires=[
        "psutil>=5.9",
        "nvidia-ml-py>=12.535",
        "msgspec>=0.18",
        "falcon>=3.1",
        "waitress>=2.1",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "torch": ["torch>=2.1", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": ["gpu-orchestrator=gpu_orchestrator.supervisor.cli:main"],
    },
)
