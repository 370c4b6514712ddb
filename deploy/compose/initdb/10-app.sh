#!/usr/bin/env bash
# First start of the postgres container only (docker-entrypoint-initdb.d):
# database "app" of the reference application, with its tables from
# deploy/local/source-schema.sql (mounted at /opt/freshet/source-schema.sql).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE app OWNER \"$POSTGRES_USER\""
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname app -f /opt/freshet/source-schema.sql
