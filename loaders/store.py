"""The model store: model id -> snapshot directory, never outside the places it may read.

Resolution order for model `org/name` of client `agent` (README, "The model store"):
1. $MODEL_STORE_ROOT/<agent>/current/<model-id>
2. $MODEL_STORE_ROOT/$BASE_MODEL_DIR/<agent>/<model-id>   (when BASE_MODEL_DIR is set)
3. $MODEL_STORE_ROOT/<model-id>
4. the local Hugging Face cache, read-only, only when not strict
"""

import errno
import os
from pathlib import Path, PurePosixPath

import msgspec

from gpu_orchestrator.loaders import files
from gpu_orchestrator.loaders.wire import MAX_MODEL_ID


class StoreError(Exception):
    """A model cannot be resolved; the message says where to look or what to fix."""


NAME_MAX = 255  # bytes in one file name component (Linux)


def check_argument(what: str, value: str) -> None:
    """Names travel on the loader's command line (`--client NAME`), where one starting with '-'
    would read as an option to whoever looks at it (ps, pgrep, an operator's script)."""
    if value.startswith("-"):
        raise StoreError(f"{what} {value!r} starts with '-', which a command line takes for an option; rename it")


def check_model_id(model_id: str) -> None:
    """Refuse ids that could name anything outside the store. Raises StoreError."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise StoreError("model id is empty")
    if "\\" in model_id or not model_id.isprintable():
        raise StoreError(f"model id {model_id!r} contains a backslash or an unprintable character")
    path = PurePosixPath(model_id)
    if path.is_absolute():
        raise StoreError(f"model id {model_id!r} is absolute; give it relative to MODEL_STORE_ROOT")
    if any(part in ("", ".", "..") for part in model_id.split("/")):
        raise StoreError(f"model id {model_id!r} has an empty, '.' or '..' component")
    check_argument("model id", model_id)
    if any(len(part.encode()) > NAME_MAX for part in model_id.split("/")):
        raise StoreError(f"model id {model_id!r} has a component longer than {NAME_MAX} bytes, which no file name can be")
    if len(model_id.encode()) > MAX_MODEL_ID:  # a loader's slot has room for ids this long (wire.py)
        raise StoreError(f"model id {model_id[:64]!r}... is longer than {MAX_MODEL_ID} bytes; shorten it")


# The orchestrator's own unit's names: the gate (a drop-in on every GPU service, perhaps on ours)
# lets them through, so no client may have one.
ORCHESTRATOR_NAMES = frozenset({"gpu_orchestrator", "gpu-orchestrator"})


def is_one_name(name: str) -> bool:
    """Whether `name` can only ever be one component of a path: not '.' or '..', no '/', no NUL,
    nothing unprintable (its length is each caller's to judge)."""
    return name not in (".", "..") and "/" not in name and "\0" not in name and name.isprintable()


def check_client_name(name: str) -> None:
    """Client names become path components and systemd instance names."""
    if not isinstance(name, str) or not name:
        raise StoreError("client name is empty")
    if not is_one_name(name):
        raise StoreError(f"client name {name!r} must be a plain name (no '/', not '.' or '..')")
    if "\\" in name:  # so that a unit's instance can be read back unambiguously (systemd.unit_instance)
        raise StoreError(f"client name {name!r} holds '\\', systemd's escape character in unit names; rename it")
    check_argument("client name", name)
    if len(name.encode()) > NAME_MAX:
        raise StoreError(f"client name {name!r} is longer than {NAME_MAX} bytes, which no file name can be")


class Snapshot(msgspec.Struct, frozen=True):
    """A resolved model: its directory and the tree every file in it must stay inside."""

    path: Path
    confined_to: Path
    source: str  # "agent-current", "base-model-dir", "shared", "hf-cache"


def is_inside(path: Path, root: Path) -> bool:
    """Whether absolute, normalised `path` is `root` or below it: by the text, as `root in
    path.parents` would say, without making a Path per parent (every file of every warm-up)."""
    path_text, root_text = str(path), str(root)
    return path_text == root_text or path_text.startswith(root_text.rstrip("/") + "/")


def hf_hub_dir(env: dict) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def real_path(path: Path) -> Path:
    """`path.resolve()`, a symlink loop on the way a StoreError: Python 3.11 raises RuntimeError
    for one (which would reach the loader as an unexpected error), later ones return the path
    unresolved, so the loop is asked of stat() here for every version alike."""
    try:
        real = path.resolve()
        os.stat(real)
    except RuntimeError as exc:  # "Symlink loop from ..." (Python < 3.13)
        raise StoreError(f"symlink loop at {path}; fix or remove the link") from exc
    except OSError as exc:  # a link that leads nowhere is the caller's to judge; a loop is not
        if exc.errno == errno.ELOOP:
            raise StoreError(f"symlink loop at {path}; fix or remove the link") from exc
    return real


REF_MAX = 4096  # bytes read of a refs file: a revision is one file name (HF writes 40 hex digits)


def read_revision(ref: Path) -> str | None:
    """The revision a Hugging Face cache's refs file names, or None when there is no such file.
    It must be one folder name of `snapshots` (HF writes the 40-hex commit hash there, but a
    revision is whatever name the server gave the commit, so only what could not be a single
    name is refused: empty, '/', '.', '..', NUL, unprintable, longer than a name can be)."""
    if not os.path.lexists(ref):
        return None
    fix = "the download did not finish or the cache was altered; run the download again or fix it"
    try:  # without blocking, so that a FIFO put there cannot hang the loader
        data, whole = files.read_regular(ref, REF_MAX)
    except files.NotAFile as exc:
        raise StoreError(f"{ref} is not a regular file ({exc.kind}); {fix}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"symlink loop at {ref}; fix or remove the link") from exc
        if exc.errno == errno.ENOENT:
            raise StoreError(f"{ref} is a link to nothing; {fix}") from exc
        raise
    if not whole:
        raise StoreError(f"{ref} is longer than {REF_MAX} bytes, which no revision is; {fix}")
    try:
        revision = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise StoreError(f"{ref} is not UTF-8 text (a revision such as a 40-hex commit hash); {fix}") from exc
    if not revision:
        raise StoreError(f"{ref} is empty; {fix}")
    if not is_one_name(revision) or len(revision.encode()) > NAME_MAX:
        raise StoreError(f"{ref} holds {revision[:80]!r}, which is not a revision: it must be one folder name "
                         f"of snapshots (no '/', not '.' or '..'); {fix}")
    return revision


class ModelStore:
    def __init__(self, root: str | Path, base_model_dir: str | None = None, strict: bool = False,
                 hf_hub: Path | None = None):
        self.root = Path(root)
        self.base_model_dir = base_model_dir or None
        self.strict = strict
        self.hf_hub = None if strict else hf_hub

    def candidates(self, agent: str, model_id: str) -> list[tuple[str, Path]]:
        found = [("agent-current", self.root / agent / "current" / model_id)]
        if self.base_model_dir:
            found.append(("base-model-dir", self.root / self.base_model_dir / agent / model_id))
        found.append(("shared", self.root / model_id))
        return found

    def resolve(self, agent: str, model_id: str) -> Snapshot:
        check_client_name(agent)
        check_model_id(model_id)
        real_root = real_path(self.root)
        tried = []
        for source, candidate in self.candidates(agent, model_id):
            tried.append(str(candidate))
            if not os.path.lexists(candidate):
                continue
            real = real_path(candidate)
            if not is_inside(real, real_root):
                raise StoreError(f"{candidate} resolves to {real}, outside MODEL_STORE_ROOT {real_root}; refused")
            if real.is_dir():
                return Snapshot(real, real_root, source)
        hf = self._hf_snapshot(model_id, tried)
        if hf is not None:
            return hf
        where = "; ".join(tried)
        mode = " (STRICT_MODEL_STORE=1: the Hugging Face cache is not consulted)" if self.strict else ""
        raise StoreError(f"model {model_id} not found for client {agent}{mode}; tried: {where}")

    def _hf_snapshot(self, model_id: str, tried: list[str]) -> Snapshot | None:
        """The cached snapshot named by refs/main, else (no refs/main at all: a download by
        commit hash writes none) the newest one; never downloads."""
        if self.hf_hub is None:
            return None
        repo = self.hf_hub / ("models--" + model_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        tried.append(str(snapshots) + "/<revision>")
        if not snapshots.is_dir():
            return None
        ref = repo / "refs" / "main"
        revision = read_revision(ref)
        if revision is not None:
            chosen = snapshots / revision
        else:
            dirs = [d for d in snapshots.iterdir() if d.is_dir()]
            if not dirs:
                return None
            chosen = max(dirs, key=lambda d: d.stat().st_mtime)
        # Cache snapshots are symlinks into ../../blobs: confine them to the repo folder. The
        # snapshot folder itself must be one of the repo's snapshots, not a link elsewhere.
        real_repo = real_path(repo)
        real_snapshots = real_repo / "snapshots"
        real = real_path(chosen)
        if real == real_snapshots or not is_inside(real, real_snapshots):
            raise StoreError(f"{chosen} resolves to {real}, not a folder inside {real_snapshots}; refused")
        if not real.is_dir():
            named = f"{ref} names revision {revision!r}, but" if revision is not None else "no refs/main, and"
            raise StoreError(f"{named} its snapshot {chosen} is missing: the download did not finish; "
                             f"run the download again or fix {ref}")
        return Snapshot(real, real_repo, "hf-cache")
