//! Log output: human-readable or JSON, filtered by `RUST_LOG`/`LOG_LEVEL`.

/// Human-readable logs by default; JSON with LOG_FORMAT=json or
/// NODE_ENV=production (the convention of Node deployments, which the
/// collector's configuration follows). RUST_LOG or LOG_LEVEL filter.
pub fn init(default_filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("LOG_LEVEL"))
        .unwrap_or_else(|_| default_filter.into());
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json")
        || std::env::var("NODE_ENV").is_ok_and(|e| e == "production");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
