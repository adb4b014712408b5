//! A connected idle client costs a few tens of KiB: heap bytes counted by a global
//! allocator while 100 clients connect to a minimal server with tiny buffers (the
//! server's share is included, so the bound is generous to it, not to the client).

use futures_util::{SinkExt, StreamExt};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use webpubsub_client::{Client, ClientOptions, Credential, Event};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Accepts connections forever: upgrade with tiny buffers, send `connected`, idle.
#[allow(clippy::result_large_err)]
async fn serve(listener: tokio::net::TcpListener) {
    let config = WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(0);
    let mut n = 0;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        n += 1;
        tokio::spawn(async move {
            let callback = |req: &Request, mut resp: Response| {
                if let Some(p) = req.headers().get("Sec-WebSocket-Protocol").cloned() {
                    resp.headers_mut().insert("Sec-WebSocket-Protocol", p);
                }
                Ok(resp)
            };
            let Ok(mut ws) =
                tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
            else {
                return;
            };
            let connected = format!(
                r#"{{"type":"system","event":"connected","connectionId":"c{n}","userId":null,"reconnectionToken":"t{n}"}}"#
            );
            if ws.send(Message::text(connected)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        });
    }
}

async fn connect(url: &str) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let (client, mut events) =
        Client::with_channel(Credential::Url(url.to_owned()), ClientOptions::default()).unwrap();
    client.start().await.unwrap();
    assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    (client, events)
}

#[tokio::test]
async fn an_idle_connected_client_costs_a_few_tens_of_kib() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/client/hubs/h?access_token=t",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(serve(listener));
    let warm = connect(&url).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = LIVE.load(Ordering::Relaxed);
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(connect(&url).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let per_connection = (LIVE.load(Ordering::Relaxed) - before) / 100;
    println!("heap per connected client (client + minimal server side): {per_connection} bytes");
    assert!(
        per_connection < 40 * 1024,
        "{per_connection} bytes per connection"
    );
    for (client, _) in clients {
        client.stop().await;
    }
    warm.0.stop().await;
    server.abort();
}
