//! U+0000 in what the C ABI hands over: ids and names from the service reach the
//! event callback and the message records whole (with their lengths), payloads keep
//! their bytes both ways, and texts write it as `\u0000` instead of dropping it.

mod common;

use common::check;

use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

use bytes::Bytes;
use webpubsub_client::ffi::callbacks::{
    wps_dispatch_buffers, wps_event, wps_message_record, WPS_EVENT_CONNECTED,
    WPS_EVENT_DISCONNECTED, WPS_EVENT_GROUP_MESSAGE,
};
use webpubsub_client::ffi::client::{
    wps_client, wps_client_connection_id, wps_client_dispatch_into, wps_client_free,
    wps_client_join_group, wps_client_send_to_group, wps_client_start,
};
use webpubsub_client::ffi::status::*;
use webpubsub_client::{Client, Credential, DataType, SendToGroupOptions};
use webpubsub_emulator::{Config, Emulator, TokenOptions};

/// One event as the callback saw it: the ids and names read with their lengths.
#[derive(Clone, Debug, Default)]
struct Seen {
    kind: u32,
    connection_id: Vec<u8>,
    /// None for NULL (an anonymous connection).
    user_id: Option<Vec<u8>>,
    group: Vec<u8>,
    /// None for NULL (an anonymous sender).
    from_user_id: Option<Vec<u8>>,
    data: Vec<u8>,
    message: Option<String>,
}

type Recorder = common::Watched<Vec<Seen>>;

/// `len` bytes at `p` (none for NULL).
unsafe fn bytes(p: *const c_char, len: usize) -> Vec<u8> {
    if p.is_null() {
        return Vec::new();
    }
    assert_eq!(*p.add(len), 0, "NUL-terminated after its length");
    std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec()
}

/// `len` bytes at `p`; None for NULL, whose length must be 0.
unsafe fn id(p: *const c_char, len: usize) -> Option<Vec<u8>> {
    if p.is_null() {
        assert_eq!(len, 0, "the length of NULL");
        return None;
    }
    Some(bytes(p, len))
}

unsafe extern "C" fn record(user_data: *mut c_void, event: *const wps_event) {
    let r = &*(user_data as *const Recorder);
    let e = &*event;
    let seen = Seen {
        kind: e.kind,
        connection_id: bytes(e.connection_id, e.connection_id_len),
        user_id: id(e.user_id, e.user_id_len),
        group: bytes(e.group, e.group_len),
        from_user_id: id(e.from_user_id, e.from_user_id_len),
        data: if e.data_len == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(e.data, e.data_len).to_vec()
        },
        message: (!e.message.is_null())
            .then(|| CStr::from_ptr(e.message).to_string_lossy().into_owned()),
    };
    r.seen.lock().unwrap().push(seen);
    r.changed.notify_all();
}

/// The first event of `kind` the recorder saw, waiting for it.
fn first_of(recorder: &Recorder, kind: u32, what: &str) -> Seen {
    recorder.wait(what, |seen| seen.iter().any(|e| e.kind == kind));
    let seen = recorder.seen.lock().unwrap();
    seen.iter().find(|e| e.kind == kind).cloned().unwrap()
}

fn token(user: &str, groups: &[&str]) -> TokenOptions {
    TokenOptions {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..common::user_token(user)
    }
}

fn new_client(url: &CStr, poll: bool, recorder: &Recorder) -> *mut wps_client {
    let new = if poll {
        common::ffi_poll_client
    } else {
        common::ffi_client
    };
    let c = new(
        url,
        Some(record),
        recorder as *const Recorder as *mut c_void,
        None,
    );
    check(unsafe { wps_client_start(c) }, "wps_client_start");
    c
}

/// A started Rust client of `url` that has sent `data` as text to `group`.
async fn sent_from(url: String, group: &str, data: &'static [u8]) -> Client {
    let (client, _events) =
        Client::with_channel(Credential::Url(url), common::fast_options()).unwrap();
    client.start().await.unwrap();
    client
        .send_to_group(
            group,
            DataType::Text,
            Bytes::from_static(data),
            SendToGroupOptions::default(),
        )
        .await
        .unwrap();
    client
}

