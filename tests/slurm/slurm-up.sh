#!/usr/bin/env bash
# slurm-up.sh - bring up a single-node SLURM cluster (munged + slurmctld + slurmd
# [+ mariadbd + slurmdbd]) on THIS machine, without systemd and without cgroups.
# Idempotent: re-running only (re)starts what is down, restarts daemons if the
# generated config changed, and waits until the node is idle.
# Used by tests/test_slurm.py (adapted from ../shared/slurm/slurm-up.sh: fails fast when a daemon
# dies on start-up).
# Tested: Debian 12 (bookworm, gVisor sandbox, no systemd), slurm-wlm 22.05.8-4+deb12u3,
#         munge 0.5.15, mariadb 10.11; run as root.
#
# Env knobs:
#   SLURM_ACCOUNTING  (default 0)    1: also install/start MariaDB + slurmdbd -> real sacct/sacctmgr,
#                                    (user root has the built-in account 'root'). 0: no slurmdbd; plain `sacct`
#                                    fails ("Slurm accounting storage is disabled") -> use the
#                                    snakemake plugin's `slurm-status-command: squeue`.
#   SLURM_FAKE_GPUS   (default 0)    N>0: node advertises gres gpu:N backed by /dev/null clones
#                                    (no real GPU) + a 'gpu' partition, so --gpus=1 / --gres=gpu:1
#                                    jobs are accepted, get CUDA_VISIBLE_DEVICES=0.., run on CPU.
#   SLURM_MINJOBAGE   (default 300)  seconds finished jobs stay visible to squeue/scontrol
#   SLURM_UP_TIMEOUT  (default 60)   seconds to wait for the node to become idle
set -euo pipefail

ACCOUNTING="${SLURM_ACCOUNTING:-0}"
FAKE_GPUS="${SLURM_FAKE_GPUS:-0}"
MINJOBAGE="${SLURM_MINJOBAGE:-300}"
TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
CLUSTER=localcluster

log() { echo "[slurm-up] $*" >&2; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop_pidfile FILE: SIGTERM + wait up to 10 s
  if pid_alive "$1"; then
    local p; p="$(cat "$1")"; kill "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  fi
}

# ------------------------------------------------------------------ 1. packages
PKGS=()
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || PKGS=(slurmctld slurmd slurm-client munge); done
if [ "$ACCOUNTING" = 1 ]; then
  command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null || PKGS+=(slurmdbd mariadb-server)
fi
if [ "${#PKGS[@]}" -gt 0 ]; then
  log "apt-get install ${PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the postinst scripts try to start the services via invoke-rc.d; with no
  # systemd/runlevel that is refused (harmless: "policy-rc.d denied execution")
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi

install -d -m 0755 "$CONF_DIR" "$SPOOL/ctld" "$SPOOL/d" "$LOGDIR" "$RUNDIR"

# ------------------------------------------------------------------ 2. munge
if [ ! -s /etc/munge/munge.key ]; then   # the Debian postinst normally creates it
  log "creating munge key"
  mungekey --create --force --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
  munge -n | unmunge >/dev/null || { log "munged did not come up"; exit 1; }
fi

# ------------------------------------------------------------------ 3. accounting mode
CHANGED=0
if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherFrequency=30"
  JOBACCT=jobacct_gather/linux
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOGDIR}/jobcomp.txt"
  JOBACCT=jobacct_gather/none
fi

# ------------------------------------------------------------------ 4. slurm.conf / gres.conf
NODE="$(hostname -s)"
# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW="$(slurmd -C | head -n1)"
hw() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS="$(hw CPUs)"; SOCKETS="$(hw SocketsPerBoard)"; CORES="$(hw CoresPerSocket)"
THREADS="$(hw ThreadsPerCore)"; MEM="$(hw RealMemory)"
MEM=$(( MEM * 90 / 100 ))   # headroom: a node reporting less than RealMemory gets drained

GRES_TYPES=""; GRES_NODE=""; GPU_PART=""; NEWGRES="# no GRES (SLURM_FAKE_GPUS=0)"
if [ "$FAKE_GPUS" -gt 0 ]; then
  # gres/gpu ignores File-less entries (slurmd then reports 0 GPUs -> node INVAL), so
  # back them by char devices cloned from /dev/null -- NOT under /dev, so CUDA tools see nothing
  install -d -m 0755 "$SPOOL/fakegpu"
  for i in $(seq 0 $(( FAKE_GPUS - 1 ))); do
    [ -c "$SPOOL/fakegpu/gpu$i" ] || mknod -m 0666 "$SPOOL/fakegpu/gpu$i" c 1 3
  done
  GRES_TYPES="GresTypes=gpu"
  GRES_NODE="Gres=gpu:${FAKE_GPUS}"
  GPU_PART="PartitionName=gpu   Nodes=${NODE} Default=NO  MaxTime=1-00:00:00 State=UP"
  NEWGRES="NodeName=${NODE} Name=gpu File=${SPOOL}/fakegpu/gpu[0-$(( FAKE_GPUS - 1 ))]"
fi

