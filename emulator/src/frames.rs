//! Downstream frame encoding (service to client) for the JSON protocols, and the
//! payload type shared by the WebSocket endpoint, the REST API and the upstream.

use axum::extract::ws::{Message, Utf8Bytes};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use serde::ser::{Serialize, Serializer};
use serde_json::value::RawValue;

/// The data of a message, in the form it arrived.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// `dataType: text`.
    Text(String),
    /// `dataType: json`: kept as the raw JSON text, never re-parsed.
    Json(Box<RawValue>),
    /// `dataType: binary`.
    Binary(Bytes),
    /// `dataType: protobuf` (opaque bytes).
    Protobuf(Bytes),
}

impl Payload {
    /// The `dataType` name.
    pub(crate) fn data_type(&self) -> &'static str {
        match self {
            Payload::Text(_) => "text",
            Payload::Json(_) => "json",
            Payload::Binary(_) => "binary",
            Payload::Protobuf(_) => "protobuf",
        }
    }

    /// Decodes `data` of a JSON frame given its `dataType`.
    pub(crate) fn from_frame(data_type: &str, data: &RawValue) -> Result<Payload, String> {
        match data_type {
            "text" => serde_json::from_str::<String>(data.get())
                .map(Payload::Text)
                .map_err(|_| "dataType 'text' needs a JSON string in 'data'".to_owned()),
            "json" => Ok(Payload::Json(data.to_owned())),
            "binary" | "protobuf" => {
                let s: String = serde_json::from_str(data.get()).map_err(|_| {
                    format!("dataType '{data_type}' needs a base64 string in 'data'")
                })?;
                let bytes = STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| format!("invalid base64 in 'data': {e}"))?;
                Ok(if data_type == "binary" {
                    Payload::Binary(bytes.into())
                } else {
                    Payload::Protobuf(bytes.into())
                })
            }
            other => Err(format!(
                "unknown dataType '{other}' (expected text, json, binary or protobuf)"
            )),
        }
    }

    /// The payload as a raw WebSocket frame, for clients without a subprotocol.
    pub(crate) fn to_raw_message(&self) -> Message {
        match self {
            Payload::Text(s) => Message::Text(Utf8Bytes::from(s.as_str())),
            Payload::Json(v) => Message::Text(Utf8Bytes::from(v.get())),
            Payload::Binary(b) | Payload::Protobuf(b) => Message::Binary(b.clone()),
        }
    }

    /// The body bytes and content type for an HTTP request or response.
    pub(crate) fn to_http(&self) -> (Bytes, &'static str) {
        match self {
            Payload::Text(s) => (Bytes::from(s.clone()), "text/plain; charset=utf-8"),
            Payload::Json(v) => (Bytes::from(v.get().to_owned()), "application/json"),
            Payload::Binary(b) => (b.clone(), "application/octet-stream"),
            Payload::Protobuf(b) => (b.clone(), "application/x-protobuf"),
        }
    }

    /// Builds a payload from an HTTP body by its content type (text/plain, application/json,
    /// anything else binary). JSON bodies are validated.
    pub(crate) fn from_http(content_type: Option<&str>, body: Bytes) -> Result<Payload, String> {
        let mime = content_type
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match mime.as_str() {
            "text/plain" => String::from_utf8(body.to_vec())
                .map(Payload::Text)
                .map_err(|_| "text/plain body is not valid UTF-8".to_owned()),
            "application/json" => {
                let text = std::str::from_utf8(&body)
                    .map_err(|_| "application/json body is not valid UTF-8".to_owned())?;
                RawValue::from_string(text.trim().to_owned())
                    .map(Payload::Json)
                    .map_err(|e| format!("application/json body is not valid JSON: {e}"))
            }
            "application/x-protobuf" => Ok(Payload::Protobuf(body)),
            _ => Ok(Payload::Binary(body)),
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Text(t) => s.serialize_str(t),
            Payload::Json(v) => v.serialize(s),
            Payload::Binary(b) | Payload::Protobuf(b) => s.serialize_str(&STANDARD.encode(b)),
        }
    }
}

/// An error object of an ack or invoke response.
#[derive(serde::Serialize)]
pub(crate) struct ErrorDetail<'a> {
    pub name: &'a str,
    pub message: &'a str,
}

fn to_message<T: Serialize>(value: &T) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(value).expect("frames always serialize"),
    ))
}

/// `{"type":"ack","ackId":N,"success":...}`.
pub(crate) fn ack(ack_id: u64, error: Option<(&str, &str)>) -> Message {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Ack<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        ack_id: u64,
        success: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ErrorDetail<'a>>,
    }
    to_message(&Ack {
        ty: "ack",
        ack_id,
        success: error.is_none(),
        error: error.map(|(name, message)| ErrorDetail { name, message }),
    })
}

