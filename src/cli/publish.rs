//! `ingestd publish`: events to JetStream, confirmed.

use std::path::PathBuf;

/// Publishes each file as one message, confirmed by JetStream (so a
/// subject no stream captures is an error, not a silent loss).
pub fn main(nats_url: &str, subject: &str, files: Vec<PathBuf>) -> anyhow::Result<()> {
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
        let client = async_nats::connect(nats_url).await?;
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
