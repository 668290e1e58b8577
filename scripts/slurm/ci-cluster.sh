#!/usr/bin/env bash
# A real 2-node Slurm cluster on this one machine, for tests: Debian's slurm-wlm (22.05), two
# slurmd ("nodes" n1 and n2), each in its own network namespace with its own address
# (10.77.0.11, 10.77.0.12) on a bridge that lives in a third namespace, so nothing is added to
# the machine's own network. auth/none, no cgroups (proctrack/linuxproc, task/none).
#   ci-cluster.sh up DIR     installs slurm-wlm if missing, starts it; prints SLURM_CONF's path
#   ci-cluster.sh down DIR   stops the daemons by their pid files, removes the namespaces
#   ci-cluster.sh exec DIR CMD...   runs CMD on n1's network (where sbatch and scontrol work)
# Needs root. Namespaces are named after DIR's last component, so two clusters can coexist.
set -euo pipefail
cmd=$1; D=$2; shift 2
tag=$(basename "$D" | tr -c 'a-zA-Z0-9\n' '-' | cut -c1-8)
ns() { echo "grpo-$tag-$1"; }
case "$cmd" in
up)
  command -v slurmctld > /dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm > /dev/null
  }
  rm -rf "$D"; mkdir -p "$D"/state "$D"/log "$D"/spool/n1 "$D"/spool/n2
  ip netns add "$(ns br)"; ip netns add "$(ns n1)"; ip netns add "$(ns n2)"
  ip -n "$(ns br)" link add br0 type bridge; ip -n "$(ns br)" link set br0 up
  for i in 1 2; do
    ip link add "veth-n$i" netns "$(ns n$i)" type veth peer name "p$i" netns "$(ns br)"
    ip -n "$(ns br)" link set "p$i" master br0; ip -n "$(ns br)" link set "p$i" up
    ip -n "$(ns n$i)" addr add "10.77.0.1$i/24" dev "veth-n$i"
    ip -n "$(ns n$i)" link set "veth-n$i" up; ip -n "$(ns n$i)" link set lo up
  done
  cat > "$D/slurm.conf" <<CONF
ClusterName=grpo-ci
SlurmctldHost=$(hostname -s)(10.77.0.11)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
NodeName=n1 NodeHostname=n1 NodeAddr=10.77.0.11 CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=10.77.0.12 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$D/slurm.conf
  nsenter --net="/run/netns/$(ns n1)" slurmctld -f "$SLURM_CONF"
  nsenter --net="/run/netns/$(ns n1)" slurmd -f "$SLURM_CONF" -N n1
  nsenter --net="/run/netns/$(ns n2)" slurmd -f "$SLURM_CONF" -N n2
  # Ready = a 2-node step really runs (sinfo can say idle before a slurmd has registered).
  for _ in $(seq 1 80); do
    if nsenter --net="/run/netns/$(ns n1)" timeout 10 srun -N2 -n2 --immediate=5 true 2> /dev/null; then
      echo "$SLURM_CONF"; exit 0
    fi
    sleep 0.5
  done
  echo "slurm did not come up" >&2; tail -n 20 "$D"/log/*.log >&2; exit 1
  ;;
down)
  for f in "$D"/slurmd-n1.pid "$D"/slurmd-n2.pid "$D"/slurmctld.pid; do
    [ -f "$f" ] && kill -TERM "$(cat "$f")" 2> /dev/null || true
  done
  for f in "$D"/slurmd-n1.pid "$D"/slurmd-n2.pid "$D"/slurmctld.pid; do
    for _ in $(seq 1 50); do [ -f "$f" ] && kill -0 "$(cat "$f")" 2> /dev/null || break; sleep 0.1; done
  done
  for n in n1 n2 br; do ip netns del "$(ns $n)" 2> /dev/null || true; done
  ;;
exec)
  export SLURM_CONF=$D/slurm.conf
  exec nsenter --net="/run/netns/$(ns n1)" "$@"
  ;;
*) echo "usage: $0 up|down|exec DIR [CMD...]" >&2; exit 2 ;;
esac
