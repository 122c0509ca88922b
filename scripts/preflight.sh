#!/usr/bin/env bash
# Thin wrapper for units written against the operations doc, by its absolute path, e.g. copied
# with lib.sh to /usr/local/lib/gpu-orchestrator/:
#   ExecStartPre=/usr/local/lib/gpu-orchestrator/preflight.sh --gate-only <instance>
# The doc's relative form (deploy/systemd/preflight.sh) must be made absolute: systemd rejects
# a relative command path.
# It only runs the gate; GATE_TIMEOUT, GPU_ORCHESTRATOR_HOST/PORT and
# GPU_ORCHESTRATOR_TOKEN are honoured as by `gpu-orchestrator gate`.
set -euo pipefail
if [ "${1:-}" != "--gate-only" ]; then
  echo "usage: $0 --gate-only [INSTANCE]   (only the gate is supported)" >&2
  exit 2
fi
shift
# lib.sh beside this script (symlinks resolved) finds gpu-orchestrator: $GPU_ORCHESTRATOR_BIN, PATH,
# this checkout's .venv, /opt/gpu-orchestrator; exit 127 saying what it tried when none is there.
lib="$(dirname -- "$(readlink -f -- "$0")")/lib.sh"
if [ ! -r "$lib" ]; then
  echo "$(basename -- "$0"): $lib is missing; copy scripts/lib.sh beside this script (it finds gpu-orchestrator)" >&2
  exit 127
fi
. "$lib"
# The summaries go where the operations doc says they are: ~/.cache/justnews/preflight/summary_*.json
# (a unit may have no HOME: the user's home from the password database then, as Python's ~ does).
home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
run_gpu_orchestrator gate --summary-dir "${XDG_CACHE_HOME:-$home/.cache}/justnews/preflight" "$@"
