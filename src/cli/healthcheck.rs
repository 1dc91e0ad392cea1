//! `ingestd healthcheck`: for container health checks.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Why the engine's /live did not answer 200.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("/live answered `{0}`")]
    Status(String),
}

/// Where the engine listening on `listen` is reached: the address itself,
/// or the loopback address of its family when it listens on every address
/// (`0.0.0.0`, `::`).
pub fn target(listen: IpAddr, port: u16) -> SocketAddr {
    let ip = match listen {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    SocketAddr::new(ip, port)
}

/// A plain HTTP/1.0 GET of /live: no HTTP client in the image needed.
pub fn main(listen: IpAddr, port: u16) -> Result<(), HealthcheckError> {
    let addr = target(listen, port);
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| HealthcheckError::Connect { addr, source })?;
    let exchange = |source| HealthcheckError::Exchange { addr, source };
    stream.set_read_timeout(Some(timeout)).map_err(exchange)?;
    stream
        .write_all(b"GET /live HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(exchange)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(exchange)?;
    let status = response.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(HealthcheckError::Status(status.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_is_dialled_on_the_loopback_of_its_family() {
        let dial = |listen: &str| target(listen.parse().unwrap(), 3001).to_string();
        assert_eq!(dial("0.0.0.0"), "127.0.0.1:3001");
        assert_eq!(dial("::"), "[::1]:3001");
        assert_eq!(dial("127.0.0.2"), "127.0.0.2:3001");
        assert_eq!(dial("::1"), "[::1]:3001");
        assert_eq!(dial("10.1.2.3"), "10.1.2.3:3001");
    }
}