NEWCONF="$(mktemp)"
cat >"$NEWCONF" <<EOF
# generated by slurm-up.sh - single node, no systemd, no cgroups
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/d
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# --- no cgroups / no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=${JOBACCT}
MpiDefault=none
# --- scheduling
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# jobs without --mem get DefMemPerCPU per CPU (otherwise: the whole node -> no concurrency)
DefMemPerCPU=500
# finished jobs stay visible to squeue/scontrol this long; the snakemake plugin's
# squeue status mode needs MinJobAge >= 3 * slurm-init-seconds-before-status-checks
MinJobAge=${MINJOBAGE}
KillWait=5
InactiveLimit=0
Waittime=0
# --- accounting (SLURM_ACCOUNTING=${ACCOUNTING})
${ACCT_LINES}
# --- node + partitions: 'debug' (default) and 'cpu' need no GRES; 'gpu' only with fake GPUs
${GRES_TYPES}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} SocketsPerBoard=${SOCKETS} CoresPerSocket=${CORES} ThreadsPerCore=${THREADS} RealMemory=${MEM} ${GRES_NODE} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu   Nodes=${NODE} Default=NO  MaxTime=1-00:00:00 State=UP
${GPU_PART}
EOF
if ! cmp -s "$NEWCONF" "$CONF_DIR/slurm.conf"; then
  install -m 0644 "$NEWCONF" "$CONF_DIR/slurm.conf"; CHANGED=1; log "wrote $CONF_DIR/slurm.conf"
fi
rm -f "$NEWCONF"
if [ "$(cat "$CONF_DIR/gres.conf" 2>/dev/null)" != "$NEWGRES" ]; then
  echo "$NEWGRES" >"$CONF_DIR/gres.conf"; CHANGED=1
fi

# ------------------------------------------------------------------ 4b. accounting DB (optional)
start_accounting() {  # MariaDB + slurmdbd; needs slurm.conf with accounting_storage/slurmdbd
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if ! mariadb-admin ping >/dev/null 2>&1; then
    log "starting mariadbd (unix socket only, --skip-networking)"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    runuser -u mysql -- /usr/sbin/mariadbd --datadir=/var/lib/mysql \
        --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
        --skip-networking --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        >>"$LOGDIR/mariadb.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.25; done
    mariadb-admin ping >/dev/null || { log "mariadbd did not come up"; tail "$LOGDIR/mariadb.log" >&2; exit 1; }
  fi
  # root@localhost uses unix_socket auth on Debian, so plain `mariadb` works as root
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  DBDCONF="$(mktemp)"
  cat >"$DBDCONF" <<EOF
# generated by slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=${RUNDIR}/slurmdbd.pid
LogFile=${LOGDIR}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
  if ! cmp -s "$DBDCONF" "$CONF_DIR/slurmdbd.conf"; then
    install -m 0600 "$DBDCONF" "$CONF_DIR/slurmdbd.conf"   # slurmdbd insists on 0600
    stop_pidfile "$RUNDIR/slurmdbd.pid"
  fi
  rm -f "$DBDCONF"
  if ! pid_alive "$RUNDIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    for _ in $(seq 1 80); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.25; done
  fi
  sacctmgr -n list cluster format=cluster%40 | grep -qw "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

if [ "$ACCOUNTING" = 1 ]; then start_accounting; fi

# ------------------------------------------------------------------ 5. slurmctld + slurmd
if [ "$CHANGED" = 1 ] && { pid_alive "$RUNDIR/slurmctld.pid" || pid_alive "$RUNDIR/slurmd.pid"; }; then
  log "config changed -> restarting slurmctld/slurmd"
  stop_pidfile "$RUNDIR/slurmd.pid"
  stop_pidfile "$RUNDIR/slurmctld.pid"
fi
if ! pid_alive "$RUNDIR/slurmctld.pid"; then log "starting slurmctld"; /usr/sbin/slurmctld; fi
if ! pid_alive "$RUNDIR/slurmd.pid"; then log "starting slurmd"; /usr/sbin/slurmd; fi

# ------------------------------------------------------------------ 6. wait for an idle node
deadline=$(( SECONDS + TIMEOUT ))
declare -A dead=()   # consecutive polls without a live pid, per daemon
while :; do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drain*|down*|inval*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  # a daemon that died on start-up (fatal config error) fails fast; its pid file may appear a
  # moment after it forks, so only a daemon missing for 5 s in a row counts as dead
  for d in slurmctld slurmd; do
    if pid_alive "$RUNDIR/$d.pid"; then dead[$d]=0; continue; fi
    dead[$d]=$(( ${dead[$d]:-0} + 1 ))
    if [ "${dead[$d]}" -ge 10 ]; then
      log "$d is not running"; tail -n 20 "$LOGDIR/$d.log" >&2 || true; exit 1
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "node did not become idle within ${TIMEOUT}s (state='$state')"
    tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
    exit 1
  fi
  sleep 0.5
done

# with slurmdbd, user root already has the built-in account "root" (slurm_account: root)
log "SLURM up: node $NODE is $state (accounting=$ACCOUNTING, fake_gpus=$FAKE_GPUS)"
sinfo >&2
