#!/usr/bin/env bash
# End-to-end suite on a real cluster: kind with kube-proxy disabled, kproxy
# installed from charts/kproxy, and the Service behaviours Kubernetes' e2e
# suite asserts (test/e2e/network/service.go): ClusterIP reachability from
# pods, endpoints following scale up/down, no-endpoint rejection, NodePort
# (from outside the cluster, through every node: SNAT to backends on other
# nodes), externalTrafficPolicy Local with its healthCheckNodePort, ClientIP
# session affinity, `proxy-agent inspect` / `explain` on a node, and a
# DaemonSet restart that drops no request.
#
# Expected output: one "== ..." line per step followed by what it saw, and
# "kind suite: OK" at the end; any failure prints "FAIL: <step>" and exits 1.
#
# Needs Docker, kind, kubectl and helm (not available on the project's CI
# machine, which has no Docker engine). Usage: tests/kind/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-kproxy-e2e}
IMAGE=kproxy:e2e
for t in docker kind kubectl helm; do
  command -v "$t" >/dev/null || { echo "kind suite: missing $t" >&2; exit 1; }
done

cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --config tests/kind/cluster.yaml --wait 120s
# The image: an OCI archive from `cargo xtask image` when that command
# exists (no Docker build needed), else the Dockerfile.
if cargo xtask image --help >/dev/null 2>&1; then
  cargo xtask image --tag "$IMAGE" --output target/kproxy-image.tar
  kind load image-archive target/kproxy-image.tar --name "$CLUSTER"
else
  docker build -t "$IMAGE" -f charts/kproxy/Dockerfile .
  kind load docker-image "$IMAGE" --name "$CLUSTER"
fi
# Without kube-proxy the `kubernetes` ClusterIP is not programmed until
# kproxy runs: point the agent at the API server itself.
APISERVER=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$CLUSTER-control-plane")
helm install kproxy charts/kproxy -n kube-system \
  --set image.repository=kproxy --set image.tag=e2e --set image.pullPolicy=Never \
  --set k8sServiceHost="$APISERVER" --set k8sServicePort=6443 \
  --set interfaces='eth0,veth*' --set externalInterfaces=eth0
kubectl -n kube-system rollout status ds/kproxy --timeout=180s

kubectl apply -f tests/kind/workload.yaml
kubectl -n kproxy-e2e rollout status deploy/echo --timeout=120s
kubectl -n kproxy-e2e wait --for=condition=Ready pod/client --timeout=120s

fail() { echo "FAIL: $*" >&2; exit 1; }
in_client() { kubectl -n kproxy-e2e exec client -- sh -c "$1"; }
hosts() { in_client "for i in \$(seq 1 $2); do wget -qO- -T 2 http://$1/hostname || echo ERR; echo; done" | grep -v '^$' | sort | uniq -c; }

VIP=$(kubectl -n kproxy-e2e get svc echo -o jsonpath='{.spec.clusterIP}')
echo "== ClusterIP $VIP reaches every replica"
out=$(hosts "$VIP:80" 60); echo "$out"
[ "$(echo "$out" | grep -vc ERR)" -eq 3 ] || fail "expected 3 distinct backends"

echo "== scale to 1: only one backend answers"
kubectl -n kproxy-e2e scale deploy/echo --replicas=1
kubectl -n kproxy-e2e rollout status deploy/echo --timeout=120s; sleep 3
out=$(hosts "$VIP:80" 20); echo "$out"
[ "$(echo "$out" | grep -vc ERR)" -eq 1 ] || fail "expected 1 backend after scale-down"
kubectl -n kproxy-e2e scale deploy/echo --replicas=3
kubectl -n kproxy-e2e rollout status deploy/echo --timeout=120s; sleep 3

