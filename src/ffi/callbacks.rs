//! Callback types and the conversion of core events and results into the borrowed C
//! structs handed to them. Everything here runs on a dispatcher thread.

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::client::{AckResult, Error, Event, EventHandler, InvokeResult, Resume};
use crate::protocol::DataType;

use super::backlog::Backlog;
use super::dispatcher::{DispatchError, Job, Worker};
use super::gate::InCallback;
use super::status::{
    set_last_error, to_cstring, wps_status, WPS_DATA_TYPE_BINARY, WPS_DATA_TYPE_JSON,
    WPS_DATA_TYPE_PROTOBUF, WPS_DATA_TYPE_TEXT, WPS_STATUS_ACK_ERROR, WPS_STATUS_CANCELLED,
    WPS_STATUS_CONNECT_FAILED, WPS_STATUS_CREDENTIAL_FAILED, WPS_STATUS_ILLEGAL_STATE,
    WPS_STATUS_INTERNAL, WPS_STATUS_INVALID_ARGUMENT, WPS_STATUS_INVOKE_ERROR,
    WPS_STATUS_NOT_CONNECTED, WPS_STATUS_OK, WPS_STATUS_PANIC, WPS_STATUS_STOPPED,
    WPS_STATUS_TIMEOUT, WPS_STATUS_TLS,
};

/// Event kind: connected (`connection_id`, `user_id`).
pub const WPS_EVENT_CONNECTED: u32 = 1;
/// Event kind: the session was lost (`connection_id`, `message`, `close_code`). After a
/// failed recovery (refused with 1008, answered as another connection, or out of time),
/// `message` and `close_code` tell how the connection dropped, not how the recovery
/// ended (that is logged).
pub const WPS_EVENT_DISCONNECTED: u32 = 2;
/// Event kind: the client stopped and will not reconnect (`status`, `message`). Not
/// raised by a start that fails on its own (its status is the start's; a stop that ends
/// a start raises it) nor by a stop of a stopped client. Always raised when the client's
/// connection task panicked (`WPS_STATUS_PANIC`), even during a start.
pub const WPS_EVENT_STOPPED: u32 = 3;
/// Event kind: a message from the server (`data_type`, `data`, `sequence_id`).
pub const WPS_EVENT_SERVER_MESSAGE: u32 = 4;
/// Event kind: a group message (`group`, `from_user_id`, `data_type`, `data`, `sequence_id`).
pub const WPS_EVENT_GROUP_MESSAGE: u32 = 5;
/// Event kind: rejoining `group` on a new connection failed (`status`, `message`,
/// `error_name`, `service_message`, `ack_id`).
pub const WPS_EVENT_REJOIN_GROUP_FAILED: u32 = 6;

/// An event, borrowed by the callback for the duration of the call. Strings are
/// NUL-terminated UTF-8 or NULL when absent. The ids and names (`connection_id`,
/// `user_id`, `group`, `from_user_id`) come whole with their byte lengths (`*_len`):
/// one holding U+0000 is longer than `strlen` finds. In the texts (`message`,
/// `error_name`, `service_message`) a U+0000 is written as the six characters
/// `\u0000`. Only ever allocated by the library, so fields may be appended in later
/// versions.
#[repr(C)]
pub struct wps_event {
    /// One of `WPS_EVENT_*`.
    pub kind: u32,
    /// Connected, disconnected (when known).
    pub connection_id: *const c_char,
    /// Connected: the user id, NULL when anonymous.
    pub user_id: *const c_char,
    /// Group message, rejoin failed.
    pub group: *const c_char,
    /// Group message: the sender's user id, NULL when anonymous.
    pub from_user_id: *const c_char,
    /// Messages: one of `WPS_DATA_TYPE_*`.
    pub data_type: u32,
    /// Messages: the payload (JSON as its serialized text), `data_len` bytes, not
    /// NUL-terminated (text included).
    pub data: *const u8,
    /// Length of `data`.
    pub data_len: usize,
    /// Messages on the reliable protocol carry a sequence id.
    pub has_sequence_id: bool,
    /// The sequence id when `has_sequence_id`.
    pub sequence_id: u64,
    /// Disconnected: the reason; stopped on its own, rejoin failed: the error message
    /// (NULL when the application stopped the client: `wps_client_stop`, `_stop_async`,
    /// or `wps_client_free` in thread mode).
    pub message: *const c_char,
    /// Rejoin failed: the service's error name, when it gave one.
    pub error_name: *const c_char,
    /// Disconnected: the WebSocket close code, 0 when none.
    pub close_code: u16,
    /// Rejoin failed: the service's own text when it refused the join (it is also in
    /// `message`, after the library's description of the operation); NULL otherwise.
    pub service_message: *const c_char,
    /// Rejoin failed: whether `ack_id` is set (the rejoin was sent, or queued to be).
    pub has_ack_id: bool,
    /// Rejoin failed: the ackId of the failed joinGroup when `has_ack_id`.
    pub ack_id: u64,
    /// Length of `connection_id` in bytes, without its NUL (0 when NULL).
    pub connection_id_len: usize,
    /// Length of `user_id` in bytes, without its NUL (0 when NULL).
    pub user_id_len: usize,
    /// Length of `group` in bytes, without its NUL (0 when NULL).
    pub group_len: usize,
    /// Length of `from_user_id` in bytes, without its NUL (0 when NULL).
    pub from_user_id_len: usize,
    /// Stopped: `WPS_STATUS_OK` when the application stopped the client, else the
    /// status of the error that stopped it: the last attempt's once the reconnect policy
    /// gave up (such as `WPS_STATUS_CONNECT_FAILED` or `WPS_STATUS_CREDENTIAL_FAILED`),
    /// `WPS_STATUS_NOT_CONNECTED` when the session was lost with auto-reconnect off (the
    /// disconnected event before it tells why), `WPS_STATUS_PANIC` when the client's
    /// connection task panicked (a bug in the library; the client cannot be started
    /// again, free it). Rejoin failed: the error's status.
    /// `WPS_STATUS_OK` for the other kinds.
    pub status: wps_status,
}

