#!/bin/sh
# compose.yaml's `secrets` one-shot: makes this installation's secrets once, into the
# `secrets` volume, each file owner-only and owned by the user that reads it. Nothing
# secret is in the repository, in argv or in the compose file; run again, it keeps
# what exists. Runs as root in the Vigil image (python and `vigil` are there).
set -eu
umask 077
S=/secrets
VIGIL=10001      # the image's `vigil` user
POSTGRES=999     # the postgres image's `postgres` user
GRAFANA=472      # the grafana image's `grafana` user
mkdir -p "$S/vigil" "$S/postgres" "$S/grafana"

password() {  # a random password into $1, if missing
    [ -s "$1" ] || python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$1"
}
for role in owner liveness tasks; do password "$S/postgres/$role.password"; done
password "$S/grafana/admin.password"

# The admin token the task service accepts (VIGIL_BOOTSTRAP_TOKEN) and the CLI presents.
[ -s "$S/vigil/admin.token" ] || python -c \
    'from vigil.core.auth.principal import new_token; print(new_token()[1])' \
    > "$S/vigil/admin.token"

# asyncpg reads passwords from PGPASSFILE (owner-only), never from a URL: one file per
# login, so a service's file holds only its own password.
for role in owner liveness tasks; do
    printf 'postgres:5432:vigil:vigil_%s:%s\n' "$role" "$(cat "$S/postgres/$role.password")" \
        > "$S/vigil/pgpass-$role"
done

# A development CA for the services' names (use your own CA in production).
[ -s "$S/vigil/tls/server.pem" ] || vigil tls dev-ca --out "$S/vigil/tls" --days 365 \
    --host vigil --host liveness --host tasks --host localhost --host 127.0.0.1 \
    --machine box-1 --client agent

chown -R "$VIGIL:$VIGIL" "$S/vigil"
chown -R "$POSTGRES:$POSTGRES" "$S/postgres"
chown -R "$GRAFANA:$GRAFANA" "$S/grafana"
chmod 0755 "$S" "$S/vigil" "$S/vigil/tls"
chmod 0700 "$S/postgres" "$S/grafana"
chmod 0644 "$S/vigil/tls/ca.pem"   # public: Prometheus (another user) verifies with it
rm -f "$S/vigil/tls/ca.key"        # nothing here signs more certificates
echo "secrets ready in the secrets volume"