#[test]
fn names_with_nul_arrive_whole_and_payloads_keep_their_bytes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let url = |t: &TokenOptions| CString::new(emulator.client_url("hub", t)).unwrap();
    // Joined to "g\0h" at connect: a C caller cannot name that group itself.
    let receiver = url(&token("u\0v", &["g\0h"]));
    let recorder = Recorder::default();
    let c = new_client(&receiver, false, &recorder);
    let polled_recorder = Recorder::default();
    let polled = new_client(&receiver, true, &polled_recorder);

    recorder.wait("connected", |seen| {
        seen.iter().any(|e| e.kind == WPS_EVENT_CONNECTED)
    });
    let connected = recorder.seen.lock().unwrap()[0].clone();
    assert_eq!(connected.user_id.as_deref(), Some(&b"u\0v"[..]));
    assert!(!connected.connection_id.is_empty());
    let mut id_len = 0;
    let mut id = [0 as c_char; 128];
    check(
        unsafe { wps_client_connection_id(c, id.as_mut_ptr(), id.len(), &mut id_len) },
        "connection id",
    );
    assert_eq!(id_len, connected.connection_id.len());

    // From a sender whose user id holds U+0000, to the group whose name does.
    let sender_url = emulator.client_url("hub", &token("s\0t", &[]));
    let sender = rt.block_on(sent_from(sender_url, "g\0h", b"a\0b"));
    let message = first_of(&recorder, WPS_EVENT_GROUP_MESSAGE, "the group message");
    assert_eq!(
        (
            &message.group[..],
            message.from_user_id.as_deref(),
            &message.data[..]
        ),
        (&b"g\0h"[..], Some(&b"s\0t"[..]), &b"a\0b"[..])
    );

    // The same message as a poll-mode record: its lengths cover the names whole.
    let mut messages = vec![0u64; 64];
    let mut record_seen = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while record_seen.is_none() {
        assert!(std::time::Instant::now() < deadline, "no message record");
        let mut buffers = wps_dispatch_buffers {
            acks: std::ptr::null_mut(),
            ack_cap: 0,
            messages: messages.as_mut_ptr().cast(),
            message_cap: messages.len() * 8,
            ran: 0,
            acks_written: 0,
            messages_written: 0,
            message_bytes: 0,
        };
        check(
            unsafe { wps_client_dispatch_into(polled, 16, &mut buffers) },
            "dispatch",
        );
        if buffers.messages_written > 0 {
            let base = messages.as_ptr().cast::<u8>();
            let r = unsafe { std::ptr::read(base.cast::<wps_message_record>()) };
            let at = std::mem::size_of::<wps_message_record>();
            let tail = unsafe { std::slice::from_raw_parts(base.add(at), r.size as usize - at) };
            let (group, rest) = tail.split_at(r.group_len as usize);
            let (from, rest) = rest.split_at(r.from_user_id_len as usize);
            record_seen = Some((group.to_vec(), from.to_vec(), rest[..3].to_vec()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        record_seen.unwrap(),
        (b"g\0h".to_vec(), b"s\0t".to_vec(), b"a\0b".to_vec())
    );

    // Text with U+0000 sent from C with its length: every byte arrives.
    check(
        unsafe { wps_client_join_group(c, c"plain".as_ptr(), std::ptr::null_mut()) },
        "join",
    );
    let text = b"x\0y\0";
    check(
        unsafe {
            wps_client_send_to_group(
                c,
                c"plain".as_ptr(),
                WPS_DATA_TYPE_TEXT,
                text.as_ptr(),
                text.len(),
                0,
                std::ptr::null_mut(),
            )
        },
        "send text with NULs",
    );
    recorder.wait("the echo", |seen| {
        seen.iter()
            .any(|e| e.kind == WPS_EVENT_GROUP_MESSAGE && e.group == b"plain" && e.data == text)
    });

    // A disconnect reason with U+0000: written as `\u0000`, not dropped.
    let connection_id = String::from_utf8(connected.connection_id.clone()).unwrap();
    let path = format!(
        "/api/hubs/hub/connections/{connection_id}?api-version=2024-12-01&reason=bye%00now"
    );
    let auth = common::rest_authorization(&emulator, &path);
    let (status, body) = rt.block_on(common::http(
        emulator.port(),
        "DELETE",
        &path,
        &[("Authorization", auth.as_str())],
        b"",
    ));
    assert_eq!(status, 204, "{body}");
    let disconnected = first_of(&recorder, WPS_EVENT_DISCONNECTED, "disconnected");
    assert_eq!(
        disconnected.message.as_deref(),
        Some("Application server closed the connection. Reason: bye\\u0000now")
    );

    unsafe {
        wps_client_free(c);
        wps_client_free(polled);
    }
    rt.block_on(async move {
        sender.stop().await;
        emulator.shutdown().await;
    });
}

#[test]
fn the_user_ids_of_an_anonymous_connection_and_sender_are_null() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt.block_on(Emulator::start(Config::default())).unwrap();
    let anonymous = |groups: &[&str]| TokenOptions {
        user_id: None,
        ..token("", groups)
    };
    let url = CString::new(emulator.client_url("hub", &anonymous(&["g"]))).unwrap();
    let recorder = Recorder::default();
    let c = new_client(&url, false, &recorder);
    let connected = first_of(&recorder, WPS_EVENT_CONNECTED, "connected");
    assert_eq!(connected.user_id, None);
    let sender_url = emulator.client_url("hub", &anonymous(&[]));
    let sender = rt.block_on(sent_from(sender_url, "g", b"hi"));
    let message = first_of(&recorder, WPS_EVENT_GROUP_MESSAGE, "the group message");
    assert_eq!(
        (message.from_user_id, &message.data[..]),
        (None, &b"hi"[..])
    );
    unsafe { wps_client_free(c) };
    rt.block_on(async move {
        sender.stop().await;
        emulator.shutdown().await;
    });
}
