//! A TCP proxy to Postgres or NATS, for outages (and slow links) that do
//! not touch the shared servers.

use super::*;

/// Forwards connections from a local port to an upstream address. `stop()`
/// makes the upstream look down (connections cut, new ones refused);
/// `start()` brings it back on the same port.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    /// While true, connections stay open but no byte is forwarded (and new
    /// ones are accepted but not forwarded): a server that stopped answering.
    frozen: tokio::sync::watch::Sender<bool>,
    /// While set, a slow link (see [`Pace`]).
    paced: tokio::sync::watch::Sender<Option<Pace>>,
}

/// A slow link: each direction forwards at most `bytes` at a time and
/// pauses after each, so a burst from the server arrives in dribbles.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub bytes: usize,
    pub pause: Duration,
}

impl TcpProxy {
    /// A running proxy to the machine's Postgres.
    pub async fn to_postgres() -> Self {
        let upstream = format!("{PG_HOST}:{PG_PORT}").parse().expect("address");
        Self::start_new(upstream).await
    }

    /// A running proxy to the tests' NATS server (`nats_url()`).
    pub async fn to_nats() -> Self {
        let url = url::Url::parse(nats_url()).expect("NATS_URL is a URL");
        let host = url.host_str().expect("NATS_URL names a host");
        let upstream = tokio::net::lookup_host((host, url.port().unwrap_or(4222)))
            .await
            .expect("resolve NATS_URL")
            .next()
            .expect("NATS_URL resolves");
        Self::start_new(upstream).await
    }

    /// The NATS URL of this proxy.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub async fn start_new(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mut proxy = Self {
            addr,
            upstream,
            running: None,
            frozen: tokio::sync::watch::channel(false).0,
            paced: tokio::sync::watch::channel(None).0,
        };
        proxy.serve(listener);
        proxy
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listening socket and every forwarded connection; returns
    /// once both are gone, so the outage is in effect.
    pub async fn stop(&mut self) {
        if let Some((shutdown, task)) = self.running.take() {
            let _ = shutdown.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same port (retrying briefly should the port still
    /// be held by a socket being torn down).
    pub async fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let addr = self.addr;
        let listener = wait_for("the proxy port to be bindable", DEADLINE, || async move {
            rebind(addr).map_err(state("bind"))
        })
        .await;
        self.serve(listener);
    }

    /// Stops forwarding while keeping every connection open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again what was held.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Makes every connection a slow link (None: full speed again).
    pub fn pace(&self, pace: Option<Pace>) {
        self.paced.send_replace(pace);
    }

    fn serve(&mut self, listener: TcpListener) {
        let (shutdown, signal) = oneshot::channel();
        let link = Link {
            frozen: self.frozen.subscribe(),
            paced: self.paced.subscribe(),
        };
        let task = tokio::spawn(accept_loop(listener, self.upstream, signal, link));
        self.running = Some((shutdown, task));
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}

fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// What every forwarded connection obeys: frozen or not, paced or not.
#[derive(Clone)]
struct Link {
    frozen: tokio::sync::watch::Receiver<bool>,
    paced: tokio::sync::watch::Receiver<Option<Pace>>,
}

/// Accepts and forwards until `shutdown`, then drops the listener and aborts
/// (and awaits) every connection task, which closes their sockets.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut shutdown: oneshot::Receiver<()>,
    link: Link,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                if let Ok((client, _)) = accepted {
                    connections.spawn(forward(client, upstream, link.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn forward(client: TcpStream, upstream: SocketAddr, mut link: Link) {
    let _ = link.frozen.wait_for(|f| !*f).await;
    if let Ok(server) = TcpStream::connect(upstream).await {
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::join!(
            pump(client_read, server_write, link.clone()),
            pump(server_read, client_write, link)
        );
    }
}

/// Copies one direction of a connection, holding each chunk while frozen
/// and cutting it to the pace's size (pausing after it) while paced.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: Link,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let pace = *link.paced.borrow();
        let limit = pace.map_or(buf.len(), |p| p.bytes.clamp(1, buf.len()));
        let n = match from.read(&mut buf[..limit]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = link.frozen.wait_for(|f| !*f).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(p) = pace {
            tokio::time::sleep(p.pause).await;
        }
    }
    let _ = to.shutdown().await;
}
