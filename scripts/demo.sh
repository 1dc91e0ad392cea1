#!/usr/bin/env bash
# The quick start: ingestd end to end with pipelines/tiktok.yaml. Starts NATS
# and PostgreSQL if needed, creates the database, runs the engine, publishes
# the example events, then shows the stored rows, the metrics and /ready.
# The engine keeps running in the foreground afterwards; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo build --release --locked
BIN=target/release/ingestd
DB=${DEMO_DB:-tiktok_events}
export PORT=${PORT:-3001}
export DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB?schema=public"
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1 from pg_database where datname='$DB'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database \"$DB\""

$BIN run --pipelines pipelines &
ENGINE=$!
trap 'kill $ENGINE 2>/dev/null; wait $ENGINE 2>/dev/null' EXIT
for _ in $(seq 1 100); do
  curl -fsS "localhost:$PORT/live" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "== publishing the example events"
$BIN publish raw.events.tiktok.top.video.view examples/events/top-video-view.json
$BIN publish raw.events.tiktok.bottom.purchase examples/events/bottom-purchase.json
$BIN publish raw.events.tiktok.top.video.view examples/events/invalid-bad-enum.json
$BIN publish raw.events.tiktok.top.like examples/events/invalid-not-json.txt

for _ in $(seq 1 50); do
  n=$(psql -h 127.0.0.1 -U postgres -d "$DB" -Atqc \
    "select count(*) from \"TiktokEvent\" where \"eventId\" in ('test-123','test-456')")
  [ "$n" = 2 ] && break
  sleep 0.1
done
echo "== rows"
psql -h 127.0.0.1 -U postgres -d "$DB" -c \
  "select id, \"eventId\", \"timestamp\", \"funnelStage\", \"eventType\", data, \"createdAt\" from \"TiktokEvent\" order by \"createdAt\" desc limit 5"
echo "== metrics"
curl -fsS "localhost:$PORT/metrics" | grep -E '^collector_(events|nats)' || true
echo "== ready"
curl -sS "localhost:$PORT/ready"; echo
echo "ingestd is running (pid $ENGINE, http://localhost:$PORT/metrics); Ctrl-C stops it."
wait $ENGINE
