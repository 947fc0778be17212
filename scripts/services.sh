#!/usr/bin/env bash
# PostgreSQL, Redis and RabbitMQ for Checkout Pulse, at the URLs the system itself reads (SPEC §7).
#
#   scripts/services.sh up       use what answers; start what does not (Docker Compose where a Docker
#                                engine answers, else the locally installed Debian servers); make sure a
#                                local PostgreSQL runs with wal_level=logical (restarting it if needed) and
#                                caps the WAL a replication slot may keep (max_slot_wal_keep_size, 4GB)
#   scripts/services.sh check    change nothing; exit 1 unless all three answer and wal_level=logical
#   scripts/services.sh status   change nothing; print what answers where
#   scripts/services.sh missing-packages   the Debian packages that `up` would need but are not installed
#
# Settings: PULSE_DATABASE_URL, PULSE_REDIS_URL, PULSE_AMQP_URL (defaults on 127.0.0.1) and
# PULSE_SERVICES_TIMEOUT (seconds to wait for readiness, default 120).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$PATH:/usr/sbin:/sbin"

PG_URL="${PULSE_DATABASE_URL:-postgresql://postgres:postgres@127.0.0.1:5432/pulse}"
REDIS_URL="${PULSE_REDIS_URL:-redis://127.0.0.1:6379/0}"
AMQP_URL="${PULSE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
TIMEOUT_S="${PULSE_SERVICES_TIMEOUT:-120}"
SLOT_WAL_CAP=4GB   # max_slot_wal_keep_size set where it is unlimited (-1); docker/compose.yaml sets the same
KINDS=(postgres redis amqp)
COMPOSE=(docker compose -f docker/compose.yaml)

PY="$(command -v python3 || true)"
[[ -n "$PY" ]] || PY="$ROOT/.venv/bin/python"

say() { printf 'services: %s\n' "$*"; }
fail() { printf 'services: %s\n' "$*" >&2; exit 1; }
run() { say "running: $*"; "$@"; }
run_root() { say "running: $*"; as_root "$@"; }

url_of() {
  case "$1" in postgres) echo "$PG_URL" ;; redis) echo "$REDIS_URL" ;; amqp) echo "$AMQP_URL" ;; esac
}
title_of() {
  case "$1" in postgres) echo PostgreSQL ;; redis) echo Redis ;; amqp) echo RabbitMQ ;; esac
}
env_of() {
  case "$1" in postgres) echo PULSE_DATABASE_URL ;; redis) echo PULSE_REDIS_URL ;; amqp) echo PULSE_AMQP_URL ;; esac
}
package_of() {
  case "$1" in postgres) echo postgresql ;; redis) echo redis-server ;; amqp) echo rabbitmq-server ;; esac
}
compose_service_of() {
  case "$1" in postgres) echo postgres ;; redis) echo redis ;; amqp) echo rabbitmq ;; esac
}

answers() { "$PY" scripts/probe.py answers "$1" "$(url_of "$1")"; }
where() { "$PY" scripts/probe.py where "$1" "$(url_of "$1")"; }   # prints: host port local(yes|no)
host_port() { local h p _l; read -r h p _l < <(where "$1"); echo "$h:$p"; }
is_local() { [[ "$(where "$1" | awk '{print $3}')" == yes ]]; }
port_of() { where "$1" | awk '{print $2}'; }

# PostgreSQL accepts the SSL handshake while it is still recovering; pg_isready also waits for that.
ready() {
  answers "$1" || return 1
  if [[ "$1" == postgres ]] && command -v pg_isready >/dev/null; then
    pg_isready -q -t 3 -d "$PG_URL" >/dev/null 2>&1 || return 1
  fi
}

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}
as_postgres() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

docker_engine() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1
}

# The local Debian cluster ("15 main") that serves the configured port; nothing when none does.
pg_cluster_on_port() {
  command -v pg_lsclusters >/dev/null || return 1
  local line
  line="$(pg_lsclusters -h 2>/dev/null | awk -v p="$(port_of postgres)" '$3 == p {print $1, $2; exit}')"
  [[ -n "$line" ]] && echo "$line"
}

# The cluster to start: the one on the configured port, else the newest installed version's main.
pg_cluster() {
  pg_cluster_on_port && return 0
  [[ -d /etc/postgresql ]] || return 1
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  [[ -n "$version" && -d "/etc/postgresql/$version/main" ]] || return 1
  echo "$version main"
}

local_server_installed() {
  case "$1" in
    postgres) command -v pg_ctlcluster >/dev/null && pg_cluster >/dev/null ;;
    redis) command -v redis-server >/dev/null ;;
    amqp) command -v rabbitmq-server >/dev/null ;;
  esac
}

# A server that a package's install script launched may still be booting: the readiness wait decides.
starting_anyway() { say "that start command failed; $(title_of "$1") may already be starting, so waiting for it"; }

