#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (no systemd): munged, slurmctld and slurmd run as daemons
# started by hand. Idempotent: installs only what is missing and starts only what is not running.
# Leaves the node idle; .ci/slurm-down.sh stops the daemons by PID.
set -euo pipefail

need=()
for bin in munged slurmctld slurmd sinfo; do command -v "$bin" >/dev/null || need+=("$bin"); done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

node=$(hostname -s)
state=/var/lib/moeforge-slurm
mkdir -p "$state/ctld" "$state/spool" /var/log/slurm /etc/slurm /run/slurm

# munge: key 0600 and socket directory 0755, both owned by the munge user
id munge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0600 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  su -s /bin/sh munge -c "munged --force"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf: controller and node on 127.0.0.1, node line from slurmd -C
hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
conf=/etc/slurm/slurm.conf
new=$(mktemp)
cat >"$new" <<EOF
ClusterName=moeforge
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! cmp -s "$new" "$conf"; then mv "$new" "$conf"; chmod 0644 "$conf"; changed=1; else rm -f "$new"; fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$changed" = 1 ]; then
  # a new configuration: restart whatever runs with the old one
  for pid in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
    if alive "$pid"; then p=$(cat "$pid"); kill "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; fi
  done
fi
alive /run/slurm/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null
alive /run/slurm/slurmd.pid || slurmd -N "$node"

# wait for the node to be idle (resume it if an earlier run left it down or drained)
for i in $(seq 150); do
  st=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  case "$st" in
    idle|mix|alloc) break ;;
    down*|drain*|drng*) [ $((i % 10)) = 1 ] && scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.2
done
sinfo -h -n "$node" -o %t | grep -Eq '^(idle|mix|alloc)$' || { sinfo; tail -20 /var/log/slurm/slurmd.log; exit 1; }
echo "slurm: node $node $(sinfo -h -n "$node" -o %t), $(scontrol ping | head -1)"
