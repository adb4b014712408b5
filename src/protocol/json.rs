//! The JSON subprotocols `json.webpubsub.azure.v1` and `json.reliable.webpubsub.azure.v1`.
//!
//! Both share one frame format; the reliable one adds `sequenceId` to data frames and the
//! `sequenceAck` upstream frame. Encoding writes straight into one `String`; decoding
//! borrows from the received buffer and slices payloads out of it without copying when
//! the wire form allows (JSON values, text without escapes).

use super::frames::{Data, DataType, Downstream, ErrorDetail, ProtocolError, Upstream};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Checks that a payload can be sent with its data type: text must be UTF-8 and json
/// must be exactly one valid JSON value. Binary and protobuf accept any bytes.
pub fn validate_payload(data: &Data) -> Result<(), ProtocolError> {
    check_payload(data.data_type, &data.bytes)
}

/// [`validate_payload`] of borrowed bytes.
fn check_payload(data_type: DataType, bytes: &[u8]) -> Result<(), ProtocolError> {
    match data_type {
        DataType::Text => std::str::from_utf8(bytes)
            .map(|_| ())
            .map_err(|e| ProtocolError(format!("text data is not valid UTF-8: {e}"))),
        DataType::Json => serde_json::from_slice::<&RawValue>(bytes)
            .map(|_| ())
            .map_err(|e| ProtocolError(format!("json data is not a valid JSON value: {e}"))),
        DataType::Binary | DataType::Protobuf => Ok(()),
    }
}

