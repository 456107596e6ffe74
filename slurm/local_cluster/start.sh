#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munge + slurmctld + slurmd, no systemd).
#
#   slurm/local_cluster/start.sh            # then: source "$NEO_SLURM_DIR/env.sh" (prints the line)
#
# Everything (config, munge key and socket, state, logs) lives under $NEO_SLURM_DIR
# (default ${TMPDIR:-/tmp}/neo-slurm). Idempotent: an already running cluster of that directory is
# reused. Must run as root. When the SLURM daemons are missing and apt-get is available they are
# installed (Debian packages slurmctld slurmd slurm-client munge, about 15 s) unless
# NEO_SLURM_NO_INSTALL=1.
#
# Settings (environment): NEO_SLURM_DIR, NEO_SLURM_CPUS (CPUs the node announces, default 8 -- more
# than the machine has is fine, small test jobs share cores), NEO_SLURM_PARTITION (default debug),
# NEO_SLURM_CTLD_PORT / NEO_SLURM_SLURMD_PORT (default 6817 / 6818), NEO_SLURM_TIMEOUT (seconds to
# wait for the node, default 90).
#
# Exit status: 0 running; 3 SLURM is not installed and cannot be installed here (callers may skip);
# 1 anything else (the daemon logs are printed).
set -euo pipefail

DIR=${NEO_SLURM_DIR:-${TMPDIR:-/tmp}/neo-slurm}
CPUS=${NEO_SLURM_CPUS:-8}
PARTITION=${NEO_SLURM_PARTITION:-debug}
CTLD_PORT=${NEO_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${NEO_SLURM_SLURMD_PORT:-6818}
TIMEOUT=${NEO_SLURM_TIMEOUT:-90}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "[local-slurm] $*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || { say "must run as root (slurmd and munged need it)"; exit 3; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
               && command -v sbatch >/dev/null && command -v scontrol >/dev/null; }
if ! have_slurm; then
    if [[ ${NEO_SLURM_NO_INSTALL:-0} == 1 ]] || ! command -v apt-get >/dev/null; then
        say "SLURM is not installed (slurmctld, slurmd, munged, sbatch) and cannot be installed here (no apt-get or NEO_SLURM_NO_INSTALL=1)"
        exit 3
    fi
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { timeout 300 apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >"${TMPDIR:-/tmp}/neo-slurm-apt.log" 2>&1 \
           || { timeout 300 apt-get update >>"${TMPDIR:-/tmp}/neo-slurm-apt.log" 2>&1 \
                && timeout 300 apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge \
                   >>"${TMPDIR:-/tmp}/neo-slurm-apt.log" 2>&1; }; } || ! have_slurm; then
        tail -n 20 "${TMPDIR:-/tmp}/neo-slurm-apt.log" >&2 || true
        say "could not install SLURM with apt-get"
        exit 3
    fi
fi

export SLURM_CONF=$DIR/slurm.conf
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { scontrol show node -o 2>/dev/null | sed -n 's/.* State=\([^ ]*\).*/\1/p' | head -n1; }

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munge/munged.pid" \
   && timeout 10 scontrol ping >/dev/null 2>&1; then
    say "already running (state in $DIR)"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi
# Leftovers of an earlier cluster of this directory (a crash, a killed test run): stop them first.
"$HERE/stop.sh" >/dev/null 2>&1 || true

HOST=$(hostname -s)
ADDR=127.0.0.1
# Jobs meet at the first host of their allocation by name (torchrun's rendezvous): it must resolve.
if ! getent hosts "$HOST" >/dev/null; then
    say "this machine's name $HOST does not resolve: adding '$ADDR $HOST' to /etc/hosts"
    echo "$ADDR $HOST" >>/etc/hosts
fi
MEMORY=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
MEMORY=${MEMORY:-1000}

mkdir -p "$DIR"/{state,spool,log,munge}
rm -rf "$DIR/state"/* "$DIR/spool"/*   # a fresh cluster: no jobs of an earlier one come back

# munge: a private key and socket, run as the munge user where there is one.
MUNGE_USER=munge
id "$MUNGE_USER" >/dev/null 2>&1 || MUNGE_USER=root
if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chown -R "$MUNGE_USER": "$DIR/munge"
chmod 755 "$DIR/munge"   # clients must reach the socket; the key itself is 0400
chmod 400 "$DIR/munge/munge.key"
MUNGED_ARGS=(--socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key"
             --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log"
             --seed-file="$DIR/munge/munged.seed")
if [[ $MUNGE_USER == root ]]; then
    munged --force "${MUNGED_ARGS[@]}"
else
    runuser -u "$MUNGE_USER" -- munged "${MUNGED_ARGS[@]}"
fi

sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@ADDR@|$ADDR|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@MEMORY@|$MEMORY|g" -e "s|@PARTITION@|$PARTITION|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" "$HERE/slurm.conf.in" >"$SLURM_CONF"
# Jobs on this cluster must not pick up a host-wide plugin stack.
: >"$DIR/plugstack.conf"
echo "PlugStackConfig=$DIR/plugstack.conf" >>"$SLURM_CONF"

slurmctld -i -f "$SLURM_CONF"
slurmd -N "$HOST" -f "$SLURM_CONF"

deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case $state in
        IDLE*|MIXED*|ALLOCATED*) break ;;
        DOWN*|DRAIN*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if [[ ! $state =~ ^(IDLE|MIXED|ALLOCATED) ]]; then
    say "node $HOST did not become idle within ${TIMEOUT}s (state: ${state:-none}); logs:"
    tail -n 30 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/munge/munged.log" >&2 2>/dev/null || true
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/env.sh"
say "running: node $HOST ($CPUS CPUs, partition $PARTITION), state and logs in $DIR"
echo "export SLURM_CONF=$SLURM_CONF"
