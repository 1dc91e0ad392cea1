//! `ingestd publish`: events to JetStream, confirmed.

use std::path::PathBuf;
use std::sync::Arc;

use crate::source::nats::{self, NatsOptions};
use crate::telemetry::metrics::Metrics;

#[derive(clap::Args)]
pub struct Args {
    subject: String,
    /// Files to publish, one message each.
    files: Vec<PathBuf>,
    /// The engine's own connection options: the same server list,
    /// credentials and TLS.
    #[command(flatten)]
    nats: NatsOptions,
}

/// Publishes each file as one message, confirmed by JetStream (so a
/// subject no stream captures is an error, not a silent loss).
pub fn main(
    Args {
        subject,
        files,
        nats,
    }: Args,
) -> anyhow::Result<()> {
    let subject = subject.as_str();
    let payloads: Vec<Vec<u8>> = if files.is_empty() {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        vec![buf]
    } else {
        files
            .iter()
            .map(|f| std::fs::read(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display())))
            .collect::<Result<_, _>>()?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = nats::connect(&nats, "ingestd-publish", Arc::new(Metrics::new()?)).await?;
        let js = async_nats::jetstream::new(client);
        for payload in payloads {
            let ack = js
                .publish(subject.to_string(), payload.into())
                .await?
                .await?;
            println!(
                "published to {subject}: stream {} sequence {}",
                ack.stream, ack.sequence
            );
        }
        Ok(())
    })
}