/// Event callback. `event` is borrowed for the duration of the call.
pub type wps_event_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, event: *const wps_event)>;

/// Finalizer of a callback's user data: runs exactly once, after the last callback.
pub type wps_user_data_free_cb = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// The outcome of an asynchronous operation, borrowed for the duration of the call.
#[repr(C)]
pub struct wps_completion {
    /// `WPS_STATUS_OK` or why the operation failed.
    pub status: wps_status,
    /// The id the starting call returned.
    pub op_id: u64,
    /// Acked operations: whether `ack_id` is set (not for fire-and-forget; on failure
    /// when the operation had one: `WPS_STATUS_ACK_ERROR`, `WPS_STATUS_TIMEOUT` after
    /// its retries, `WPS_STATUS_NOT_CONNECTED` when its connection was lost,
    /// `WPS_STATUS_STOPPED` when `wps_client_stop` or `wps_client_free` ended it,
    /// `WPS_STATUS_CANCELLED` when `wps_client_cancel` gave it up).
    pub has_ack_id: bool,
    /// The operation's ackId (on a failure, the failed one's).
    pub ack_id: u64,
    /// The service had already processed this ackId (still a success).
    pub is_duplicated: bool,
    /// The service's error name on ACK/INVOKE errors; NULL otherwise. In this and the
    /// other texts a U+0000 is written as the six characters `\u0000`.
    pub error_name: *const c_char,
    /// What went wrong; NULL on success.
    pub error_message: *const c_char,
    /// Invoke only: the response's `WPS_DATA_TYPE_*`.
    pub data_type: u32,
    /// Invoke only: the response payload, `data_len` bytes, not NUL-terminated.
    pub data: *const u8,
    /// Length of `data`.
    pub data_len: usize,
    /// The service's own text on ACK/INVOKE errors (it is also in `error_message`, after
    /// the library's description of the operation); NULL otherwise.
    pub service_message: *const c_char,
}

/// A successful asynchronous send started with `WPS_SEND_RECORD`, as
/// `wps_client_dispatch_records` writes it instead of calling the send's callback.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct wps_ack_record {
    /// The user data the send was started with.
    pub user_data: *mut c_void,
    /// The id the starting call returned.
    pub op_id: u64,
    /// The send's ackId when `has_ack_id` (not for fire-and-forget).
    pub ack_id: u64,
    /// Whether `ack_id` is set.
    pub has_ack_id: bool,
    /// The service had already processed this ackId (still a success).
    pub is_duplicated: bool,
}

/// `wps_message_record.flags`: `sequence_id` is set (the reliable subprotocols).
pub const WPS_MESSAGE_HAS_SEQUENCE_ID: u32 = 1;
/// `wps_message_record.flags`: the message names its sender (`from_user_id_len` bytes,
/// which may be 0).
pub const WPS_MESSAGE_HAS_FROM_USER_ID: u32 = 2;

