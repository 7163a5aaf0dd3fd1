#!/usr/bin/env bash
# Stop the one-node SLURM cluster that .ci/slurm-up.sh started, each daemon by its PID.
set -uo pipefail

stop() {
  [ -s "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}

stop /run/slurm/slurmd.pid
stop /run/slurm/slurmctld.pid
stop /run/munge/munged.pid
echo "slurm: stopped"
