//! Typed frames of the Web PubSub client protocol, independent of the encoding.

use bytes::Bytes;
use std::fmt;

/// The WebSocket subprotocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// `json.reliable.webpubsub.azure.v1`: sequence ids, recovery, no loss (the default).
    #[default]
    JsonReliable,
    /// `json.webpubsub.azure.v1`: no sequence ids and no recovery.
    Json,
}

impl Protocol {
    /// The subprotocol name sent in `Sec-WebSocket-Protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::JsonReliable => "json.reliable.webpubsub.azure.v1",
            Protocol::Json => "json.webpubsub.azure.v1",
        }
    }

    /// Whether the protocol carries sequence ids and supports recovery.
    pub fn is_reliable(self) -> bool {
        matches!(self, Protocol::JsonReliable)
    }
}

/// The type of a message payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// UTF-8 text (a JSON string on the wire; a lone surrogate escape in a received one
    /// becomes U+FFFD).
    Text,
    /// A JSON value; the payload bytes are its serialized text.
    Json,
    /// Raw bytes (base64 on the wire).
    Binary,
    /// Protobuf-encoded bytes (base64 on the wire in the JSON protocols).
    Protobuf,
}

impl DataType {
    /// The wire name (`text`, `json`, `binary`, `protobuf`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Text => "text",
            DataType::Json => "json",
            DataType::Binary => "binary",
            DataType::Protobuf => "protobuf",
        }
    }

    /// Parses a wire name; `None` for an unknown one.
    pub fn from_wire(name: &str) -> Option<DataType> {
        match name {
            "text" => Some(DataType::Text),
            "json" => Some(DataType::Json),
            "binary" => Some(DataType::Binary),
            "protobuf" => Some(DataType::Protobuf),
            _ => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message payload: Text is UTF-8 bytes, Json the value's serialized text,
/// Binary/Protobuf the raw bytes (base64 only on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// How the bytes are to be read.
    pub data_type: DataType,
    /// The payload in its in-memory form (see [`Data`]).
    pub bytes: Bytes,
}

impl Data {
    /// A payload of the given type.
    pub fn new(data_type: DataType, bytes: impl Into<Bytes>) -> Data {
        Data {
            data_type,
            bytes: bytes.into(),
        }
    }
}

/// The `error` object of a failed ack or invoke response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorDetail {
    /// Error name, e.g. `Forbidden`, `InternalServerError`, `Duplicate`, `BadRequest`.
    pub name: String,
    /// Human-readable detail.
    pub message: String,
}

/// A frame the client sends to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// `joinGroup`.
    JoinGroup {
        /// The group to join.
        group: String,
        /// Asks for an ack when set.
        ack_id: Option<u64>,
    },
    /// `leaveGroup`.
    LeaveGroup {
        /// The group to leave.
        group: String,
        /// Asks for an ack when set.
        ack_id: Option<u64>,
    },
    /// `sendToGroup`: publish to a group.
    SendToGroup {
        /// The target group.
        group: String,
        /// Asks for an ack when set.
        ack_id: Option<u64>,
        /// Do not deliver back to the sender.
        no_echo: bool,
        /// The payload.
        data: Data,
    },
    /// `event`: a user event for the upstream server.
    Event {
        /// The event name.
        event: String,
        /// Asks for an ack when set.
        ack_id: Option<u64>,
        /// The payload.
        data: Data,
    },
    /// `invoke`: a request whose reply is an `invokeResponse`.
    Invoke {
        /// Matches the reply to the request.
        invocation_id: String,
        /// The event name (target `event`).
        event: String,
        /// The payload.
        data: Data,
    },
    /// `cancelInvocation`: the caller no longer waits for the reply.
    CancelInvocation {
        /// The invocation given up.
        invocation_id: String,
    },
    /// `sequenceAck`: everything up to this sequence id was delivered.
    SequenceAck {
        /// The highest sequence id delivered.
        sequence_id: u64,
    },
    /// `ping`: keep-alive.
    Ping,
}

/// A frame the service sends to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downstream {
    /// The answer to an upstream frame that carried an ackId.
    Ack {
        /// The ackId answered.
        ack_id: u64,
        /// Whether the operation succeeded.
        success: bool,
        /// Why it failed (`Duplicate` means it had already succeeded).
        error: Option<ErrorDetail>,
    },
    /// A message published to a group the client joined.
    GroupMessage {
        /// The group.
        group: String,
        /// The publisher's user id, if any.
        from_user_id: Option<String>,
        /// The payload.
        data: Data,
        /// Present on reliable protocols.
        sequence_id: Option<u64>,
    },
    /// A message from the server side (REST API or upstream).
    ServerMessage {
        /// The payload.
        data: Data,
        /// Present on reliable protocols.
        sequence_id: Option<u64>,
    },
    /// The reply to an `invoke`: `data` on success, `error` on failure.
    InvokeResponse {
        /// The invocation answered.
        invocation_id: String,
        /// Whether the invocation succeeded.
        success: bool,
        /// The reply payload, if any.
        data: Option<Data>,
        /// Why it failed.
        error: Option<ErrorDetail>,
    },
    /// `system`/`connected`: the first frame of a connection.
    Connected {
        /// The service's id of the connection.
        connection_id: String,
        /// The token's user id (may be null).
        user_id: Option<String>,
        /// Recovers this connection (reliable protocols only).
        reconnection_token: Option<String>,
    },
    /// `system`/`disconnected`: the service is about to close the socket.
    Disconnected {
        /// The reason.
        message: Option<String>,
    },
    /// The reply to a `ping`.
    Pong,
    /// A frame whose `type` (or `from`/`event`) this codec does not know; ignored.
    Unknown {
        /// The frame's `type`.
        kind: String,
    },
}

impl Downstream {
    /// The sequence id of a data frame on a reliable protocol.
    pub fn sequence_id(&self) -> Option<u64> {
        match self {
            Downstream::GroupMessage { sequence_id, .. }
            | Downstream::ServerMessage { sequence_id, .. } => *sequence_id,
            _ => None,
        }
    }
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}