/// A group or server message as `wps_client_dispatch_into` writes it instead of calling
/// the event callback. The record is followed by `group_len` bytes of the group name,
/// `from_user_id_len` bytes of the sender's user id and `data_len` bytes of the payload
/// (UTF-8 as the event callback would see them, whole, without NUL terminators); the next
/// record starts `size` bytes after this one's start.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct wps_message_record {
    /// Bytes from this record's start to the next one's: a multiple of 8.
    pub size: u32,
    /// `WPS_EVENT_GROUP_MESSAGE` or `WPS_EVENT_SERVER_MESSAGE`.
    pub kind: u32,
    /// The sequence id when `flags` has `WPS_MESSAGE_HAS_SEQUENCE_ID`, else 0.
    pub sequence_id: u64,
    /// One of `WPS_DATA_TYPE_*`.
    pub data_type: u32,
    /// `WPS_MESSAGE_*` bits.
    pub flags: u32,
    /// Length of the group name (0 for a server message).
    pub group_len: u32,
    /// Length of the sender's user id (0 when it has none).
    pub from_user_id_len: u32,
    /// Length of the payload (JSON as its serialized text).
    pub data_len: u64,
}

// The record has no padding: `write_message_record` copies it whole into C memory.
const _: () = assert!(std::mem::size_of::<wps_message_record>() == 40);

/// The arrays `wps_client_dispatch_into` writes records to, and its counts. Set the
/// four input fields; the call sets the four output fields.
#[repr(C)]
pub struct wps_dispatch_buffers {
    /// In: room for `ack_cap` records of sends started with `WPS_SEND_RECORD`, or NULL:
    /// their callbacks are called instead.
    pub acks: *mut wps_ack_record,
    /// In: records `acks` has room for.
    pub ack_cap: usize,
    /// In: `message_cap` bytes, 8-byte aligned, for `wps_message_record`s, or NULL:
    /// messages reach the event callback instead.
    pub messages: *mut u8,
    /// In: bytes `messages` has room for.
    pub message_cap: usize,
    /// Out: how many events and completions were taken (`ran` of `wps_client_dispatch`).
    pub ran: usize,
    /// Out: how many ack records were written.
    pub acks_written: usize,
    /// Out: how many message records were written.
    pub messages_written: usize,
    /// Out: how many bytes of `messages` they take.
    pub message_bytes: usize,
}

/// Completion callback of an asynchronous operation; runs exactly once.
pub type wps_completion_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, completion: *const wps_completion)>;

/// A user data pointer that the library only hands back to the user's callbacks.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut c_void);

// SAFETY: the API contract makes the user responsible for the user data being usable
// from the library's threads; the library never dereferences it.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

/// The numeric data type of a core data type.
pub(crate) fn data_type_code(t: DataType) -> u32 {
    match t {
        DataType::Text => WPS_DATA_TYPE_TEXT,
        DataType::Json => WPS_DATA_TYPE_JSON,
        DataType::Binary => WPS_DATA_TYPE_BINARY,
        DataType::Protobuf => WPS_DATA_TYPE_PROTOBUF,
    }
}

/// The status, service error name and message of a core error.
pub(crate) fn error_parts(e: &Error) -> (wps_status, String, String) {
    let status = match e {
        Error::InvalidArgument(_) => WPS_STATUS_INVALID_ARGUMENT,
        Error::IllegalState(_) => WPS_STATUS_ILLEGAL_STATE,
        Error::NotConnected { .. } => WPS_STATUS_NOT_CONNECTED,
        Error::Timeout { .. } | Error::StartTimeout { .. } => WPS_STATUS_TIMEOUT,
        Error::Cancelled => WPS_STATUS_CANCELLED,
        Error::Stopped { .. } => WPS_STATUS_STOPPED,
        Error::Ack { .. } => WPS_STATUS_ACK_ERROR,
        Error::Invoke { .. } => WPS_STATUS_INVOKE_ERROR,
        Error::Connect(_) => WPS_STATUS_CONNECT_FAILED,
        Error::Credential(_) => WPS_STATUS_CREDENTIAL_FAILED,
        Error::Tls(_) => WPS_STATUS_TLS,
        Error::Internal(_) => WPS_STATUS_PANIC,
        _ => WPS_STATUS_INTERNAL,
    };
    let name = match e {
        Error::Ack { name, .. } | Error::Invoke { name, .. } => name.clone(),
        _ => String::new(),
    };
    (status, name, e.to_string())
}

/// The ackId of the acked operation `e` ended (refused, timed out, connection lost,
/// client stopped):
/// its caller reports it with the error, so that it can resend with it.
pub(crate) fn failed_ack(e: &Error) -> Option<AckResult> {
    e.ack_id().map(unacked)
}

/// What a completion without an ack says of its operation: only its ackId.
fn unacked(ack_id: u64) -> AckResult {
    AckResult {
        ack_id: Some(ack_id),
        is_duplicated: false,
    }
}

