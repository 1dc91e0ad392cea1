#!/usr/bin/env bash
# The project's checks, exactly as CI runs them: formatting, lints, and the
# tests (unit and integration, against the real NATS and PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
