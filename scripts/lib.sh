# Sourced, never run, by the wrappers beside it (mps-diag, gpu-check, bench, preflight.sh): the one
# place that finds the gpu-orchestrator command they run. Copy it along with any of them.

# run_gpu_orchestrator ARGS...: exec gpu-orchestrator ARGS..., the first found of
#   1. $GPU_ORCHESTRATOR_BIN (a path, or a command on PATH), when set;
#   2. gpu-orchestrator on PATH (an activated venv, a package that links it into /usr/bin);
#   3. the .venv of the checkout these scripts are in (`make` creates it): a checkout's scripts
#      run its own code, even on a host that also has an installed release;
#   4. /opt/gpu-orchestrator/bin/gpu-orchestrator, where README's "Installing" puts it, on no PATH
#      (a systemd unit's PATH never has it).
# When none is there it says in one line what it tried and how to fix it, and exits 127, the
# shell's status for a command not found.
run_gpu_orchestrator() {
  local name scripts checkout installed found
  name=$(basename -- "$0")
  if [ -n "${GPU_ORCHESTRATOR_BIN:-}" ]; then
    # Set on purpose: never fall back to another copy, which would hide the mistake.
    if ! found=$(command -v -- "$GPU_ORCHESTRATOR_BIN"); then
      echo "$name: GPU_ORCHESTRATOR_BIN=$GPU_ORCHESTRATOR_BIN is neither an executable file nor a command" \
           "on PATH; point it at gpu-orchestrator, e.g. /opt/gpu-orchestrator/bin/gpu-orchestrator" >&2
      exit 127
    fi
    exec "$found" "$@"
  fi
  if found=$(command -v gpu-orchestrator); then
    exec "$found" "$@"
  fi
  # This file's own folder, symlinks resolved, so a linked wrapper still finds its checkout.
  scripts=$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")
  checkout="${scripts%/*}/.venv/bin/gpu-orchestrator"
  installed=/opt/gpu-orchestrator/bin/gpu-orchestrator
  for found in "$checkout" "$installed"; do
    if [ -f "$found" ] && [ -x "$found" ]; then
      exec "$found" "$@"
    fi
  done
  echo "$name: gpu-orchestrator not found: GPU_ORCHESTRATOR_BIN is unset, it is not on PATH" \
       "($PATH), and neither $checkout nor $installed exists; install it (README, \"Installing\")" \
       "or set GPU_ORCHESTRATOR_BIN to its path" >&2
  exit 127
}