/// Records a core error as this thread's last error and returns its status.
pub(crate) fn fail_with(e: Error) -> wps_status {
    let (status, name, message) = error_parts(&e);
    set_last_error(&message, &name, e.service_message().unwrap_or_default());
    status
}

/// An event converted to owned C data, ready to be lent to the callback.
pub(crate) struct OwnedEvent {
    kind: u32,
    connection_id: Option<Name>,
    user_id: Option<Name>,
    group: Option<Name>,
    from_user_id: Option<Name>,
    data_type: u32,
    data: Bytes,
    sequence_id: Option<u64>,
    message: Option<CString>,
    error_name: Option<CString>,
    close_code: u16,
    service_message: Option<CString>,
    ack_id: Option<u64>,
    status: wps_status,
}

fn opt(s: Option<&str>) -> Option<CString> {
    s.map(to_cstring)
}

/// An id or a name as C data: its bytes, all of them (U+0000 included), then a NUL.
type Name = Arc<[u8]>;

fn c_name(s: &str) -> Name {
    let mut bytes = Vec::with_capacity(s.len() + 1);
    bytes.extend_from_slice(s.as_bytes());
    bytes.push(0);
    bytes.into()
}

/// A name's bytes without its NUL (none when absent).
fn name_bytes(s: &Option<Name>) -> &[u8] {
    s.as_deref().map_or(&[], |b| &b[..b.len() - 1])
}

/// A name's pointer (NULL when absent) and length.
fn name_ptr(s: &Option<Name>) -> (*const c_char, usize) {
    match s {
        Some(b) => (b.as_ptr().cast(), b.len() - 1),
        None => (std::ptr::null(), 0),
    }
}

fn ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The C strings of the last group and sender seen. A subscriber's events mostly
/// repeat them, so they are shared rather than allocated per event (an allocation
/// freed on the dispatcher thread contends with the connection task's allocator).
#[derive(Default)]
struct Names {
    group: Option<Name>,
    from_user_id: Option<Name>,
}

/// `s` as a name: the one in `slot` when equal, else a new one kept there.
fn shared_name(slot: &mut Option<Name>, s: &str) -> Name {
    match slot {
        Some(kept) if kept[..kept.len() - 1] == *s.as_bytes() => Arc::clone(kept),
        _ => Arc::clone(slot.insert(c_name(s))),
    }
}

impl OwnedEvent {
    /// Whether it is a group or server message (not a lifecycle event).
    pub(crate) fn is_message(&self) -> bool {
        matches!(
            self.kind,
            WPS_EVENT_GROUP_MESSAGE | WPS_EVENT_SERVER_MESSAGE
        )
    }

    /// About the memory it takes while it waits in a queue: its data, its names and
    /// the job holding it, in bytes.
    fn weight(&self) -> usize {
        let name = |n: &Option<Name>| n.as_ref().map_or(0, |n| n.len());
        std::mem::size_of::<Job>()
            + self.data.len()
            + name(&self.connection_id)
            + name(&self.user_id)
            + name(&self.group)
            + name(&self.from_user_id)
    }

    fn empty(kind: u32) -> OwnedEvent {
        OwnedEvent {
            kind,
            connection_id: None,
            user_id: None,
            group: None,
            from_user_id: None,
            data_type: WPS_DATA_TYPE_TEXT,
            data: Bytes::new(),
            sequence_id: None,
            message: None,
            error_name: None,
            close_code: 0,
            service_message: None,
            ack_id: None,
            status: WPS_STATUS_OK,
        }
    }

    fn new(event: Event, names: &mut Names) -> OwnedEvent {
        match event {
            Event::Connected {
                connection_id,
                user_id,
            } => OwnedEvent {
                connection_id: Some(c_name(&connection_id)),
                user_id: user_id.as_deref().map(c_name),
                ..OwnedEvent::empty(WPS_EVENT_CONNECTED)
            },
            Event::Disconnected {
                connection_id,
                message,
                close_code,
            } => OwnedEvent {
                connection_id: connection_id.as_deref().map(c_name),
                message: opt(message.as_deref()),
                close_code: close_code.unwrap_or(0),
                ..OwnedEvent::empty(WPS_EVENT_DISCONNECTED)
            },
            Event::Stopped { error } => match error {
                Some(error) => {
                    let (status, _, message) = error_parts(&error);
                    OwnedEvent {
                        message: opt(Some(&message)),
                        status,
                        ..OwnedEvent::empty(WPS_EVENT_STOPPED)
                    }
                }
                None => OwnedEvent::empty(WPS_EVENT_STOPPED),
            },
            Event::ServerMessage {
                data_type,
                data,
                sequence_id,
            } => OwnedEvent {
                data_type: data_type_code(data_type),
                data,
                sequence_id,
                ..OwnedEvent::empty(WPS_EVENT_SERVER_MESSAGE)
            },
            Event::GroupMessage {
                group,
                from_user_id,
                data_type,
                data,
                sequence_id,
            } => OwnedEvent {
                group: Some(shared_name(&mut names.group, &group)),
                from_user_id: from_user_id.map(|id| shared_name(&mut names.from_user_id, &id)),
                data_type: data_type_code(data_type),
                data,
                sequence_id,
                ..OwnedEvent::empty(WPS_EVENT_GROUP_MESSAGE)
            },
            Event::RejoinGroupFailed { group, error } => {
                let (status, name, message) = error_parts(&error);
                OwnedEvent {
                    group: Some(c_name(&group)),
                    status,
                    message: opt(Some(&message)),
                    error_name: (!name.is_empty()).then(|| to_cstring(&name)),
                    service_message: error.service_message().map(to_cstring),
                    ack_id: error.ack_id(),
                    ..OwnedEvent::empty(WPS_EVENT_REJOIN_GROUP_FAILED)
                }
            }
        }
    }

