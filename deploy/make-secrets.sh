#!/usr/bin/env bash
# Certificates and client config for the production compose file's SASL_SSL broker.
# Writes deploy/secrets/: ca.pem (clients verify the broker with it), broker.pem (the
# broker's key + certificate, SAN kafka and localhost), client.properties (the broker's own
# health check; it holds $KAFKA_PASSWORD, so the directory is created 0700).
set -euo pipefail
: "${KAFKA_PASSWORD:?export KAFKA_PASSWORD first}"
out="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$out" && chmod 700 "$out"
cd "$out"
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=apmae-ca" -keyout ca.key -out ca.pem
openssl req -newkey rsa:3072 -nodes -subj "/CN=kafka" -keyout broker.key -out broker.csr
printf "subjectAltName=DNS:kafka,DNS:localhost\n" > san.ext
openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -extfile san.ext -out broker.crt
cat broker.key broker.crt > broker.pem
cat > client.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="apmae" password="${KAFKA_PASSWORD}";
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/secrets/ca.pem
PROPS
chmod 600 broker.pem broker.key ca.key client.properties
rm -f broker.csr san.ext
echo "wrote $out"
