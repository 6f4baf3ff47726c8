//! `GET /metrics` in Prometheus text, over a minimal HTTP/1.1 responder.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `render()` at `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            // Read the request head (bounded in size and time).
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    let n = sock.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            if !matches!(head, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_owned();
            let (status, body) = if line.starts_with("GET /metrics ") || line == "GET /metrics" {
                ("200 OK", render())
            } else {
                ("404 Not Found", "see /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