    /// Writes this event at the start of `out` as a `wps_message_record` and its bytes;
    /// returns the record's size. `None` (nothing written) for an event that is not a
    /// message, or one that does not fit.
    pub(crate) fn write_message_record(&self, out: &mut [u8]) -> Option<usize> {
        if self.kind != WPS_EVENT_GROUP_MESSAGE && self.kind != WPS_EVENT_SERVER_MESSAGE {
            return None;
        }
        let (group, from) = (name_bytes(&self.group), name_bytes(&self.from_user_id));
        let header = std::mem::size_of::<wps_message_record>();
        let used = header + group.len() + from.len() + self.data.len();
        let size = used.checked_next_multiple_of(8)?;
        if size > out.len() {
            return None;
        }
        let mut flags = 0;
        if self.sequence_id.is_some() {
            flags |= WPS_MESSAGE_HAS_SEQUENCE_ID;
        }
        if self.from_user_id.is_some() {
            flags |= WPS_MESSAGE_HAS_FROM_USER_ID;
        }
        let record = wps_message_record {
            size: u32::try_from(size).ok()?,
            kind: self.kind,
            sequence_id: self.sequence_id.unwrap_or(0),
            data_type: self.data_type,
            flags,
            group_len: u32::try_from(group.len()).ok()?,
            from_user_id_len: u32::try_from(from.len()).ok()?,
            data_len: self.data.len() as u64,
        };
        // SAFETY: `out` has room for the header (checked above); the record has no
        // padding, and the write needs no alignment.
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<wps_message_record>(), record) };
        let mut at = header;
        for part in [group, from, &self.data[..]] {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out[at..size].fill(0);
        Some(size)
    }

    fn view(&self) -> wps_event {
        let (connection_id, connection_id_len) = name_ptr(&self.connection_id);
        let (user_id, user_id_len) = name_ptr(&self.user_id);
        let (group, group_len) = name_ptr(&self.group);
        let (from_user_id, from_user_id_len) = name_ptr(&self.from_user_id);
        wps_event {
            kind: self.kind,
            connection_id,
            user_id,
            group,
            from_user_id,
            data_type: self.data_type,
            data: self.data.as_ptr(),
            data_len: self.data.len(),
            has_sequence_id: self.sequence_id.is_some(),
            sequence_id: self.sequence_id.unwrap_or(0),
            message: ptr(&self.message),
            error_name: ptr(&self.error_name),
            close_code: self.close_code,
            service_message: ptr(&self.service_message),
            has_ack_id: self.ack_id.is_some(),
            ack_id: self.ack_id.unwrap_or(0),
            connection_id_len,
            user_id_len,
            group_len,
            from_user_id_len,
            status: self.status,
        }
    }
}

/// An event waiting in its client's queue; counted in the client's backlog until it
/// is dropped (it ran, became a record, or was dropped unseen).
pub(crate) struct QueuedEvent {
    pub(crate) sink: Arc<EventSink>,
    pub(crate) event: OwnedEvent,
    weight: usize,
}

impl Drop for QueuedEvent {
    fn drop(&mut self) {
        self.sink.backlog.release(self.weight);
    }
}

/// Delivers one client's events to its callback on the client's dispatcher thread.
pub(crate) struct EventSink {
    worker: Arc<Worker>,
    cb: wps_event_cb,
    user_data: UserData,
    user_data_free: wps_user_data_free_cb,
    closed: AtomicBool,
    /// The events of the current batch of frames, not queued yet: the connection task
    /// gathers them here and `end_batch` queues them under one lock of the worker.
    gathered: Mutex<Gathered>,
    /// The bytes of this client's events that wait, and its limit.
    backlog: Arc<Backlog>,
}

