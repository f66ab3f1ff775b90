#!/usr/bin/env bash
# slurm-down.sh - stop the daemons started by slurm-up.sh (by pid file, never by name).
#
#   slurm-down.sh                      stop all: slurmd slurmctld slurmdbd mariadbd munged
#   slurm-down.sh slurmd slurmctld     stop only these (tests stop exactly what they started)
#
# Running jobs are cancelled first when slurmctld is among them. Keeps packages and config;
# PURGE=1 also wipes the slurm state (job ids restart at 1) and logs.
# Adapted from ../shared/slurm/slurm-down.sh (daemon selection added).
set -uo pipefail
RUNDIR=/run/slurm
log() { echo "[slurm-down] $*" >&2; }
stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
  local f="$1" name="$2" p
  [ -s "$f" ] || return 0
  p="$(cat "$f")"
  if kill -0 "$p" 2>/dev/null; then
    log "stopping $name (pid $p)"
    kill "$p" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && { log "$name still alive -> SIGKILL"; kill -9 "$p" 2>/dev/null; }
  fi
  rm -f "$f"
}
pidfile() {
  case "$1" in
    slurmd|slurmctld|slurmdbd) echo "$RUNDIR/$1.pid" ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    munged) echo /run/munge/munged.pid ;;
    *) log "unknown daemon '$1' (slurmd slurmctld slurmdbd mariadbd munged)"; exit 2 ;;
  esac
}

# stop order matters: slurmd before slurmctld before slurmdbd before its database, munge last
ORDER=(slurmd slurmctld slurmdbd mariadbd munged)
WANT=("$@")
[ "${#WANT[@]}" -gt 0 ] || WANT=("${ORDER[@]}")
for d in "${WANT[@]}"; do pidfile "$d" >/dev/null; done   # reject unknown names up front
wanted() { local d; for d in "${WANT[@]}"; do [ "$d" = "$1" ] && return 0; done; return 1; }

if wanted slurmctld && command -v scancel >/dev/null && [ -s "$RUNDIR/slurmctld.pid" ] \
   && kill -0 "$(cat "$RUNDIR/slurmctld.pid")" 2>/dev/null; then
  scancel --full --quiet --user=root 2>/dev/null || true   # jobs of this CI user
  sleep 1
fi
for d in "${ORDER[@]}"; do
  if wanted "$d"; then stop_pidfile "$(pidfile "$d")" "$d"; fi
done

if [ "${PURGE:-0}" = 1 ]; then
  log "purging slurm state + logs"
  rm -rf /var/spool/slurm /var/log/slurm/*.log /var/log/slurm/jobcomp.txt
fi
log "SLURM down (${WANT[*]})"
