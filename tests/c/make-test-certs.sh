#!/usr/bin/env bash
# Writes a throwaway test CA (ca.pem) and a 127.0.0.1 server certificate (cert.pem,
# key.pem) for the harness's wss test into DIR.
#
#   tests/c/make-test-certs.sh DIR
set -euo pipefail

tls=${1:?usage: $0 DIR}
mkdir -p "$tls"
command -v openssl >/dev/null || { echo "openssl is needed to make the test certificates" >&2; exit 2; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=wps-test-ca -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout "$tls/key.pem" -out "$tls/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' > "$tls/ext.cnf"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 2 \
    -extfile "$tls/ext.cnf" -out "$tls/cert.pem" 2>/dev/null
