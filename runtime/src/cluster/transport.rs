//! The cluster control port's transport: plain TCP (only with the
//! operator's explicit `--insecure-plaintext`) or mutual TLS, where each
//! side proves an identity from the cluster CA
//! ([`crate::security`]). Both ends get boxed read and write halves, so the
//! protocol code does not care which it is; the server also gets the peer's
//! [`Identity`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::security::{identity_of, not_after_unix, supervisor_server_name, Identity};

/// A peer of the control port, as its certificate describes it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Who it is.
    pub identity: Identity,
    /// When its certificate expires (Unix time).
    pub not_after: Option<i64>,
}

/// A connection's read half.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// A connection's write half.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A TLS handshake must finish within this (a slow or silent peer costs
/// one task for this long, no more).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake did not finish in time.
    #[error("TLS handshake with {peer} did not finish within {within:?}")]
    HandshakeTimeout {
        /// The peer.
        peer: SocketAddr,
        /// The bound it missed.
        within: Duration,
    },
    /// The handshake failed (no certificate, another CA, expired, ...).
    #[error("TLS handshake with {peer} failed: {error}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// rustls' reason.
        error: std::io::Error,
    },
    /// The peer's certificate carries no Lazarus identity.
    #[error("{peer}: {error}")]
    NoIdentity {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        error: crate::security::SecurityError,
    },
}

/// The server side of the control port.
#[derive(Clone)]
pub enum Acceptor {
    /// Plain TCP: anyone who reaches the port is trusted (test setups).
    Plain,
    /// Mutual TLS.
    Tls(tokio_rustls::TlsAcceptor),
}

impl Acceptor {
    /// Mutual TLS with `config`.
    pub fn tls(config: Arc<rustls::ServerConfig>) -> Acceptor {
        Acceptor::Tls(tokio_rustls::TlsAcceptor::from(config))
    }

    /// Completes the handshake: the halves, and the peer's identity with
    /// its certificate's expiry (None on a plain port).
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<(BoxRead, BoxWrite, Option<Peer>), TransportError> {
        stream.set_nodelay(true)?;
        match self {
            Acceptor::Plain => {
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), None))
            }
            Acceptor::Tls(acceptor) => {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                    .map_err(|_| TransportError::HandshakeTimeout {
                        peer,
                        within: HANDSHAKE_TIMEOUT,
                    })?
                    .map_err(|error| TransportError::Handshake { peer, error })?;
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .cloned();
                let identity = match cert {
                    Some(c) => Peer {
                        identity: identity_of(&c)
                            .map_err(|error| TransportError::NoIdentity { peer, error })?,
                        not_after: not_after_unix(&c).ok(),
                    },
                    None => {
                        return Err(TransportError::NoIdentity {
                            peer,
                            error: crate::security::SecurityError::Invalid(
                                "no client certificate".into(),
                            ),
                        })
                    }
                };
                let (r, w) = tokio::io::split(tls);
                Ok((Box::new(r), Box::new(w), Some(identity)))
            }
        }
    }
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acceptor::Plain => "Acceptor::Plain",
            Acceptor::Tls(_) => "Acceptor::Tls",
        })
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialer::Plain => "Dialer::Plain",
            Dialer::Tls(_) => "Dialer::Tls",
        })
    }
}

/// The client side: how agents and CLI clients reach a supervisor.
#[derive(Clone)]
pub enum Dialer {
    /// Plain TCP.
    Plain,
    /// Mutual TLS; the supervisor must prove [`crate::security::SUPERVISOR_NAME`].
    Tls(tokio_rustls::TlsConnector),
}

impl Dialer {
    /// Mutual TLS with `config`.
    pub fn tls(config: Arc<rustls::ClientConfig>) -> Dialer {
        Dialer::Tls(tokio_rustls::TlsConnector::from(config))
    }

    /// Connects to `addr` (bounded: `limit` for TCP, then `limit` for the
    /// TLS handshake: a supervisor that hangs, its listen queue still
    /// accepting, costs the caller no more). Also returns this side's
    /// local address.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        limit: Duration,
    ) -> Result<(BoxRead, BoxWrite, SocketAddr), TransportError> {
        let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                TransportError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out after {limit:?}"),
                ))
            })??;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        match self {
            Dialer::Plain => {
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w), local))
            }
            Dialer::Tls(connector) => {
                let tls = tokio::time::timeout(
                    limit,
                    connector.connect(supervisor_server_name(), stream),
                )
                .await
                .map_err(|_| TransportError::HandshakeTimeout {
                    peer: addr,
                    within: limit,
                })?
                .map_err(|error| TransportError::Handshake { peer: addr, error })?;
                let (r, w) = tokio::io::split(tls);
                Ok((Box::new(r), Box::new(w), local))
            }
        }
    }
}
