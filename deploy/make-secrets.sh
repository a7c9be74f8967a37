#!/usr/bin/env bash
# Every secret of the production compose file, as files under deploy/secrets/ (directory 0700,
# files 0600); compose hands them to containers as /run/secrets/* (nothing in env or argv).
#   deploy/secrets/kafka_password, redis_password, grafana_admin_password: taken from
#     $KAFKA_PASSWORD / $REDIS_PASSWORD / $GRAFANA_ADMIN_PASSWORD when set, else random
#     (32 hex bytes); an existing file is kept, so re-running never rotates a password.
#   deploy/secrets/redis_url: redis://:<password>@redis:6379/0 for the apmae services.
#   deploy/secrets/ca.key: the CA's private key; it stays here, mounted nowhere.
#   deploy/secrets/kafka/ (mounted read-only into the broker only): ca.pem (clients verify the
#     broker with it), broker.pem (key + certificate, SAN kafka and localhost),
#     kafka_server_jaas.conf (the broker's SASL users), client.properties (its health check).
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/secrets"
umask 077
mkdir -p "$out/kafka" && chmod 700 "$out" "$out/kafka"
cd "$out"

secret() {  # secret <file> <env value>: keep an existing file, else the value, else random
  local file=$1 value=${2:-}
  if [ ! -s "$file" ]; then
    [ -n "$value" ] || value=$(openssl rand -hex 32)
    printf '%s' "$value" > "$file"
  fi
}
secret kafka_password "${KAFKA_PASSWORD:-}"
secret redis_password "${REDIS_PASSWORD:-}"
secret grafana_admin_password "${GRAFANA_ADMIN_PASSWORD:-}"
case "$(cat kafka_password)$(cat redis_password)" in
  *[!A-Za-z0-9._~-]*) echo "make-secrets: passwords may use only A-Z a-z 0-9 . _ ~ - (they go into URLs and JAAS)" >&2; exit 1;;
esac
kafka_pw=$(cat kafka_password)
printf 'redis://:%s@redis:6379/0' "$(cat redis_password)" > redis_url

if [ ! -s ca.key ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=apmae-ca" -keyout ca.key -out kafka/ca.pem
fi
if [ ! -s kafka/broker.pem ]; then
  openssl req -newkey rsa:3072 -nodes -subj "/CN=kafka" -keyout broker.key -out broker.csr
  printf "subjectAltName=DNS:kafka,DNS:localhost\n" > san.ext
  openssl x509 -req -in broker.csr -CA kafka/ca.pem -CAkey ca.key -CAserial ca.srl -CAcreateserial -days 825 \
    -extfile san.ext -out broker.crt
  cat broker.key broker.crt > kafka/broker.pem
  rm -f broker.csr san.ext broker.key broker.crt
fi
cat > kafka/kafka_server_jaas.conf <<JAAS
KafkaServer {
  org.apache.kafka.common.security.plain.PlainLoginModule required
  username="apmae" password="${kafka_pw}" user_apmae="${kafka_pw}";
};
JAAS
cat > kafka/client.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="apmae" password="${kafka_pw}";
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/secrets/ca.pem
PROPS
find . -type f -exec chmod 600 {} +
# Compose bind-mounts secret files with their host owner and mode. The broker runs as the
# image's appuser (uid 1000), Grafana as uid 472: they must own their files.
if [ "$(id -u)" = 0 ]; then
  chown -R 1000 kafka && chown 472 grafana_admin_password
else
  echo "make-secrets: as root run: chown -R 1000 $out/kafka && chown 472 $out/grafana_admin_password" >&2
fi
echo "wrote $out"
