#!/usr/bin/env bash
# A Slurm cluster on loopback, for tests and for trying the cluster launcher.
#   scripts/slurm-local.sh start DIR [NODES]   -> prints `export SLURM_CONF=...`; DIR holds all state
#   scripts/slurm-local.sh stop DIR
# Uses Debian's slurmctld/slurmd/munge (installed here when missing; needs root), its own
# ports, state dirs and munge key under DIR, so it never touches a system-wide Slurm.
# NODES (default 1) slurmd daemons run on this one machine, node k as medrega-node<k> on
# 127.0.0.<k+1> with its own port, spool and log: Debian builds Slurm with
# --enable-multiple-slurmd (`scontrol show config` says MULTIPLE_SLURMD = Yes), which is what
# allows several slurmd per host; a build without it is refused here, saying so.
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?state dir}"); nodes=${3:-1}

stop() {
  for f in "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}

if [[ $cmd == stop ]]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  [[ $(id -u) == 0 ]] || { echo "slurm-local: slurmctld/munged missing and not root" >&2; exit 2; }
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) >&2
fi

mkdir -p "$dir"/{state,spool,munge,log}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctld_port=$(port)
[[ -f "$dir/munge.key" ]] || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge.key"; chmod 700 "$dir/munge"
cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

cat > "$dir/slurm.conf" <<CONF
ClusterName=medrega-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PartitionName=local Nodes=medrega-node[0-$((nodes - 1))] Default=YES MaxTime=INFINITE State=UP
CONF
for k in $(seq 0 $((nodes - 1))); do
  echo "NodeName=medrega-node$k NodeHostname=$(hostname -s) NodeAddr=127.0.0.$((k + 1)) Port=$(port)" \
       "CPUs=$cpus RealMemory=$(( mem / nodes )) State=UNKNOWN" >> "$dir/slurm.conf"
done

export SLURM_CONF="$dir/slurm.conf"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
slurmctld -f "$SLURM_CONF"
if (( nodes > 1 )); then
  for _ in $(seq 30); do scontrol show config >/dev/null 2>&1 && break; sleep 1; done
  conf=$(scontrol show config 2>/dev/null || true)  # whole, before grep -q closes the pipe
  if ! grep -qE '^MULTIPLE_SLURMD +=  *Yes' <<<"$conf"; then
    echo "slurm-local: this Slurm build runs one slurmd per host (built without --enable-multiple-slurmd);" \
         "$nodes nodes on one machine are not possible with it" >&2
    stop; exit 3
  fi
fi
for k in $(seq 0 $((nodes - 1))); do slurmd -f "$SLURM_CONF" -N "medrega-node$k"; done
for _ in $(seq 60); do
  if (( $(sinfo -h -N -o %t 2>/dev/null | grep -cE '^(idle|mix|alloc)') == nodes )); then
    echo "export SLURM_CONF=$SLURM_CONF"; exit 0
  fi
  sleep 1
done
echo "slurm-local: node did not come up; logs in $dir/log" >&2
tail -5 "$dir"/log/*.log >&2 || true
exit 1
