#!/bin/sh
# Run by the postgres image on first start (docker-entrypoint-initdb.d). Creates the demo
# tenants with passwords from the environment; pgtenant-demo.psql holds the statements.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v acme_password="$PGTENANT_ACME_PASSWORD" \
  -v shared_password="$PGTENANT_SHARED_PASSWORD" \
  -v audit_password="$PGTENANT_AUDIT_PASSWORD" \
  -f /docker-entrypoint-initdb.d/pgtenant-demo.psql