/// What the connection task gathers for one batch of frames.
#[derive(Default)]
struct Gathered {
    jobs: Vec<Job>,
    names: Names,
}

impl EventSink {
    pub(crate) fn new(
        worker: Arc<Worker>,
        cb: wps_event_cb,
        user_data: *mut c_void,
        user_data_free: wps_user_data_free_cb,
        backlog_limit: usize,
    ) -> EventSink {
        EventSink {
            worker,
            cb,
            user_data: UserData(user_data),
            user_data_free,
            closed: AtomicBool::new(false),
            gathered: Mutex::default(),
            backlog: Arc::new(Backlog::new(backlog_limit)),
        }
    }

    fn gathered(&self) -> MutexGuard<'_, Gathered> {
        self.gathered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes of this client's events that wait, and its limit.
    pub(crate) fn backlog(&self) -> &Arc<Backlog> {
        &self.backlog
    }

    /// Poll mode: nothing dispatches this client for a while (see `Worker::suspend`).
    /// Its messages are dropped as they come, so its reading goes on whatever waits.
    /// The backlog learns it under the worker's lock: a `resume` racing this call on
    /// another thread cannot leave reading unbounded while messages are queued again.
    pub(crate) fn suspend(&self) -> Result<(), DispatchError> {
        self.worker.suspend(|| self.backlog.set_suspended(true))
    }

    /// Poll mode: ends `suspend`; returns how many messages it dropped.
    pub(crate) fn resume(&self) -> Result<u64, DispatchError> {
        self.worker.resume(|| self.backlog.set_suspended(false))
    }

    /// Where this client's callbacks run.
    pub(crate) fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Gathers an event (called by the core on its connection task; never blocks long)
    /// for `end_batch`; returns how many are gathered.
    fn deliver(self: &Arc<Self>, event: Event) -> usize {
        if self.closed.load(Ordering::Acquire) {
            return 0;
        }
        // Without a callback, only a message can still reach the application: as a
        // record of a poll-mode dispatch.
        let recordable = matches!(
            event,
            Event::GroupMessage { .. } | Event::ServerMessage { .. }
        ) && self.worker.fd().is_some();
        if self.cb.is_none() && !recordable {
            return 0;
        }
        let mut gathered = self.gathered();
        let event = OwnedEvent::new(event, &mut gathered.names);
        let weight = event.weight();
        self.backlog.hold(weight);
        gathered.jobs.push(Job::Event(QueuedEvent {
            sink: Arc::clone(self),
            event,
            weight,
        }));
        gathered.jobs.len()
    }

    /// Whether events still reach this client (its callback or its records).
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Runs the callback with `event` (on the dispatcher), unless delivery stopped.
    pub(crate) fn call(&self, event: &OwnedEvent) {
        if let (Some(cb), true) = (self.cb, self.is_open()) {
            let view = event.view();
            if let Some(_inside) = InCallback::enter() {
                // SAFETY: the callback and its user data were registered together.
                unsafe { cb(self.user_data.0, &view) };
            }
        }
    }

    /// Queues the gathered events, in order, and wakes the dispatcher.
    fn end_batch(&self) {
        self.worker.push_all(&mut self.gathered().jobs);
    }

    /// Stops event delivery at once (a callback already running finishes).
    pub(crate) fn close_now(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Queues the last job of this client: after it no event callback runs, and the
    /// user data finalizer has run; then `done` runs.
    pub(crate) fn close_then(self: &Arc<Self>, done: impl FnOnce() + Send + 'static) {
        let sink = Arc::clone(self);
        self.worker.push(Job::new(move || {
            sink.closed.store(true, Ordering::Release);
            if let (Some(free), Some(_inside)) = (sink.user_data_free, InCallback::enter()) {
                // SAFETY: runs once: this is the client's only closing job.
                unsafe { free(sink.user_data.0) };
            }
            done();
        }));
    }
}

/// Events gathered before they are queued within one batch of frames: bounds the
/// delay a long batch adds to its first event.
const WAKE_EVERY: usize = 64;

/// The core's event handler of a C client: events are queued for the client's
/// dispatcher once per batch of frames (or per `WAKE_EVERY` events), under one lock
/// and with at most one wake-up, rather than once per event.
pub(crate) struct SinkHandler {
    sink: Arc<EventSink>,
}

impl SinkHandler {
    pub(crate) fn new(sink: Arc<EventSink>) -> SinkHandler {
        SinkHandler { sink }
    }
}

impl EventHandler for SinkHandler {
    fn on_event(&self, event: Event) {
        if self.sink.deliver(event) >= WAKE_EVERY {
            self.sink.end_batch();
        }
    }

