//! Clients of one process share the runtime's worker and the C dispatcher threads: one
//! of them flooded by its server, with callbacks slower than the flood, must not hold
//! the others' acks and events back by more than a moment.

mod common;

use bytes::Bytes;
use common::{all_roles, check, fast_options, next_event};
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use webpubsub_client::ffi::callbacks::{wps_event, WPS_EVENT_GROUP_MESSAGE};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_free, wps_client_join_group, wps_client_start,
};
use webpubsub_client::{Client, Credential, DataType, Event, Protocol, SendToGroupOptions};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

/// Longest wait for an ack or event of a healthy client while another is flooded: a
/// generous bound (a few tens of ms are seen), where a backlog ahead of it takes minutes.
const BOUND: Duration = Duration::from_secs(2);

/// Tests run one at a time: each needs the processors, and the C test which dispatcher
/// thread its clients get.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A server message frame as a server writes it (unmasked).
fn frame(i: usize) -> Vec<u8> {
    let payload =
        format!(r#"{{"type":"message","from":"server","dataType":"text","data":"m{i}"}}"#);
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// A server that accepts one client, connects it, then writes server messages as fast
/// as the client reads them, until the client goes or `stop` is set; returns its URL.
#[allow(clippy::result_large_err)]
async fn flooder(stop: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/client/hubs/h?access_token=tok",
        listener.local_addr().unwrap()
    );
    let chunk: Vec<u8> = (0..2000).flat_map(frame).collect();
    tokio::spawn(async move {
        let tcp = listener.accept().await.unwrap().0;
        let mut ws =
            tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
                if let Some(p) = req.headers().get("Sec-WebSocket-Protocol").cloned() {
                    resp.headers_mut().insert("Sec-WebSocket-Protocol", p);
                }
                Ok(resp)
            })
            .await
            .unwrap();
        let connected =
            r#"{"type":"system","event":"connected","connectionId":"c","reconnectionToken":"r"}"#;
        let mut hello = vec![0x81, connected.len() as u8];
        hello.extend_from_slice(connected.as_bytes());
        ws.get_mut().write_all(&hello).await.unwrap();
        while !stop.load(Ordering::Relaxed) {
            if ws.get_mut().write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    url
}

fn token(user: &str) -> TokenOptions {
    TokenOptions {
        user_id: Some(user.into()),
        roles: all_roles(),
        ..TokenOptions::default()
    }
}

#[test]
fn a_flooded_client_leaves_the_runtime_to_the_others() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The emulator and the flooding server on a runtime of their own.
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(flooded_and_healthy());
}

async fn flooded_and_healthy() {
    let emulator = Emulator::start(Config::default()).await.unwrap();
    let url = emulator.client_url("hub", &token("healthy"));
    let (healthy, mut events) = Client::with_channel(Credential::Url(url), fast_options()).unwrap();
    healthy.start().await.unwrap();
    next_event(&mut events, 5).await;
    healthy.join_group("g").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let flooded = Client::new(
        Credential::Url(flooder(stop.clone()).await),
        webpubsub_client::ClientOptions {
            protocol: Protocol::Json,
            ..fast_options()
        },
        Arc::new(move |_: Event| {
            counted.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .unwrap();
    flooded.start().await.unwrap();
    common::until("the flood", Duration::from_secs(10), || {
        received.load(Ordering::Relaxed) > 10_000
    })
    .await;

    let before = received.load(Ordering::Relaxed);
    for i in 0..20 {
        let sent = Instant::now();
        let send = healthy.send_to_group(
            "g",
            DataType::Text,
            Bytes::from(format!("h{i}")),
            SendToGroupOptions::default(),
        );
        tokio::time::timeout(BOUND, send)
            .await
            .unwrap_or_else(|_| panic!("no ack within {BOUND:?} while another client is flooded"))
            .unwrap();
        tokio::time::timeout(BOUND.saturating_sub(sent.elapsed()), async {
            while !matches!(events.recv().await, Some(Event::GroupMessage { .. })) {}
        })
        .await
        .unwrap_or_else(|_| panic!("no echo within {BOUND:?} while another client is flooded"));
    }
    assert!(
        received.load(Ordering::Relaxed) > before + 1000,
        "the flood went on meanwhile"
    );
    stop.store(true, Ordering::Relaxed);
}

/// Times of a C client's group message events.
type Echoes = common::Watched<Vec<Instant>>;

unsafe extern "C" fn on_echo(user_data: *mut c_void, event: *const wps_event) {
    let echoes = &*(user_data as *const Echoes);
    if (*event).kind == WPS_EVENT_GROUP_MESSAGE {
        let mut seen = echoes.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push(Instant::now());
        echoes.changed.notify_all();
    }
}

/// What the slow callback did, and whether it is to be quick now.
#[derive(Default)]
struct Slow {
    ran: AtomicU64,
    quick: AtomicBool,
}

/// A callback slower than the flood: 100 µs of the application's work per event.
unsafe extern "C" fn slow(user_data: *mut c_void, _event: *const wps_event) {
    let slow = &*(user_data as *const Slow);
    slow.ran.fetch_add(1, Ordering::Relaxed);
    if !slow.quick.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn a_client_whose_callbacks_fall_behind_a_flood_delays_the_others_on_its_thread_by_a_turn() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (rt, _emulator, url) = common::ffi_emulator();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_url = CString::new(rt.block_on(flooder(stop.clone()))).unwrap();
    let slow_state: &'static Slow = common::leaked();
    let flooded = common::ffi_client(
        &flood_url,
        Some(slow),
        slow_state as *const Slow as *mut c_void,
        None,
    );
    // Clients are pinned to the pool's threads in turn: with at most four threads, one of
    // the four made next shares the flooded client's.
    let healthy: Vec<(*mut wps_client, &'static Echoes, CString)> = (0..4)
        .map(|i| {
            let echoes: &'static Echoes = common::leaked();
            let c = common::ffi_client(&url, Some(on_echo), echoes as *const _ as *mut _, None);
            check(unsafe { wps_client_start(c) }, "start");
            let group = CString::new(format!("g{i}")).unwrap();
            check(
                unsafe { wps_client_join_group(c, group.as_ptr(), std::ptr::null_mut()) },
                "join",
            );
            (c, echoes, group)
        })
        .collect();
    check(
        unsafe { wps_client_start(flooded) },
        "start the flooded client",
    );
    common::wait_until("the flooded client's callbacks", || {
        slow_state.ran.load(Ordering::Relaxed) > 1000
    });

    for round in 0..10 {
        for (i, (c, echoes, group)) in healthy.iter().enumerate() {
            let sent = Instant::now();
            check(common::ffi_send_text(*c, group, "x", 0), "send");
            let mut seen = echoes.seen.lock().unwrap();
            while seen.len() <= round {
                let left = BOUND.checked_sub(sent.elapsed()).unwrap_or_else(|| {
                    panic!(
                        "client {i}'s event came not within {BOUND:?} while the flooded \
                         client's callbacks are behind (round {round})"
                    )
                });
                seen = echoes.changed.wait_timeout(seen, left).unwrap().0;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Its free runs what is queued first: quickly now.
    slow_state.quick.store(true, Ordering::Relaxed);
    unsafe { wps_client_free(flooded) };
    for (c, ..) in healthy {
        unsafe { wps_client_free(c) };
    }
}
