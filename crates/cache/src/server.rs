//! Pieces the HTTP servers beside the agents share (the cache node, the
//! tree manager and an agent's peer server): the bearer-token check, the
//! accept loop and the HTTP/1.1 + HTTP/2 server over optional TLS.

use std::future::Future;
use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper_util::rt::TokioExecutor;
use ring::digest::{digest, SHA256};
use tokio::net::{TcpListener, TcpStream};

/// Whether `headers` carry `Authorization: Bearer TOKEN` with `token`.
/// Compared as digests, byte by byte without an early exit, so the time
/// taken says nothing about how much of the token was right.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (digest(&SHA256, given.as_bytes()), digest(&SHA256, token.as_bytes()));
    a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hands each connection `listener` accepts to `on_connection` until
/// `shutdown` completes. A failed accept (out of descriptors, say) is
/// logged and waited out, not spun on.
pub async fn accept_until(listener: &TcpListener, shutdown: impl Future<Output = ()>, mut on_connection: impl FnMut(TcpStream)) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => on_connection(stream),
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => return,
        }
    }
}

/// How long a client may take to send its headers or finish its TLS
/// handshake before it is dropped.
pub const SLOW_CLIENT: Duration = Duration::from_secs(30);

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` completes,
/// each request answered by `handle`; with `tls`, every connection is TLS
/// first. At most `max_connections` connections are kept (more are closed
/// as they come), and a client that sends nothing (or does not finish its
/// TLS handshake) within [`SLOW_CLIENT`] is dropped. `tune` sets the
/// HTTP/2 side of the server.
pub async fn serve_http<H, F>(
    listener: &TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    max_connections: usize,
    tune: impl FnOnce(&mut hyper_util::server::conn::auto::Http2Builder<'_, TokioExecutor>),
    shutdown: impl Future<Output = ()>,
    handle: H,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(SLOW_CLIENT);
    let mut http2 = builder.http2();
    http2.timer(TokioTimer::new());
    tune(&mut http2);
    let builder = std::sync::Arc::new(builder);
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    accept_until(listener, shutdown, |stream| {
        let Ok(slot) = std::sync::Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!("{max_connections} connections open: closing a new one");
            return;
        };
        let _ = stream.set_nodelay(true);
        let (builder, handle, acceptor) = (std::sync::Arc::clone(&builder), handle.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // A client that connects and says nothing is dropped.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(SLOW_CLIENT, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let response = handle(req);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            // A client that goes away mid-request is not the server's problem.
            match acceptor {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                }
                Some(acceptor) => match tokio::time::timeout(SLOW_CLIENT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                    Err(_) => tracing::debug!("TLS handshake: no handshake within {SLOW_CLIENT:?}"),
                },
            }
        });
    })
    .await;
}