/// Serializes a `sendToGroup` frame from borrowed parts, checking the payload as
/// [`validate_payload`] does in the same pass (what the client does per message).
pub fn encode_send_to_group(
    group: &str,
    ack_id: Option<u64>,
    no_echo: bool,
    data_type: DataType,
    data: &[u8],
) -> Result<String, ProtocolError> {
    let mut w = Writer::with_capacity(FRAME_OVERHEAD + group.len() + data_len(data_type, data));
    w.raw(r#"{"type":"sendToGroup","group":"#);
    w.string(group);
    w.opt_u64(",\"ackId\":", ack_id);
    w.raw(if no_echo {
        ",\"noEcho\":true"
    } else {
        ",\"noEcho\":false"
    });
    w.checked_data(data_type, data)?;
    Ok(w.finish())
}

/// Serializes an `event` frame from borrowed parts, checking the payload as
/// [`validate_payload`] does in the same pass.
pub fn encode_event(
    event: &str,
    ack_id: Option<u64>,
    data_type: DataType,
    data: &[u8],
) -> Result<String, ProtocolError> {
    let mut w = Writer::with_capacity(FRAME_OVERHEAD + event.len() + data_len(data_type, data));
    w.raw(r#"{"type":"event","event":"#);
    w.string(event);
    w.opt_u64(",\"ackId\":", ack_id);
    w.checked_data(data_type, data)?;
    Ok(w.finish())
}

/// Serializes an upstream frame. Payloads must have passed [`validate_payload`]
/// (text that is not UTF-8 is written lossily, never panics).
pub fn encode_upstream(frame: &Upstream) -> String {
    let mut w = Writer::with_capacity(FRAME_OVERHEAD + payload_len(frame));
    match frame {
        Upstream::JoinGroup { group, ack_id } => {
            w.raw(r#"{"type":"joinGroup","group":"#);
            w.string(group);
            w.opt_u64(",\"ackId\":", *ack_id);
        }
        Upstream::LeaveGroup { group, ack_id } => {
            w.raw(r#"{"type":"leaveGroup","group":"#);
            w.string(group);
            w.opt_u64(",\"ackId\":", *ack_id);
        }
        Upstream::SendToGroup {
            group,
            ack_id,
            no_echo,
            data,
        } => {
            w.raw(r#"{"type":"sendToGroup","group":"#);
            w.string(group);
            w.opt_u64(",\"ackId\":", *ack_id);
            w.raw(if *no_echo {
                ",\"noEcho\":true"
            } else {
                ",\"noEcho\":false"
            });
            w.data(data.data_type, &data.bytes);
        }
        Upstream::Event {
            event,
            ack_id,
            data,
        } => {
            w.raw(r#"{"type":"event","event":"#);
            w.string(event);
            w.opt_u64(",\"ackId\":", *ack_id);
            w.data(data.data_type, &data.bytes);
        }
        Upstream::Invoke {
            invocation_id,
            event,
            data,
        } => {
            w.raw(r#"{"type":"invoke","invocationId":"#);
            w.string(invocation_id);
            w.raw(r#","target":"event","event":"#);
            w.string(event);
            w.data(data.data_type, &data.bytes);
        }
        Upstream::CancelInvocation { invocation_id } => {
            w.raw(r#"{"type":"cancelInvocation","invocationId":"#);
            w.string(invocation_id);
        }
        Upstream::SequenceAck { sequence_id } => {
            w.raw(r#"{"type":"sequenceAck","sequenceId":"#);
            w.u64(*sequence_id);
        }
        Upstream::Ping => w.raw(r#"{"type":"ping""#),
    }
    w.finish()
}

/// Rewrites the `ackId` of a frame made by [`encode_upstream`] from `old` to `new`;
/// `None` when the frame has no `ackId` equal to `old`. The first `,"ackId":` is the
/// frame's own: it precedes the payload, and no JSON string holds an unescaped quote.
pub fn replace_ack_id(frame: &str, old: u64, new: u64) -> Option<String> {
    const KEY: &str = ",\"ackId\":";
    let at = frame.find(KEY)? + KEY.len();
    let digits = frame[at..].bytes().take_while(u8::is_ascii_digit).count();
    if frame[at..at + digits] != *old.to_string() {
        return None;
    }
    Some(format!("{}{new}{}", &frame[..at], &frame[at + digits..]))
}

/// The common successful ack in its compact form, `{"type":"ack","ackId":N,"success":true}`,
/// without the general parser; any other form gives `None` (and takes the general path).
fn decode_plain_ack(frame: &[u8]) -> Option<Downstream> {
    let rest = frame.strip_prefix(br#"{"type":"ack","ackId":"#)?;
    let rest = rest.strip_suffix(br#","success":true}"#)?;
    let leading_zero = rest.len() > 1 && rest[0] == b'0';
    if rest.is_empty() || rest.len() > 19 || leading_zero || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ack_id = rest.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(Downstream::Ack {
        ack_id,
        success: true,
        error: None,
    })
}

/// Serializes a downstream frame (what the service sends; used by tests and tools).
pub fn encode_downstream(frame: &Downstream) -> String {
    let mut w = Writer::with_capacity(96);
    match frame {
        Downstream::Ack {
            ack_id,
            success,
            error,
        } => {
            w.raw(r#"{"type":"ack","ackId":"#);
            w.u64(*ack_id);
            w.raw(if *success {
                ",\"success\":true"
            } else {
                ",\"success\":false"
            });
            w.error(error.as_ref());
        }
        Downstream::GroupMessage {
            group,
            from_user_id,
            data,
            sequence_id,
        } => {
            w.raw(r#"{"type":"message","from":"group","group":"#);
            w.string(group);
            if let Some(user) = from_user_id {
                w.raw(",\"fromUserId\":");
                w.string(user);
            }
            w.data(data.data_type, &data.bytes);
            w.opt_u64(",\"sequenceId\":", *sequence_id);
        }
        Downstream::ServerMessage { data, sequence_id } => {
            w.raw(r#"{"type":"message","from":"server""#);
            w.data(data.data_type, &data.bytes);
            w.opt_u64(",\"sequenceId\":", *sequence_id);
        }
        Downstream::InvokeResponse {
            invocation_id,
            success,
            data,
            error,
        } => {
            w.raw(r#"{"type":"invokeResponse","invocationId":"#);
            w.string(invocation_id);
            w.raw(if *success {
                ",\"success\":true"
            } else {
                ",\"success\":false"
            });
            if let Some(data) = data {
                w.data(data.data_type, &data.bytes);
            }
            w.error(error.as_ref());
        }
        Downstream::Connected {
            connection_id,
            user_id,
            reconnection_token,
        } => {
            w.raw(r#"{"type":"system","event":"connected","userId":"#);
            match user_id {
                Some(user) => w.string(user),
                None => w.raw("null"),
            }
            w.raw(",\"connectionId\":");
            w.string(connection_id);
            if let Some(token) = reconnection_token {
                w.raw(",\"reconnectionToken\":");
                w.string(token);
            }
        }
        Downstream::Disconnected { message } => {
            w.raw(r#"{"type":"system","event":"disconnected""#);
            if let Some(message) = message {
                w.raw(",\"message\":");
                w.string(message);
            }
        }
        Downstream::Pong => w.raw(r#"{"type":"pong""#),
        Downstream::Unknown { kind } => {
            w.raw(r#"{"type":"#);
            w.string(kind);
        }
    }
    w.finish()
}

/// Parses a frame received from the service. Unknown `type` values (and unknown
/// `message`/`system` variants) give [`Downstream::Unknown`]; malformed frames give an
/// error. Payloads are sliced out of `frame` without copying where possible.
pub fn decode_downstream(frame: &Bytes) -> Result<Downstream, ProtocolError> {
    if let Some(ack) = decode_plain_ack(frame) {
        return Ok(ack);
    }
    let text = utf8(frame)?;
    match decode_plain_message(frame, text) {
        Some(message) => Ok(message),
        None => decode_wire(frame, text),
    }
}

/// Parses any downstream frame through [`Wire`]; `text` is `frame` as UTF-8.
fn decode_wire(frame: &Bytes, text: &str) -> Result<Downstream, ProtocolError> {
    let wire = Wire::parse(text)?;
    let f = Fields(&wire);
    Ok(match wire.kind.as_ref() {
        "ack" => Downstream::Ack {
            ack_id: f.req_u64("ackId", wire.ack_id)?,
            success: f.req_bool("success", wire.success)?,
            error: f.error()?,
        },
        "message" => match f.opt_str("from", wire.from)?.as_deref() {
            Some("group") => Downstream::GroupMessage {
                group: f.req_str("group", wire.group)?,
                from_user_id: f.opt_str("fromUserId", wire.from_user_id)?,
                data: f.data(frame)?,
                sequence_id: f.opt_u64("sequenceId", wire.sequence_id)?,
            },
            Some("server") => Downstream::ServerMessage {
                data: f.data(frame)?,
                sequence_id: f.opt_u64("sequenceId", wire.sequence_id)?,
            },
            _ => Downstream::Unknown {
                kind: "message".into(),
            },
        },
        "invokeResponse" => Downstream::InvokeResponse {
            invocation_id: f.req_str("invocationId", wire.invocation_id)?,
            success: f.req_bool("success", wire.success)?,
            data: match wire.data_type {
                Some(_) => Some(f.data(frame)?),
                None => None,
            },
            error: f.error()?,
        },
        "system" => match f.opt_str("event", wire.event)?.as_deref() {
            Some("connected") => Downstream::Connected {
                connection_id: f.req_str("connectionId", wire.connection_id)?,
                user_id: f.opt_str("userId", wire.user_id)?,
                reconnection_token: f.opt_str("reconnectionToken", wire.reconnection_token)?,
            },
            Some("disconnected") => Downstream::Disconnected {
                message: f.opt_str("message", wire.message)?,
            },
            _ => Downstream::Unknown {
                kind: "system".into(),
            },
        },
        "pong" => Downstream::Pong,
        other => Downstream::Unknown {
            kind: other.to_owned(),
        },
    })
}

/// Parses a frame sent by a client (the service's side; used by tests and tools).
/// Unknown `type` values are errors here: a service must answer them, not skip them.
pub fn decode_upstream(frame: &Bytes) -> Result<Upstream, ProtocolError> {
    let wire = Wire::parse(utf8(frame)?)?;
    let f = Fields(&wire);
    Ok(match wire.kind.as_ref() {
        "joinGroup" => Upstream::JoinGroup {
            group: f.req_str("group", wire.group)?,
            ack_id: f.opt_u64("ackId", wire.ack_id)?,
        },
        "leaveGroup" => Upstream::LeaveGroup {
            group: f.req_str("group", wire.group)?,
            ack_id: f.opt_u64("ackId", wire.ack_id)?,
        },
        "sendToGroup" => Upstream::SendToGroup {
            group: f.req_str("group", wire.group)?,
            ack_id: f.opt_u64("ackId", wire.ack_id)?,
            no_echo: f.opt_bool("noEcho", wire.no_echo)?.unwrap_or(false),
            data: f.data(frame)?,
        },
        "event" => Upstream::Event {
            event: f.req_str("event", wire.event)?,
            ack_id: f.opt_u64("ackId", wire.ack_id)?,
            data: f.data(frame)?,
        },
        "invoke" => Upstream::Invoke {
            invocation_id: f.req_str("invocationId", wire.invocation_id)?,
            event: f.req_str("event", wire.event)?,
            data: f.data(frame)?,
        },
        "cancelInvocation" => Upstream::CancelInvocation {
            invocation_id: f.req_str("invocationId", wire.invocation_id)?,
        },
        "sequenceAck" => Upstream::SequenceAck {
            sequence_id: f.req_u64("sequenceId", wire.sequence_id)?,
        },
        "ping" => Upstream::Ping,
        other => {
            return Err(ProtocolError(format!(
                "unknown upstream frame type {other:?}"
            )))
        }
    })
}

/// A group or server message as the service writes it (`type` first, every field of
/// the expected JSON type), read in one pass; `None` for any other frame, which
/// [`Wire`] then reads, with the same result or the error. [`Wire`] holds every field
/// raw and parses each again, which took a fifth of the time a message costs.
fn decode_plain_message(frame: &Bytes, text: &str) -> Option<Downstream> {
    /// The fields of a message. Any other field, a field of another JSON type, or a
    /// string whose escapes UTF-8 cannot carry fails the parse (and `Wire` reads the
    /// frame).
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Message<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        from: &'a str,
        group: Option<String>,
        from_user_id: Option<String>,
        #[serde(borrow)]
        data_type: &'a RawValue,
        #[serde(borrow)]
        data: Option<&'a RawValue>,
        sequence_id: Option<u64>,
    }
    if !text.starts_with(r#"{"type":"message","#) {
        return None;
    }
    let m: Message = serde_json::from_str(text).ok()?;
    if m.kind != "message" {
        return None;
    }
    let wire = Wire {
        kind: Cow::Borrowed("message"),
        data_type: Some(m.data_type),
        data: m.data,
        ..Wire::default()
    };
    let data = Fields(&wire).data(frame).ok()?;
    match (m.from, m.group) {
        ("group", Some(group)) => Some(Downstream::GroupMessage {
            group,
            from_user_id: m.from_user_id,
            data,
            sequence_id: m.sequence_id,
        }),
        ("server", _) => Some(Downstream::ServerMessage {
            data,
            sequence_id: m.sequence_id,
        }),
        _ => None,
    }
}

/// One frame as it sits on the wire: the `type`, and every other known field left
/// unparsed until the type says what it must be (so an unknown type never fails on a
/// field whose shape it changed).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    ack_id: Option<&'a RawValue>,
    #[serde(borrow)]
    success: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    group: Option<&'a RawValue>,
    #[serde(borrow)]
    from_user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    data_type: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    sequence_id: Option<&'a RawValue>,
    #[serde(borrow)]
    invocation_id: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    connection_id: Option<&'a RawValue>,
    #[serde(borrow)]
    reconnection_token: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Option<&'a RawValue>,
    #[serde(borrow)]
    no_echo: Option<&'a RawValue>,
}

impl<'a> Wire<'a> {
    /// Parses from text: `serde_json` then checks no UTF-8 (from bytes it checks each
    /// field again, a tenth of a subscriber's time).
    fn parse(frame: &'a str) -> Result<Wire<'a>, ProtocolError> {
        serde_json::from_str(frame).map_err(|e| ProtocolError(format!("malformed frame: {e}")))
    }
}

/// A frame as text, or the error for a frame that is not UTF-8.
fn utf8(frame: &[u8]) -> Result<&str, ProtocolError> {
    std::str::from_utf8(frame).map_err(|e| ProtocolError(format!("malformed frame: {e}")))
}

#[derive(Deserialize)]
struct WireError {
    name: String,
    #[serde(default)]
    message: Option<String>,
}

/// Typed access to the raw fields of a [`Wire`].
struct Fields<'w, 'a>(&'w Wire<'a>);

impl<'a> Fields<'_, 'a> {
    fn parse<T: Deserialize<'a>>(&self, name: &str, raw: &'a RawValue) -> Result<T, ProtocolError> {
        serde_json::from_str(raw.get()).map_err(|e| {
            ProtocolError(format!(
                "field {name:?} of a {:?} frame is malformed: {e}",
                self.0.kind
            ))
        })
    }

    fn missing(&self, name: &str) -> ProtocolError {
        ProtocolError(format!(
            "field {name:?} missing in a {:?} frame",
            self.0.kind
        ))
    }

    fn opt_str(
        &self,
        name: &str,
        raw: Option<&'a RawValue>,
    ) -> Result<Option<String>, ProtocolError> {
        raw.map(|r| {
            self.parse::<Option<String>>(name, r)
                .or_else(|e| lossy_string(r.get()).map(Some).ok_or(e))
        })
        .transpose()
        .map(Option::flatten)
    }

    fn req_str(&self, name: &str, raw: Option<&'a RawValue>) -> Result<String, ProtocolError> {
        self.opt_str(name, raw)?.ok_or_else(|| self.missing(name))
    }

    fn opt_u64(&self, name: &str, raw: Option<&'a RawValue>) -> Result<Option<u64>, ProtocolError> {
        raw.map(|r| self.parse::<Option<u64>>(name, r))
            .transpose()
            .map(Option::flatten)
    }

    fn req_u64(&self, name: &str, raw: Option<&'a RawValue>) -> Result<u64, ProtocolError> {
        self.opt_u64(name, raw)?.ok_or_else(|| self.missing(name))
    }

    fn opt_bool(
        &self,
        name: &str,
        raw: Option<&'a RawValue>,
    ) -> Result<Option<bool>, ProtocolError> {
        raw.map(|r| self.parse::<Option<bool>>(name, r))
            .transpose()
            .map(Option::flatten)
    }

    fn req_bool(&self, name: &str, raw: Option<&'a RawValue>) -> Result<bool, ProtocolError> {
        self.opt_bool(name, raw)?.ok_or_else(|| self.missing(name))
    }

    fn error(&self) -> Result<Option<ErrorDetail>, ProtocolError> {
        let Some(raw) = self.0.error else {
            return Ok(None);
        };
        let error: Option<WireError> = self.parse("error", raw)?;
        Ok(error.map(|e| ErrorDetail {
            name: e.name,
            message: e.message.unwrap_or_default(),
        }))
    }

    /// The `dataType` + `data` pair as a payload, sliced from `frame` when possible.
    fn data(&self, frame: &Bytes) -> Result<Data, ProtocolError> {
        let name = self.req_str("dataType", self.0.data_type)?;
        let data_type = DataType::from_wire(&name)
            .ok_or_else(|| ProtocolError(format!("unknown dataType {name:?}")))?;
        let raw = self.0.data;
        let bytes = match data_type {
            DataType::Json => match raw {
                Some(raw) => slice_of(frame, raw.get()),
                None => Bytes::from_static(b"null"),
            },
            DataType::Text => self.string_data(frame, raw)?,
            DataType::Binary | DataType::Protobuf => {
                let encoded = self.string_data(frame, raw)?;
                Bytes::from(BASE64.decode(&encoded).map_err(|e| {
                    ProtocolError(format!("{data_type} data is not valid base64: {e}"))
                })?)
            }
        };
        Ok(Data { data_type, bytes })
    }

    /// The content of a JSON string `data` field: a slice of the frame when it has no
    /// escapes, else the unescaped copy.
    fn string_data(
        &self,
        frame: &Bytes,
        raw: Option<&'a RawValue>,
    ) -> Result<Bytes, ProtocolError> {
        let raw = raw.ok_or_else(|| self.missing("data"))?.get();
        if !raw.starts_with('"') {
            return Err(ProtocolError(format!(
                "data of a {:?} frame must be a JSON string",
                self.0.kind
            )));
        }
        if raw.contains('\\') {
            let unescaped = serde_json::from_str::<String>(raw)
                .or_else(|e| lossy_string(raw).ok_or(e))
                .map_err(|e| {
                    ProtocolError(format!(
                        "data of a {:?} frame is malformed: {e}",
                        self.0.kind
                    ))
                })?;
            Ok(Bytes::from(unescaped))
        } else {
            Ok(slice_of(frame, &raw[1..raw.len() - 1]))
        }
    }
}

/// A JSON string whose escapes include a lone surrogate (`"\\ud800"`: valid JSON, as a
/// JavaScript sender writes a string cut inside a surrogate pair, but no UTF-8), with
/// U+FFFD in place of each lone surrogate; `None` when `raw` is no JSON string at all.
fn lossy_string(raw: &str) -> Option<String> {
    /// serde_json reads a string as bytes in WTF-8, where a lone surrogate is the
    /// three bytes UTF-8 would give it if it allowed it.
    struct Wtf8(Vec<u8>);
    impl<'de> Deserialize<'de> for Wtf8 {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Wtf8, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Wtf8;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON string")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Wtf8, E> {
                    Ok(Wtf8(v.to_vec()))
                }
            }
            d.deserialize_bytes(Visitor)
        }
    }
    let Wtf8(mut bytes) = serde_json::from_str(raw).ok()?;
    // A surrogate's three bytes are ED A0..BF 80..BF, and U+FFFD's three are EF BF BD:
    // replaced in place. ED never continues a character, so no other match is possible.
    let mut i = 0;
    while i + 2 < bytes.len() {
        if bytes[i] == 0xED && bytes[i + 1] >= 0xA0 {
            bytes[i..i + 3].copy_from_slice("\u{fffd}".as_bytes());
            i += 3;
        } else {
            i += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

/// `part` as a zero-copy slice of `frame` when it lies inside it, else a copy.
fn slice_of(frame: &Bytes, part: &str) -> Bytes {
    let start = frame.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    if p >= start && p + part.len() <= start + frame.len() {
        frame.slice(p - start..p - start + part.len())
    } else {
        Bytes::copy_from_slice(part.as_bytes())
    }
}

/// Room for the fixed parts of the longest upstream frame (keys, type, a 20-digit
/// ackId, quotes), so that encoding a frame without escapes allocates exactly once.
const FRAME_OVERHEAD: usize = 128;

/// The encoded size of a frame's variable parts (names and payload), escapes aside.
fn payload_len(frame: &Upstream) -> usize {
    let (name, data) = match frame {
        Upstream::SendToGroup { group, data, .. } => (group.len(), data),
        Upstream::Event { event, data, .. } => (event.len(), data),
        Upstream::Invoke {
            invocation_id,
            event,
            data,
        } => (invocation_id.len() + event.len(), data),
        Upstream::JoinGroup { group, .. } | Upstream::LeaveGroup { group, .. } => {
            return group.len()
        }
        Upstream::CancelInvocation { invocation_id } => return invocation_id.len(),
        Upstream::SequenceAck { .. } | Upstream::Ping => return 0,
    };
    name + data_len(data.data_type, &data.bytes)
}

/// The encoded size of a payload, escapes aside.
fn data_len(data_type: DataType, bytes: &[u8]) -> usize {
    match data_type {
        DataType::Text | DataType::Json => bytes.len(),
        DataType::Binary | DataType::Protobuf => bytes.len().div_ceil(3) * 4,
    }
}

/// The index of the first byte of `bytes` that a JSON string must escape. Skips eight
/// bytes at a time while none of them is `"`, `\\` or a control character.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut start = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let special = has_zero_byte(x ^ (ONES * u64::from(b'"')))
            | has_zero_byte(x ^ (ONES * u64::from(b'\\')));
        if control | special != 0 {
            break;
        }
        start += 8;
    }
    bytes[start..]
        .iter()
        .position(|&b| NEEDS_ESCAPE[b as usize])
        .map(|i| start + i)
}

/// Bytes that a JSON string literal must escape: `"`, `\` and control characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends JSON fragments to one growing `String`.
struct Writer {
    out: String,
}

impl Writer {
    fn with_capacity(capacity: usize) -> Writer {
        Writer {
            out: String::with_capacity(capacity),
        }
    }

    fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }

    fn u64(&mut self, n: u64) {
        self.out.push_str(itoa::Buffer::new().format(n));
    }

    fn opt_u64(&mut self, key: &str, n: Option<u64>) {
        if let Some(n) = n {
            self.out.push_str(key);
            self.u64(n);
        }
    }

    /// Writes `s` as a JSON string literal.
    fn string(&mut self, s: &str) {
        self.out.push('"');
        let bytes = s.as_bytes();
        let mut run = 0;
        let Some(first) = first_to_escape(bytes) else {
            self.out.push_str(s);
            self.out.push('"');
            return;
        };
        for (i, &b) in bytes.iter().enumerate().skip(first) {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.out.push_str(&s[run..i]);
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.out.push_str("\\u00");
                self.out.push(HEX[(b >> 4) as usize] as char);
                self.out.push(HEX[(b & 0xf) as usize] as char);
            } else {
                self.out.push_str(escape);
            }
            run = i + 1;
        }
        self.out.push_str(&s[run..]);
        self.out.push('"');
    }

    fn data(&mut self, data_type: DataType, bytes: &[u8]) {
        self.out.push_str(",\"dataType\":\"");
        self.out.push_str(data_type.as_str());
        self.out.push_str("\",\"data\":");
        match data_type {
            DataType::Text => match std::str::from_utf8(bytes) {
                Ok(text) => self.string(text),
                Err(_) => self.string(&String::from_utf8_lossy(bytes)),
            },
            DataType::Json => match std::str::from_utf8(bytes) {
                Ok(json) if !json.trim().is_empty() => self.out.push_str(json),
                _ => self.out.push_str("null"),
            },
            DataType::Binary | DataType::Protobuf => {
                self.out.push('"');
                BASE64.encode_string(bytes, &mut self.out);
                self.out.push('"');
            }
        }
    }

    /// Like `data`, failing on a payload that [`validate_payload`] refuses.
    fn checked_data(&mut self, data_type: DataType, bytes: &[u8]) -> Result<(), ProtocolError> {
        match data_type {
            DataType::Text => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| ProtocolError(format!("text data is not valid UTF-8: {e}")))?;
                self.out.push_str(",\"dataType\":\"text\",\"data\":");
                self.string(text);
            }
            _ => {
                check_payload(data_type, bytes)?;
                self.data(data_type, bytes);
            }
        }
        Ok(())
    }

    fn error(&mut self, error: Option<&ErrorDetail>) {
        if let Some(error) = error {
            self.out.push_str(",\"error\":{\"name\":");
            self.string(&error.name);
            self.out.push_str(",\"message\":");
            self.string(&error.message);
            self.out.push('}');
        }
    }

    fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the one-pass reader makes of `frame`, checked against [`Wire`]'s reading.
    fn both(frame: &str) -> (Option<Downstream>, Result<Downstream, ProtocolError>) {
        let bytes = Bytes::copy_from_slice(frame.as_bytes());
        (
            decode_plain_message(&bytes, frame),
            decode_wire(&bytes, frame),
        )
    }

    fn message() -> impl Strategy<Value = Downstream> {
        let data = prop_oneof![
            any::<String>().prop_map(|s| Data::new(DataType::Text, s.into_bytes())),
            "\\PC{0,8}".prop_map(|s| Data::new(DataType::Json, serde_json::to_vec(&s).unwrap())),
            prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| Data::new(DataType::Binary, b)),
        ];
        let sequence_id = proptest::option::of(any::<u64>());
        prop_oneof![
            (
                any::<String>(),
                proptest::option::of(any::<String>()),
                data.clone(),
                sequence_id.clone()
            )
                .prop_map(|(group, from_user_id, data, sequence_id)| {
                    Downstream::GroupMessage {
                        group,
                        from_user_id,
                        data,
                        sequence_id,
                    }
                }),
            (data, sequence_id)
                .prop_map(|(data, sequence_id)| Downstream::ServerMessage { data, sequence_id }),
        ]
    }

    proptest! {
        #[test]
        fn the_one_pass_reader_reads_what_the_service_writes(frame in message()) {
            let (plain, wire) = both(&encode_downstream(&frame));
            prop_assert_eq!(plain, Some(frame.clone()));
            prop_assert_eq!(wire, Ok(frame));
        }

        #[test]
        fn the_one_pass_reader_agrees_with_wire_on_damaged_frames(
            frame in message(),
            at in any::<prop::sample::Index>(),
            byte in 0x20u8..0x7f,
        ) {
            let mut encoded = encode_downstream(&frame).into_bytes();
            let at = at.index(encoded.len());
            encoded[at] = byte;
            if let Ok(text) = std::str::from_utf8(&encoded) {
                let (plain, wire) = both(text);
                if let Some(plain) = plain {
                    prop_assert_eq!(Ok(plain), wire);
                }
            }
        }
    }

    #[test]
    fn frames_off_the_services_shape_go_to_wire() {
        let off_shape = [
            // A field the service does not write in a message, or one written twice.
            r#"{"type":"message","from":"group","group":"g","dataType":"text","data":"x","ackId":1}"#,
            r#"{"type":"message","type":"ack","from":"group","group":"g","dataType":"text","data":"x"}"#,
            r#"{"type":"message","from":"group","group":"g","group":"h","dataType":"text","data":"x"}"#,
            // A field of another type, a lone surrogate, an escaped `from`.
            r#"{"type":"message","from":"group","group":7,"dataType":"text","data":"x"}"#,
            r#"{"type":"message","from":"group","group":"\ud800","dataType":"text","data":"x"}"#,
            r#"{"type":"message","from":"gr\u006fup","group":"g","dataType":"text","data":"x"}"#,
            // No group, an unknown sender, a bad payload.
            r#"{"type":"message","from":"group","group":null,"dataType":"text","data":"x"}"#,
            r#"{"type":"message","from":"user","dataType":"text","data":"x"}"#,
            r#"{"type":"message","from":"server","dataType":"binary","data":"%"}"#,
            // `type` not first.
            r#"{"from":"server","type":"message","dataType":"text","data":"x"}"#,
        ];
        for frame in off_shape {
            assert_eq!(both(frame).0, None, "{frame}");
        }
        let (_, wire) = both(off_shape[4]);
        assert!(
            matches!(wire, Ok(Downstream::GroupMessage { ref group, .. }) if group == "\u{fffd}"),
            "{wire:?}"
        );
    }
}
