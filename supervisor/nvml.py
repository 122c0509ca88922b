"""The NVML seam: `import pynvml` and initialise it once, lazily, in this process only.

Tests put a fake `pynvml` module first on PYTHONPATH (tests/fakes/nvml), as they put a
fake nvidia-cuda-mps-control first on PATH; nothing here ever chooses a fake.
"""

import threading

_lock = threading.Lock()
_state: dict = {}


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "LibraryNotFound" in type(exc).__name__ or "Library Not Found" in text:
        return f"NVML library not found ({text}): no NVIDIA driver on this host"
    if "DriverNotLoaded" in type(exc).__name__ or "Driver Not Loaded" in text:
        return f"NVIDIA driver not loaded ({text})"
    return text


def nvml():
    """(pynvml, None) once nvmlInit succeeded, else (None, why). Initialised at most once."""
    with _lock:
        if "module" not in _state:
            try:
                import pynvml
                pynvml.nvmlInit()
                _state["module"], _state["error"] = pynvml, None
            except Exception as exc:  # a missing library, driver or device all land here
                _state["module"], _state["error"] = None, describe(exc)
        return _state["module"], _state["error"]


def text(value) -> str:
    """NVML returns bytes from older bindings and str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)
