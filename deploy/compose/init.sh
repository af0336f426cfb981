#!/bin/sh
# The compose stack's one-shot init (boilerhouse/tools image, as root):
# makes what is missing of the credentials and the workloads, keeps what
# exists, so it runs at every `up`.
#
#   /var/lib/boilerhouse   the server's volume: pki/ (CA, server and node
#                          certificates), tokens.toml, admin.token (an admin
#                          token for bh), workloads/ (seeded once)
#   /agent-tls             the agents' volume: ca.pem and <node>.pem/.key only
#                          (the CA's key stays with the server)
#
# $BOILERHOUSE_NODES names the agents; $BOILERHOUSE_SAN the server's name.
set -eu
data=/var/lib/boilerhouse

set --
for node in $BOILERHOUSE_NODES; do
  set -- "$@" --node "$node"
done
boilerhoused --data-dir "$data" pki init --san "$BOILERHOUSE_SAN" "$@"

if ! [ -e "$data/admin.token" ]; then
  boilerhoused --data-dir "$data" token create \
    --name compose-admin --scope admin --out "$data/admin.token"
fi

# The example workloads, on the first run only: a workload deleted
# through the API stays deleted.
if ! [ -e "$data/.workloads-seeded" ]; then
  mkdir -p "$data/workloads"
  for name in $BOILERHOUSE_WORKLOADS; do
    cp "/examples/workloads/$name.yaml" "$data/workloads/$name.yaml"
    echo "init: workload $name added"
  done
  touch "$data/.workloads-seeded"
fi

# The server runs as 65532.
chown -R 65532:65532 "$data"

cp "$data/pki/ca.pem" /agent-tls/ca.pem
for node in $BOILERHOUSE_NODES; do
  cp "$data/pki/nodes/$node.pem" "$data/pki/nodes/$node.key" /agent-tls/
done
chmod 0600 /agent-tls/*.key
echo "init: credentials for $BOILERHOUSE_SAN and $BOILERHOUSE_NODES are in place"