/// `{"type":"pong"}`.
pub(crate) fn pong() -> Message {
    Message::Text(Utf8Bytes::from_static(r#"{"type":"pong"}"#))
}

/// `{"type":"system","event":"connected",...}`.
pub(crate) fn connected(
    user_id: Option<&str>,
    connection_id: &str,
    reconnection_token: Option<&str>,
) -> Message {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Connected<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        event: &'static str,
        user_id: Option<&'a str>,
        connection_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reconnection_token: Option<&'a str>,
    }
    to_message(&Connected {
        ty: "system",
        event: "connected",
        user_id,
        connection_id,
        reconnection_token,
    })
}

/// `{"type":"system","event":"disconnected","message":reason}`.
pub(crate) fn disconnected(reason: &str) -> Message {
    #[derive(serde::Serialize)]
    struct Disconnected<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        event: &'static str,
        message: &'a str,
    }
    to_message(&Disconnected {
        ty: "system",
        event: "disconnected",
        message: reason,
    })
}

/// `{"type":"invokeResponse",...}`: success with an optional payload, or an error.
pub(crate) fn invoke_response(
    invocation_id: &str,
    result: Result<Option<&Payload>, (&str, &str)>,
) -> Message {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct InvokeResponse<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        invocation_id: &'a str,
        success: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_type: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Payload>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ErrorDetail<'a>>,
    }
    let (success, payload, error) = match result {
        Ok(p) => (true, p, None),
        Err((name, message)) => (false, None, Some(ErrorDetail { name, message })),
    };
    to_message(&InvokeResponse {
        ty: "invokeResponse",
        invocation_id,
        success,
        data_type: payload.map(Payload::data_type),
        data: payload,
        error,
    })
}

/// A data message built once and delivered to many connections: the JSON frame
/// (without `sequenceId`) and the raw frame for clients without a subprotocol.
pub(crate) struct Publication {
    json: Utf8Bytes,
    raw: Message,
}

impl Publication {
    /// A group message `{"type":"message","from":"group",...}`.
    pub(crate) fn group(group: &str, from_user_id: Option<&str>, payload: &Payload) -> Self {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct GroupMessage<'a> {
            #[serde(rename = "type")]
            ty: &'static str,
            from: &'static str,
            group: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            from_user_id: Option<&'a str>,
            data_type: &'static str,
            data: &'a Payload,
        }
        Self::build(
            &GroupMessage {
                ty: "message",
                from: "group",
                group,
                from_user_id,
                data_type: payload.data_type(),
                data: payload,
            },
            payload,
        )
    }

    /// A server message `{"type":"message","from":"server",...}`.
    pub(crate) fn server(payload: &Payload) -> Self {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ServerMessage<'a> {
            #[serde(rename = "type")]
            ty: &'static str,
            from: &'static str,
            data_type: &'static str,
            data: &'a Payload,
        }
        Self::build(
            &ServerMessage {
                ty: "message",
                from: "server",
                data_type: payload.data_type(),
                data: payload,
            },
            payload,
        )
    }

    fn build<T: Serialize>(frame: &T, payload: &Payload) -> Self {
        let json = serde_json::to_string(frame).expect("frames always serialize");
        Publication {
            json: Utf8Bytes::from(json),
            raw: payload.to_raw_message(),
        }
    }

    /// The shared JSON frame for the non-reliable JSON protocol.
    pub(crate) fn json(&self) -> Message {
        Message::Text(self.json.clone())
    }

    /// The JSON frame with `"sequenceId":seq` spliced in before the closing brace.
    pub(crate) fn json_with_sequence(&self, seq: u64) -> Utf8Bytes {
        let body = self.json.as_str();
        let head = body.strip_suffix('}').unwrap_or(body);
        let mut out = String::with_capacity(body.len() + 36);
        out.push_str(head);
        out.push_str(",\"sequenceId\":");
        out.push_str(&seq.to_string());
        out.push('}');
        Utf8Bytes::from(out)
    }

    /// The raw frame for clients without a subprotocol.
    pub(crate) fn raw(&self) -> Message {
        self.raw.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_spliced_into_valid_json() {
        let p = Publication::group("g", Some("u"), &Payload::Text("hi \"x\"".into()));
        let s = p.json_with_sequence(42);
        let v: serde_json::Value = serde_json::from_str(s.as_str()).unwrap();
        assert_eq!(v["sequenceId"], 42);
        assert_eq!(v["data"], "hi \"x\"");
        assert_eq!(v["fromUserId"], "u");
    }

    #[test]
    fn frame_payloads_decode_by_data_type() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert!(
            matches!(Payload::from_frame("text", &raw("\"a\"")), Ok(Payload::Text(t)) if t == "a")
        );
        assert!(Payload::from_frame("text", &raw("1")).is_err());
        assert!(
            matches!(Payload::from_frame("binary", &raw("\"AQI=\"")), Ok(Payload::Binary(b)) if b[..] == [1, 2])
        );
        assert!(Payload::from_frame("binary", &raw("\"!!\"")).is_err());
        assert!(Payload::from_frame("xml", &raw("\"a\"")).is_err());
        assert!(Payload::from_http(Some("application/json"), Bytes::from_static(b"{")).is_err());
    }
}
