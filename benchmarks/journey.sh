#!/usr/bin/env bash
# The README's deployment journey on one machine (loopback), each step timed: a fresh clone, make setup,
# provision, SuperLink, three hospitals holding DICOM folders, site check, status, `medsilo server run`, report,
# ledger, audit verify, SIGTERM. Usage: bash benchmarks/journey.sh [WORKDIR] [REPOSITORY] (default: /tmp/medsilo-journey,
# this checkout). The hospitals' archives are written with MedMNIST from ../shared/data; the coordinator gets no data.
set -uo pipefail
ROOT=${1:-/tmp/medsilo-journey}
SRC=$(cd "${2:-$(dirname "$0")/..}" && pwd)
rm -rf "$ROOT"; mkdir -p "$ROOT"; cd "$ROOT"
t() { local s=$(date +%s.%N); "$@"; local rc=$?; printf 'STEP %-40s rc=%s %6.1f s\n' "$STEPNAME" "$rc" "$(echo "$(date +%s.%N) - $s" | bc)"; return $rc; }
STEPNAME="git clone"; t git clone -q "$SRC" medsilo
cd medsilo
STEPNAME="make setup"; t bash -c "make setup >/dev/null 2>&1"
M=$PWD/.venv/bin/medsilo
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > federation.toml <<EOF
[federation]
name = "journey"

[coordinator]
hosts = ["127.0.0.1"]
port = $PORT
bind = "127.0.0.1"

[[sites]]
name = "h0"
[[sites]]
name = "h1"
[[sites]]
name = "h2"
EOF
STEPNAME="medsilo provision"; t $M provision federation.toml --out kits
STEPNAME="hospital archives (medsilo archive)"; t bash -c "MEDSILO_DATA=$(cd $SRC/../shared/data/medmnist && pwd) $M archive --dataset breastmnist --sites 3 --partition iid --out archives >/dev/null 2>&1"
$M server start --kit kits/coordinator > server.log 2>&1 &
SERVER=$!
STEPNAME="server start -> ready"; t bash -c 'until grep -q "hospital keys registered" server.log; do sleep 0.5; kill -0 '$SERVER' || exit 1; done'
for i in 0 1 2; do
  STEPNAME="site check h$i"; t bash -c "$M site check --data archives/site-0$i --dataset breastmnist --state-dir kits/h$i/state > check-h$i.log 2>&1"
done
NODES=()
for i in 0 1 2; do
  $M client start --kit kits/h$i --data archives/site-0$i --runtime-port $((PORT + 10 + i)) > node-h$i.log 2>&1 &
  NODES+=($!)
done
for i in 0 1 2; do
  STEPNAME="client start h$i -> joined"; t bash -c 'until grep -q "joined federation" node-h'$i'.log; do sleep 0.5; kill -0 '${NODES[$i]}' || exit 1; done'
done
STEPNAME="status (coordinator)"; t $M status --kit kits/coordinator > status-coordinator.txt
STEPNAME="status (h0)"; t $M status --kit kits/h0 > status-h0.txt
STEPNAME="server run (breastmnist, DP, SecAgg+)"; t $M server run --kit kits/coordinator --app . -c "dataset='breastmnist' min-sites=3 out-dir='$PWD/runs/r1' round-timeout=300.0" > run.log 2>&1
STEPNAME="report"; t $M report runs/r1 > report.log 2>&1
STEPNAME="site ledger h0"; t $M site ledger --kit kits/h0 > ledger-h0.txt 2>&1
STEPNAME="audit verify h0"; t $M audit verify kits/h0/state/audit.jsonl --key kits/h0/node.pub > audit-h0.txt 2>&1
s0=$(date +%s.%N); kill -TERM "${NODES[@]}" $SERVER; wait "${NODES[@]}" $SERVER; echo "STEP SIGTERM nodes + server -> exited         codes=$? $(echo "$(date +%s.%N) - $s0" | bc) s"
sleep 1
echo "left running: $(pgrep -af 'flower-|flwr-|client.supernode|server.tls13|clientapp' | grep -v pgrep | grep -c "$ROOT")"
tail -3 run.log; cat report.log; head -12 status-coordinator.txt
