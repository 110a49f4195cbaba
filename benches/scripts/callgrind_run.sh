#!/bin/bash
# Instructions one gateway run takes for N sequential requests (chat|stream)
# under callgrind; per request = (run N=1200 - run N=200) / 1000.
# usage: callgrind_run.sh SLUICE_BIN N chat|stream [management|trace] -> prints the total
# With `management`, the gateway also runs its management listener (which
# turns on the request summaries every request leaves); with `trace`, every
# request also carries a debug credential and is traced.
BIN=$1; N=$2; MODE=$3; MGMT=${4:-}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "$BIN")
W=$(mktemp -d)
cd "$W"
echo -n cg-key-0123456789 > key
echo -n backend-key > bkey
$BIN sim --listen 127.0.0.1:0 --api-key-file bkey --completion-tokens 16 > sim.out 2>/dev/null &
SIM=$!
for i in $(seq 100); do grep -q "listening on" sim.out && break; sleep 0.05; done
SIMURL=$(grep -o "http://[0-9.:]*" sim.out | head -1)
MGMT_YAML=""
[ "$MGMT" = management ] && MGMT_YAML=", management: {listen: 127.0.0.1:0}"
if [ "$MGMT" = trace ]; then
  echo -n cg-debug-signing-key-0123456789abcdef > sk
  MGMT_YAML=", management: {listen: 127.0.0.1:0, debug_signing_key: {file: sk}}"
  NOW=$(date +%s)
  TRACE_TOKEN=$(python3 - "$NOW" <<'PY'
import base64, hashlib, hmac, json, sys
now = int(sys.argv[1])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
body = b64(json.dumps({"aid": "a", "p": "tracing", "iat": now, "exp": now + 3600, "iss": "sluice"}).encode())
sig = hmac.new(b"cg-debug-signing-key-0123456789abcdef", f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
)
  export TRACE_TOKEN
fi
cat > gw.yaml <<YAML
server: {listen: 127.0.0.1:0, threads: 1$MGMT_YAML}
backends: [{name: b, url: '$SIMURL', api_key: {file: bkey}}]
subscriptions: [{name: t, primary_key: {file: key}}]
apis: [{name: a, path: /openai, backends: [b]}]
YAML
valgrind --tool=callgrind --callgrind-out-file=cg.out $BIN run -c gw.yaml > gw.out 2>/dev/null &
GW=$!
for i in $(seq 600); do grep -q "listening on" gw.out && break; sleep 0.1; done
URL=$(grep "listening on" gw.out | grep -o "[0-9.]*:[0-9]*$")
HOST=${URL%:*}; PORT=${URL##*:}
# wait until it accepts
for i in $(seq 600); do python3 -c "import socket;socket.create_connection(('$HOST',$PORT),1)" 2>/dev/null && break; sleep 0.1; done
python3 "$HERE/callgrind_drive.py" $HOST $PORT $N $MODE
kill -INT $GW; wait $GW
kill $SIM; wait $SIM 2>/dev/null
grep ^totals cg.out | awk '{print $2}'