    fn on_batch_end(&self) {
        self.sink.end_batch();
    }

    fn backpressure(&self) -> Option<Resume> {
        self.sink.backlog.over()
    }
}

/// Where an operation's completion goes.
pub(crate) struct CompletionTarget {
    pub(crate) cb: wps_completion_cb,
    pub(crate) user_data: UserData,
    /// `WPS_SEND_RECORD`: a success may be written as a record instead of calling `cb`.
    pub(crate) record: bool,
}

/// An operation's outcome converted to owned C data.
pub(crate) struct OwnedCompletion {
    status: wps_status,
    ack: Option<AckResult>,
    error_name: Option<CString>,
    error_message: Option<CString>,
    service_message: Option<CString>,
    response: Option<InvokeResult>,
}

impl OwnedCompletion {
    /// Completion with only a status (cancelled, stopped).
    pub(crate) fn status(status: wps_status, message: &str) -> OwnedCompletion {
        OwnedCompletion {
            status,
            ack: None,
            error_name: None,
            // A success carries no message (the callback sees NULL): nothing to allocate.
            error_message: (status != WPS_STATUS_OK).then(|| to_cstring(message)),
            service_message: None,
            response: None,
        }
    }

    /// Completion of an operation cancelled by its caller, with its ackId if acked.
    pub(crate) fn cancelled(ack_id: Option<u64>) -> OwnedCompletion {
        OwnedCompletion {
            ack: ack_id.map(unacked),
            ..OwnedCompletion::status(WPS_STATUS_CANCELLED, "the operation was cancelled")
        }
    }

    fn error(e: &Error) -> OwnedCompletion {
        let (status, name, message) = error_parts(e);
        OwnedCompletion {
            status,
            ack: failed_ack(e),
            error_name: (!name.is_empty()).then(|| to_cstring(&name)),
            error_message: Some(to_cstring(&message)),
            service_message: e.service_message().map(to_cstring),
            response: None,
        }
    }

    /// Completion of an operation with no result but its status (start, stop).
    pub(crate) fn from_unit(r: Result<(), Error>) -> OwnedCompletion {
        match r {
            Ok(()) => OwnedCompletion::status(WPS_STATUS_OK, ""),
            Err(e) => OwnedCompletion::error(&e),
        }
    }

    /// Completion of an acked operation.
    pub(crate) fn from_ack(r: Result<AckResult, Error>) -> OwnedCompletion {
        match r {
            Ok(ack) => OwnedCompletion {
                ack: Some(ack),
                ..OwnedCompletion::status(WPS_STATUS_OK, "")
            },
            Err(e) => OwnedCompletion::error(&e),
        }
    }

    /// Completion of an invocation.
    pub(crate) fn from_invoke(r: Result<InvokeResult, Error>) -> OwnedCompletion {
        match r {
            Ok(resp) => OwnedCompletion {
                response: Some(resp),
                ..OwnedCompletion::status(WPS_STATUS_OK, "")
            },
            Err(e) => OwnedCompletion::error(&e),
        }
    }

    /// The record that stands for this completion: a success of an operation started
    /// with `WPS_SEND_RECORD`.
    pub(crate) fn record(&self, op_id: u64, target: &CompletionTarget) -> Option<wps_ack_record> {
        if !target.record || self.status != WPS_STATUS_OK || self.response.is_some() {
            return None;
        }
        let (has_ack_id, ack_id, is_duplicated) = self.ack_fields();
        Some(wps_ack_record {
            user_data: target.user_data.0,
            op_id,
            ack_id,
            has_ack_id,
            is_duplicated,
        })
    }

    /// `has_ack_id`, `ack_id` and `is_duplicated` as the C structs carry them.
    fn ack_fields(&self) -> (bool, u64, bool) {
        match &self.ack {
            Some(a) => (a.ack_id.is_some(), a.ack_id.unwrap_or(0), a.is_duplicated),
            None => (false, 0, false),
        }
    }

