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


# nvmlInit's errors that mean this host has no NVIDIA GPU: no driver library, no driver (a driver
# that sees no device starts NVML, and counts 0). Any other (NVML_ERROR_LIB_RM_VERSION_MISMATCH,
# NVML_ERROR_NO_PERMISSION...) is a driver that is there but broken. Only names every supported
# nvidia-ml-py has (tests/unit/test_nvml_api.py holds the declared minimum to them).
NO_GPU_ERRORS = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")


def nvml():
    """(pynvml, None) once nvmlInit succeeded, else (None, why). Initialised at most once."""
    with _lock:
        if "module" not in _state:
            _state["failure"] = None
            try:
                import pynvml
            except ImportError as exc:  # a dependency of this package: its installation is broken
                _state["module"], _state["error"] = None, f"pynvml does not import ({exc}): pip install nvidia-ml-py"
                _state["failure"] = "ImportError"
                return None, _state["error"]
            try:
                pynvml.nvmlInit()
                _state["module"], _state["error"] = pynvml, None
            except Exception as exc:  # a missing library, driver or device all land here
                _state["module"], _state["error"] = None, describe(exc)
                _state["failure"] = error_name(pynvml, exc)
        return _state["module"], _state["error"]


def init_failure() -> str | None:
    """How nvmlInit failed: pynvml's name of its error code (NVML_ERROR_NO_PERMISSION...),
    'ImportError' when pynvml did not import, None when it did not fail or had no code."""
    nvml()
    return _state["failure"]


def error_name(module, exc: BaseException) -> str | None:
    """pynvml's name for an NVMLError's code, e.g. NVML_ERROR_NO_PERMISSION; None without one."""
    code = getattr(exc, "value", None)
    if code is None:
        return None
    return next((name for name in dir(module) if name.startswith("NVML_ERROR_") and getattr(module, name) == code),
                None)


def text(value) -> str:
    """NVML returns bytes from older bindings and str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)
