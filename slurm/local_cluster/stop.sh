#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by start.sh (same $NEO_SLURM_DIR): cancel its jobs,
# then stop slurmd, slurmctld and munged by the process ids in their pid files.
set -uo pipefail

DIR=${NEO_SLURM_DIR:-${TMPDIR:-/tmp}/neo-slurm}
TIMEOUT=${NEO_SLURM_TIMEOUT:-30}
export SLURM_CONF=$DIR/slurm.conf

say() { echo "[local-slurm] $*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile PIDFILE NAME
    local pidfile=$1 name=$2 pid deadline
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop in ${TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if [[ -f $SLURM_CONF ]] && alive "$DIR/slurmctld.pid"; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        deadline=$((SECONDS + TIMEOUT))
        while [[ -n $(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
fi
stop_pidfile "$DIR/slurmd.pid" slurmd
stop_pidfile "$DIR/slurmctld.pid" slurmctld
stop_pidfile "$DIR/munge/munged.pid" munged
say "stopped (state and logs stay in $DIR)"