    /// Calls the completion callback (on the dispatcher thread).
    pub(crate) fn deliver(self, op_id: u64, target: CompletionTarget) {
        let Some(cb) = target.cb else { return };
        let ok = self.status == WPS_STATUS_OK;
        let (data_type, data): (u32, &[u8]) = match &self.response {
            Some(r) => (data_type_code(r.data_type), &r.data),
            None => (WPS_DATA_TYPE_TEXT, &[]),
        };
        let (has_ack_id, ack_id, is_duplicated) = self.ack_fields();
        let view = wps_completion {
            status: self.status,
            op_id,
            has_ack_id,
            ack_id,
            is_duplicated,
            error_name: if ok {
                std::ptr::null()
            } else {
                ptr(&self.error_name)
            },
            error_message: if ok {
                std::ptr::null()
            } else {
                ptr(&self.error_message)
            },
            data_type,
            data: data.as_ptr(),
            data_len: data.len(),
            service_message: if ok {
                std::ptr::null()
            } else {
                ptr(&self.service_message)
            },
        };
        if let Some(_inside) = InCallback::enter() {
            // SAFETY: the callback and its user data were given together for this operation.
            unsafe { cb(target.user_data.0, &view) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record at the start of `out`, and the bytes that follow it.
    fn read(out: &[u8]) -> (wps_message_record, &[u8]) {
        // SAFETY: `out` holds a record written by `write_message_record`.
        let record = unsafe { std::ptr::read_unaligned(out.as_ptr().cast::<wps_message_record>()) };
        (
            record,
            &out[std::mem::size_of::<wps_message_record>()..record.size as usize],
        )
    }

    fn group_message(from_user_id: Option<&str>, sequence_id: Option<u64>) -> OwnedEvent {
        let event = Event::GroupMessage {
            group: "grp".into(),
            from_user_id: from_user_id.map(String::from),
            data_type: DataType::Json,
            data: Bytes::from_static(b"{\"a\":1}"),
            sequence_id,
        };
        OwnedEvent::new(event, &mut Names::default())
    }

    #[test]
    fn a_panic_of_the_connection_task_is_a_stopped_event_with_the_panic_status() {
        let error = Error::Internal("the connection task panicked (a bug in the library)".into());
        let stopped = Event::Stopped {
            error: Some(error.clone()),
        };
        let event = OwnedEvent::new(stopped, &mut Names::default());
        assert_eq!(
            (event.kind, event.status),
            (WPS_EVENT_STOPPED, WPS_STATUS_PANIC)
        );
        assert_eq!(event.message, Some(to_cstring(&error.to_string())));
    }

    #[test]
    fn a_message_record_holds_the_fields_then_the_names_and_payload() {
        let mut out = [0xAAu8; 128];
        let size = group_message(Some("alice"), Some(7))
            .write_message_record(&mut out)
            .unwrap();
        assert_eq!(size, 56, "40 + 3 + 5 + 7 = 55, padded to a multiple of 8");
        let (record, rest) = read(&out);
        assert_eq!((record.size, record.kind), (56, WPS_EVENT_GROUP_MESSAGE));
        assert_eq!(
            (record.sequence_id, record.data_type),
            (7, WPS_DATA_TYPE_JSON)
        );
        assert_eq!(
            record.flags,
            WPS_MESSAGE_HAS_SEQUENCE_ID | WPS_MESSAGE_HAS_FROM_USER_ID
        );
        assert_eq!(
            (record.group_len, record.from_user_id_len, record.data_len),
            (3, 5, 7)
        );
        assert_eq!(rest, b"grpalice{\"a\":1}\0", "the padding is zeroed");
        assert_eq!(out[size], 0xAA, "nothing is written past the record");
    }

    #[test]
    fn a_message_record_marks_what_is_absent() {
        let mut out = [0u8; 64];
        group_message(None, None)
            .write_message_record(&mut out)
            .unwrap();
        let (record, _) = read(&out);
        assert_eq!(
            (record.flags, record.sequence_id, record.from_user_id_len),
            (0, 0, 0)
        );

        let server = OwnedEvent::new(
            Event::ServerMessage {
                data_type: DataType::Binary,
                data: Bytes::from_static(&[0, 1, 2]),
                sequence_id: None,
            },
            &mut Names::default(),
        );
        assert_eq!(server.write_message_record(&mut out), Some(48));
        let (record, rest) = read(&out);
        assert_eq!(
            (record.kind, record.data_type),
            (WPS_EVENT_SERVER_MESSAGE, WPS_DATA_TYPE_BINARY)
        );
        assert_eq!((record.group_len, record.data_len), (0, 3));
        assert_eq!(&rest[..3], [0, 1, 2]);
    }

    #[test]
    fn only_messages_that_fit_are_written() {
        let mut out = [0xAAu8; 55];
        assert_eq!(
            group_message(Some("alice"), None).write_message_record(&mut out),
            None
        );
        assert!(out.iter().all(|&b| b == 0xAA), "nothing written");
        let mut exact = [0xAAu8; 56];
        assert_eq!(
            group_message(Some("alice"), None).write_message_record(&mut exact),
            Some(56),
            "a buffer of the record's size holds it"
        );
        let mut room = [0u8; 256];
        assert_eq!(
            OwnedEvent::empty(WPS_EVENT_STOPPED).write_message_record(&mut room),
            None
        );
    }
}
