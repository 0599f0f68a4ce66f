#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the launcher tests: real munged, slurmctld
# and slurmd started by hand (no systemd), all state under DIR, two fake GPUs.
#
#   bash scripts/slurm_cluster.sh install      apt-get the Debian packages (root)
#   bash scripts/slurm_cluster.sh up DIR       write DIR/slurm.conf, start the daemons, wait for the node
#   bash scripts/slurm_cluster.sh down DIR     stop the daemons this script started from DIR
#
# SLURMCTLD_PORT and SLURMD_PORT (default 6817, 6818) let two clusters or a busy port coexist.
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf (printed by `up`); /etc/slurm is
# left alone. Facts this follows: proctrack/cgroup fails every step launch here (and srun still
# exits 0), so proctrack/linuxproc; task/none; select/cons_tres so that jobs share the CPUs.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"

install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  echo "error: munged did not start" >&2
  exit 1
}

write_config() {
  local node host
  host="$(hostname -s)"
  node="$(slurmd -C | head -n1)"
  mkdir -p "$dir/state" "$dir/spool" "$dir/dev"
  touch "$dir/dev/gpu0" "$dir/dev/gpu1"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=tessera
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
GresTypes=gpu
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
$node Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/gres.conf" <<EOF
NodeName=$host Name=gpu File=$dir/dev/gpu[0-1]
EOF
}

up() {
  [ -n "$dir" ] || { echo "usage: $0 up DIR" >&2; exit 2; }
  command -v slurmctld >/dev/null || { echo "error: slurmctld is not installed (run: $0 install)" >&2; exit 3; }
  dir="$(mkdir -p "$dir" && cd "$dir" && pwd)"
  start_munge
  write_config
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -i
  slurmd
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.2
  done
  echo "error: the node did not become idle; logs in $dir" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  exit 1
}

stop_pidfile() {
  local pidfile="$1" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  [ -n "$dir" ] || { echo "usage: $0 down DIR" >&2; exit 2; }
  if [ -f "$dir/slurm.conf" ]; then
    SLURM_CONF="$dir/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
}

case "$cmd" in
  install) install ;;
  up) up ;;
  down) down ;;
  *) echo "usage: $0 install | up DIR | down DIR" >&2; exit 2 ;;
esac