start_local() {
  case "$1" in
    postgres)
      local version cluster
      read -r version cluster < <(pg_cluster)
      run_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || starting_anyway postgres ;;
    redis)
      as_root mkdir -p /var/lib/redis /var/log/redis
      run_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$(port_of redis)" --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || starting_anyway redis ;;
    amqp)
      run_root rabbitmq-server -detached || starting_anyway amqp ;;
  esac
}

# Start every service that does not answer; print the one install message when something is missing.
start_missing() {
  local kind missing=() started=() engine=""
  for kind in "${KINDS[@]}"; do
    if answers "$kind"; then
      say "$(title_of "$kind") answers at $(host_port "$kind")"
      continue
    fi
    if ! is_local "$kind"; then
      fail "$(title_of "$kind") does not answer at $(host_port "$kind"), which is not this machine: start it there, or point $(env_of "$kind") at one that runs."
    fi
    [[ -n "$engine" ]] || { docker_engine && engine=yes || engine=no; }
    if [[ "$engine" == yes ]]; then
      run "${COMPOSE[@]}" up -d "$(compose_service_of "$kind")"
    elif local_server_installed "$kind"; then
      start_local "$kind"
    else
      missing+=("$(package_of "$kind")")
      continue
    fi
    started+=("$kind")
  done
  if ((${#missing[@]})); then
    fail "nothing answers for ${missing[*]} and neither a Docker engine nor the local servers are installed: install them with 'sudo apt-get install ${missing[*]}' (Debian/Ubuntu), or install Docker with the compose plugin, then run 'scripts/services.sh up' again."
  fi
  ((${#started[@]})) && wait_ready "${started[@]}"
  return 0
}

wait_ready() {
  local deadline=$((SECONDS + TIMEOUT_S)) kind pending=("$@") still
  say "waiting up to ${TIMEOUT_S}s for: $*"
  while ((${#pending[@]})); do
    still=()
    for kind in "${pending[@]}"; do
      if ready "$kind"; then say "$(title_of "$kind") is ready at $(host_port "$kind")"; else still+=("$kind"); fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    if ((SECONDS >= deadline)); then
      fail "not ready after ${TIMEOUT_S}s: ${pending[*]} (logs: /var/log/postgresql, /var/log/redis/ci.log, /var/log/rabbitmq; raise PULSE_SERVICES_TIMEOUT to wait longer)."
    fi
    sleep 1
  done
}

# One SQL statement against the "postgres" database; prints the value. psql if present, else the .venv's psycopg.
pg_sql() {
  local admin
  admin="$("$PY" scripts/probe.py admin-url "$PG_URL")"
  if command -v psql >/dev/null; then
    PGCONNECT_TIMEOUT=5 psql -X -w -A -t -q -v ON_ERROR_STOP=1 -d "$admin" -c "$1"
  elif [[ -x .venv/bin/python ]]; then
    .venv/bin/python -c 'import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=5) as c:
    r = c.execute(sys.argv[2]); print(r.fetchone()[0] if r.description else "")' "$admin" "$1"
  else
    echo "no psql and no .venv to ask PostgreSQL with: install postgresql-client or run scripts/bootstrap.sh" >&2
    return 3
  fi
}

# A fresh Debian cluster only lets the postgres role in through the local socket (peer auth), so the
# password in the URL has never been set; set it, as the postgres OS user, over that socket.
fix_pg_login() {
  local err user password port
  err="$(pg_sql 'SELECT 1' 2>&1 >/dev/null)" && return 0
  if [[ "$err" != *"password authentication failed"* && "$err" != *"no password supplied"* ]] || ! is_local postgres \
     || ! pg_cluster_on_port >/dev/null; then
    fail "cannot log in to PostgreSQL at $(host_port postgres): ${err%%$'\n'*}"
  fi
  read -r user password < <("$PY" -c 'import sys; from urllib.parse import urlsplit, unquote
u = urlsplit(sys.argv[1]); print(unquote(u.username or "postgres"), unquote(u.password or ""))' "$PG_URL")
  [[ -n "$password" ]] || fail "cannot log in to PostgreSQL at $(host_port postgres) and the URL has no password to set: ${err%%$'\n'*}"
  port="$(port_of postgres)"
  say "setting the password of PostgreSQL role $user from PULSE_DATABASE_URL (peer login as the postgres OS user)"
  as_postgres psql -X -q -p "$port" -v ON_ERROR_STOP=1 -v u="$user" -v pw="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN SUPERUSER', :'u') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'u')
\gexec
ALTER ROLE :"u" WITH LOGIN PASSWORD :'pw';
SQL
  pg_sql 'SELECT 1' >/dev/null || fail "still cannot log in to PostgreSQL at $(host_port postgres); check pg_hba.conf of the local cluster."
}

wal_level() { pg_sql 'SHOW wal_level'; }

# The CDC relay reads the WAL through a logical replication slot, which needs wal_level=logical.
ensure_logical_wal() {
  local level version cluster
  level="$(wal_level)"
  if [[ "$level" == logical ]]; then say "PostgreSQL wal_level=logical"; return 0; fi
  if ! is_local postgres || ! pg_cluster_on_port >/dev/null; then
    fail "PostgreSQL at $(host_port postgres) runs with wal_level=$level; the CDC relay needs logical: set wal_level = logical in its configuration and restart it."
  fi
  read -r version cluster < <(pg_cluster_on_port)
  say "PostgreSQL wal_level=$level; switching the local cluster $version/$cluster to logical (needs a restart)"
  say "running: ALTER SYSTEM SET wal_level = logical"
  pg_sql 'ALTER SYSTEM SET wal_level = logical' >/dev/null
  run_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" restart
  wait_ready postgres
  level="$(wal_level)"
  [[ "$level" == logical ]] || fail "PostgreSQL still reports wal_level=$level after the restart; see /var/log/postgresql."
  say "PostgreSQL wal_level=logical"
}

slot_wal_cap() { pg_sql 'SHOW max_slot_wal_keep_size'; }

# A slot nobody reads keeps WAL until the disk is full and PostgreSQL stops for everyone. With a cap, the server
# removes that WAL at a checkpoint and marks the slot lost; the CDC relay then creates it again, losing nothing.
# A reload is enough for this parameter. A cap someone chose (anything but -1) is left alone.
ensure_slot_wal_cap() {
  local cap i
  cap="$(slot_wal_cap)"
  if [[ "$cap" != -1 ]]; then say "PostgreSQL max_slot_wal_keep_size=$cap"; return 0; fi
  if ! is_local postgres; then
    say "PostgreSQL at $(host_port postgres) lets replication slots keep unlimited WAL (max_slot_wal_keep_size=-1); consider ALTER SYSTEM SET max_slot_wal_keep_size = '$SLOT_WAL_CAP' and a reload there."
    return 0
  fi
  say "running: ALTER SYSTEM SET max_slot_wal_keep_size = '$SLOT_WAL_CAP'; SELECT pg_reload_conf()"
  pg_sql "ALTER SYSTEM SET max_slot_wal_keep_size = '$SLOT_WAL_CAP'" >/dev/null
  pg_sql 'SELECT pg_reload_conf()' >/dev/null
  # Each new session reads the configuration once the postmaster has handled the reload signal.
  for i in 1 2 3 4 5 6 7 8 9 10; do
    cap="$(slot_wal_cap)"
    [[ "$cap" == -1 ]] || break
    sleep 0.2
  done
  [[ "$cap" != -1 ]] || fail "PostgreSQL still reports max_slot_wal_keep_size=-1 after ALTER SYSTEM and a reload; see /var/log/postgresql."
  say "PostgreSQL max_slot_wal_keep_size=$cap"
}

# The Debian packages to install for services that do not answer and that nothing here could start.
cmd_missing_packages() {
  local kind packages=()
  for kind in "${KINDS[@]}"; do
    answers "$kind" || ! is_local "$kind" || local_server_installed "$kind" || packages+=("$(package_of "$kind")")
  done
  if ((${#packages[@]})) && docker_engine; then packages=(); fi
  echo "${packages[*]+"${packages[*]}"}"
}

cmd_up() {
  start_missing
  fix_pg_login
  ensure_logical_wal
  ensure_slot_wal_cap
  say "all services answer"
}

# status and check share this report; returns the number of problems.
report() {
  local kind problems=0 level cap
  for kind in "${KINDS[@]}"; do
    if answers "$kind"; then
      printf '  %-10s %-22s answers\n' "$(title_of "$kind")" "$(host_port "$kind")"
    else
      printf '  %-10s %-22s DOWN\n' "$(title_of "$kind")" "$(host_port "$kind")"
      problems=$((problems + 1))
    fi
  done
  if answers postgres; then
    if level="$(wal_level 2>/dev/null)"; then
      printf '  %-10s wal_level=%s%s\n' PostgreSQL "$level" "$([[ "$level" == logical ]] || echo ' (the CDC relay needs logical)')"
      [[ "$level" == logical ]] || problems=$((problems + 1))
      cap="$(slot_wal_cap 2>/dev/null || echo '?')"
      printf '  %-10s max_slot_wal_keep_size=%s%s\n' PostgreSQL "$cap" \
        "$([[ "$cap" != -1 ]] || echo ' (unlimited: an abandoned slot can fill the disk; `up` sets '"$SLOT_WAL_CAP"')')"
    else
      printf '  %-10s cannot log in to read wal_level\n' PostgreSQL
      problems=$((problems + 1))
    fi
  fi
  return "$problems"
}

case "${1:-}" in
  up) cmd_up ;;
  status) report || true ;;
  check) report || fail "not ready: run 'scripts/services.sh up'." ;;
  missing-packages) cmd_missing_packages ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
