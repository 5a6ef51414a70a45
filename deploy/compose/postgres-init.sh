#!/bin/sh
# Runs once, when the postgres container initialises its data directory: the login roles
# of the two services, with the passwords the `secrets` one-shot made (read by psql's
# \set from the files, never put in argv). `vigil migrate` then grants them exactly what
# vigil/core/roles.sql lists (docs/operations.md, "Database roles").
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\set liveness `cat /secrets/postgres/liveness.password`
\set tasks `cat /secrets/postgres/tasks.password`
CREATE ROLE vigil_liveness LOGIN PASSWORD :'liveness';
CREATE ROLE vigil_tasks LOGIN PASSWORD :'tasks';
CREATE ROLE vigil_readonly NOLOGIN;
SQL
