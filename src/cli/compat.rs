//! Defaults kept for compatibility with the TikTok events collector this
//! engine replaces, so that an existing deployment (its connection name in
//! NATS monitoring, its database) keeps working without new settings. Every
//! default that exists only for that reason is here; the pipeline-level
//! ones (the event id in logs, the histogram buckets) are data in
//! `pipelines/tiktok.yaml`.

/// The database of `run`, `check --db` and `test` when neither
/// `--database-url` nor `DATABASE_URL` is given: the collector's.
pub const DATABASE_URL: &str =
    "postgresql://postgres:postgres@localhost:5432/tiktok_events?schema=public";

/// The NATS connection name when `--nats-name`/`NATS_NAME` is not given:
/// the collector's `collector-$HOSTNAME`, which dashboards and NATS
/// monitoring may select on.
pub fn nats_name(hostname: &str) -> String {
    format!("collector-{hostname}")
}