echo "== a Service without endpoints rejects at once"
EVIP=$(kubectl -n kproxy-e2e get svc empty -o jsonpath='{.spec.clusterIP}')
start=$(date +%s%N)
in_client "wget -qO- -T 5 http://$EVIP:80/ 2>&1" | grep -qi 'refused' || fail "expected connection refused"
[ $(( ($(date +%s%N) - start) / 1000000 )) -lt 2000 ] || fail "rejection took too long"

echo "== NodePort on a node address"
NODEIP=$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')
NP=$(kubectl -n kproxy-e2e get svc echo -o jsonpath='{.spec.ports[0].nodePort}')
in_client "wget -qO- -T 3 http://$NODEIP:$NP/hostname" || fail "NodePort"

echo "== NodePort from outside the cluster through every node (SNAT to backends elsewhere)"
# The kind network is outside the cluster: a throwaway container on it is
# an outside client.
for node in $(kubectl get nodes -o jsonpath='{.items[*].status.addresses[?(@.type=="InternalIP")].address}'); do
  for i in 1 2 3; do
    docker run --rm --network kind busybox:1.36 wget -qO- -T 3 "http://$node:$NP/hostname" >/dev/null \
      || fail "NodePort $node:$NP from outside"
  done
done

echo "== externalTrafficPolicy Local: client address kept, health check per node"
kubectl -n kproxy-e2e patch svc echo -p '{"spec":{"type":"LoadBalancer","externalTrafficPolicy":"Local"}}'
sleep 3
HC=$(kubectl -n kproxy-e2e get svc echo -o jsonpath='{.spec.healthCheckNodePort}')
[ -n "$HC" ] || fail "no healthCheckNodePort allocated"
for node in $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}'); do
  ip=$(kubectl get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  local=$(kubectl -n kproxy-e2e get pods -l app=echo -o jsonpath="{.items[?(@.spec.nodeName==\"$node\")].metadata.name}" | wc -w)
  code=$(docker run --rm --network kind curlimages/curl:8.10.1 -s -o /dev/null -w '%{http_code}' "http://$ip:$HC/healthz" || true)
  echo "$node: $local local endpoints, health check $code"
  if [ "$local" -gt 0 ]; then [ "$code" = 200 ] || fail "health check on $node"; else [ "$code" = 503 ] || fail "health check on $node"; fi
done
kubectl -n kproxy-e2e patch svc echo -p '{"spec":{"type":"NodePort","externalTrafficPolicy":"Cluster"}}'

echo "== proxy-agent inspect and explain on a node"
AGENT=$(kubectl -n kube-system get pods -l app.kubernetes.io/name=kproxy -o jsonpath='{.items[0].metadata.name}')
kubectl -n kube-system exec "$AGENT" -- proxy-agent inspect services | tee /tmp/kproxy-inspect.out
grep -q 'kproxy-e2e/echo' /tmp/kproxy-inspect.out || fail "inspect does not name the echo Service"
kubectl -n kube-system exec "$AGENT" -- proxy-agent explain --from 10.244.9.9 --to "$VIP:80/tcp" | tee /tmp/kproxy-explain.out
grep -qi 'echo' /tmp/kproxy-explain.out || fail "explain does not name the Service"

echo "== ClientIP affinity"
AVIP=$(kubectl -n kproxy-e2e get svc sticky -o jsonpath='{.spec.clusterIP}')
out=$(hosts "$AVIP:80" 20); echo "$out"
[ "$(echo "$out" | wc -l)" -eq 1 ] || fail "affinity: more than one backend"

echo "== restarting kproxy drops no request"
in_client "i=0; f=0; while [ \$i -lt 400 ]; do wget -qO- -T 2 http://$VIP:80/hostname >/dev/null || f=\$((f+1)); i=\$((i+1)); done; echo failures=\$f" > /tmp/kproxy-stream.out &
sleep 1
kubectl -n kube-system rollout restart ds/kproxy
kubectl -n kube-system rollout status ds/kproxy --timeout=180s
wait
cat /tmp/kproxy-stream.out
grep -q 'failures=0' /tmp/kproxy-stream.out || fail "requests failed during the restart"
echo "kind suite: OK"
