//! Pieces the HTTP servers beside the agents share (the cache node and the
//! tree manager): the bearer-token check and the accept loop.

use std::future::Future;
use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION};
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
