#!/usr/bin/env bash
# Install wsagent as a systemd service: a virtualenv in /opt/wsagent, the unit, an environment file,
# and a JWT secret as a systemd credential. Run as root from a checkout: sudo scripts/install-systemd.sh
# With --cluster: the cluster extra (redis-py, hiredis), and the drop-in that starts wsagent after the
# local Redis (set WSAGENT_REDIS_URL in /etc/wsagent/wsagent.env).
# --print-unit prints the unit as it would be installed (for WSAGENT_PREFIX), and changes nothing.
set -euo pipefail
cluster=${1:-}
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${WSAGENT_PREFIX:-/opt/wsagent}

unit() { sed "s|/opt/wsagent|$prefix|g" "$here/scripts/wsagent.service"; }  # the venv, and Documentation=
if [ "$cluster" = --print-unit ]; then unit; exit 0; fi

python3 -m venv "$prefix/venv"
if [ "$cluster" = --cluster ]; then
  "$prefix/venv/bin/pip" install --quiet "$here[cluster]"
else
  "$prefix/venv/bin/pip" install --quiet "$here"
fi
install -m 0644 "$here/README.md" "$prefix/README.md"
install -d -m 0755 "$prefix/docs"
install -m 0644 "$here"/docs/*.md "$prefix/docs/"

install -d -m 0755 /etc/wsagent
if [ ! -f /etc/wsagent/wsagent.env ]; then
  cat > /etc/wsagent/wsagent.env <<'ENV'
# wsagent settings (see README, "Settings"). `systemctl reload wsagent` re-reads this file.
WSAGENT_HOST=127.0.0.1
WSAGENT_PORT=8000
# WSAGENT_UPSTREAM_URL=https://api.openai.com/v1
# OPENAI_API_KEY=sk-...
# WSAGENT_MODEL=gpt-4o-mini
# WSAGENT_LOG_FORMAT=json
# WSAGENT_REDIS_URL=redis://127.0.0.1:6379/0
ENV
  chmod 0640 /etc/wsagent/wsagent.env
fi
if [ ! -f /etc/wsagent/jwt-secret ]; then
  umask 077
  head -c 32 /dev/urandom | base64 > /etc/wsagent/jwt-secret
fi

unit > /etc/systemd/system/wsagent.service
install -m 0644 "$here/scripts/wsagent.socket" /etc/systemd/system/wsagent.socket
if [ "$cluster" = --cluster ]; then
  install -D -m 0644 "$here/scripts/wsagent-cluster.conf" /etc/systemd/system/wsagent.service.d/cluster.conf
fi
systemd-analyze verify /etc/systemd/system/wsagent.service
systemctl daemon-reload
systemctl enable --now wsagent.service
echo "wsagent is running: systemctl status wsagent; journalctl -u wsagent -f"
