#!/usr/bin/env bash
# The benchmark of ingestd with pipelines/tiktok.yaml, on this machine's NATS
# and PostgreSQL: COPY rate (PostgreSQL's limit), backlog drain rate, publish →
# commit latency at a steady rate, and ingestd's peak memory, each printed next
# to its target. Everything it creates (databases, streams, consumers, temp
# dirs) is removed at the end, also on failure or Ctrl-C.
#
#   bash scripts/bench.sh                      # headline: N=200,000, 2,000/s for 10 s
#   bash scripts/bench.sh --events 20000       # quick run
#   bash scripts/bench.sh --events N --rate R --latency-secs S
#
# `cargo bench` builds the engine (release profile) with the benchmark,
# `benches/bench.rs`, and runs it with these flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
exec cargo bench --locked --bench bench -- "$@"
