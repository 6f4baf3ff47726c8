//! A TCP relay that passes what the server sends back late, as
//! `tc qdisc ... netem delay` on the server's link would (for kernels
//! without `sch_netem`).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// Accepts clients on `listen`, connects each to `target`, and passes the
/// target's bytes on `delay` after they arrive (in order; the delay does not
/// add up from one read to the next). Calls `ready` with the address bound,
/// and runs until `shutdown` completes.
pub async fn relay(
    listen: &str,
    target: &str,
    delay: Duration,
    ready: impl FnOnce(SocketAddr) -> Result<(), Error>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(Error::io(format!("listening on {listen}")))?;
    ready(listener.local_addr().map_err(Error::io("the relay's address"))?)?;
    let serve = async {
        loop {
            let Ok((client, _)) = listener.accept().await else { continue };
            let target = target.to_owned();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    // The server sees the client leave, and closes its side.
                    let _ = server_write.shutdown().await;
                };
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                let downstream_read = async move {
                    let mut buf = vec![0u8; 1 << 20];
                    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                        if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                };
                let downstream_write = async move {
                    while let Some((due, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if client_write.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::join!(upstream, downstream_read, downstream_write);
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = shutdown => {}
    }
    Ok(())
}
