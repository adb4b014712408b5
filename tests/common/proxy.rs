//! An HTTP `CONNECT` proxy for the tests: it records each request head, may demand
//! credentials or send interim responses first, and tunnels every request to one target
//! whatever host it names (so a test can use host names that resolve nowhere).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct TestProxy {
    /// `http://127.0.0.1:{port}`
    pub url: String,
    heads: Arc<Mutex<Vec<String>>>,
    tunnels: Arc<Mutex<Vec<AbortHandle>>>,
}

impl TestProxy {
    /// Listens on 127.0.0.1; with `authorization`, a request without exactly that
    /// `Proxy-Authorization` value gets 407.
    pub async fn start(target: SocketAddr, authorization: Option<&str>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestProxy::serving(listener, target, authorization, b"")
    }

    /// Listens on `listener`, as `start` does, and sends `interim` (1xx responses)
    /// before its answer to each `CONNECT`.
    pub fn serving(
        listener: TcpListener,
        target: SocketAddr,
        authorization: Option<&str>,
        interim: &'static [u8],
    ) -> TestProxy {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let required = authorization.map(|a| format!("proxy-authorization: {a}"));
        let (h, t) = (Arc::clone(&heads), Arc::clone(&tunnels));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let served = serve(client, target, required.clone(), interim, Arc::clone(&h));
                let task = tokio::spawn(served);
                t.lock().unwrap().push(task.abort_handle());
            }
        });
        TestProxy {
            url,
            heads,
            tunnels,
        }
    }

    /// The request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Closes every open tunnel.
    pub fn drop_tunnels(&self) {
        for tunnel in self.tunnels.lock().unwrap().drain(..) {
            tunnel.abort();
        }
    }
}

async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    required: Option<String>,
    interim: &'static [u8],
    heads: Arc<Mutex<Vec<String>>>,
) {
    // Byte by byte, so nothing after the head is taken from the tunnel.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match client.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    heads.lock().unwrap().push(head.clone());
    let authorized = required
        .as_deref()
        .is_none_or(|r| head.lines().any(|l| l.eq_ignore_ascii_case(r)));
    if !head.starts_with("CONNECT ") || !authorized {
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    let _ = client.write_all(interim).await;
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}
