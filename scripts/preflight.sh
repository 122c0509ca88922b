#!/usr/bin/env bash
# Thin wrapper for units written against the operations doc:
#   ExecStartPre=deploy/systemd/preflight.sh --gate-only <instance>
# It only runs the gate; GATE_TIMEOUT, GPU_ORCHESTRATOR_HOST/PORT and
# GPU_ORCHESTRATOR_TOKEN are honoured as by `gpu-orchestrator gate`.
set -euo pipefail
if [ "${1:-}" != "--gate-only" ]; then
  echo "usage: $0 --gate-only [INSTANCE]   (only the gate is supported)" >&2
  exit 2
fi
shift
exec "${GPU_ORCHESTRATOR_BIN:-gpu-orchestrator}" gate "$@"
