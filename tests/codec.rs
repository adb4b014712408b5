//! The JSON codec against every example frame of the protocol reference, malformed
//! input, unknown frames, and property-based round trips.

use bytes::Bytes;
use proptest::prelude::*;
use webpubsub_client::protocol::json;
use webpubsub_client::protocol::json::{
    decode_downstream, decode_upstream, encode_downstream, encode_upstream, validate_payload,
};
use webpubsub_client::protocol::{Data, DataType, Downstream, ErrorDetail, Upstream};

fn down(s: &str) -> Downstream {
    decode_downstream(&Bytes::copy_from_slice(s.as_bytes())).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn down_err(s: &[u8]) -> String {
    match decode_downstream(&Bytes::copy_from_slice(s)) {
        Ok(frame) => panic!(
            "{} decoded as {frame:?}",
            String::from_utf8_lossy(&s[..s.len().min(200)])
        ),
        Err(e) => e.to_string(),
    }
}

fn text(s: &str) -> Data {
    Data::new(DataType::Text, s.as_bytes().to_vec())
}

fn json(s: &str) -> Data {
    Data::new(DataType::Json, s.as_bytes().to_vec())
}

#[test]
fn upstream_examples_encode_exactly() {
    let cases = [
        (
            Upstream::JoinGroup {
                group: "g".into(),
                ack_id: Some(1),
            },
            r#"{"type":"joinGroup","group":"g","ackId":1}"#,
        ),
        (
            Upstream::LeaveGroup {
                group: "g".into(),
                ack_id: Some(2),
            },
            r#"{"type":"leaveGroup","group":"g","ackId":2}"#,
        ),
        (
            Upstream::SendToGroup {
                group: "g".into(),
                ack_id: Some(3),
                no_echo: false,
                data: text("hi"),
            },
            r#"{"type":"sendToGroup","group":"g","ackId":3,"noEcho":false,"dataType":"text","data":"hi"}"#,
        ),
        (
            Upstream::Event {
                event: "name".into(),
                ack_id: Some(4),
                data: json(r#"{"a":[1,true,null]}"#),
            },
            r#"{"type":"event","event":"name","ackId":4,"dataType":"json","data":{"a":[1,true,null]}}"#,
        ),
        (
            Upstream::Invoke {
                invocation_id: "id".into(),
                event: "name".into(),
                data: text("x"),
            },
            r#"{"type":"invoke","invocationId":"id","target":"event","event":"name","dataType":"text","data":"x"}"#,
        ),
        (
            Upstream::CancelInvocation {
                invocation_id: "id".into(),
            },
            r#"{"type":"cancelInvocation","invocationId":"id"}"#,
        ),
        (
            Upstream::SequenceAck { sequence_id: 42 },
            r#"{"type":"sequenceAck","sequenceId":42}"#,
        ),
        (Upstream::Ping, r#"{"type":"ping"}"#),
        (
            Upstream::JoinGroup {
                group: "g".into(),
                ack_id: None,
            },
            r#"{"type":"joinGroup","group":"g"}"#,
        ),
        (
            Upstream::SendToGroup {
                group: "g".into(),
                ack_id: None,
                no_echo: true,
                data: Data::new(DataType::Binary, vec![0u8, 1, 2, 255]),
            },
            r#"{"type":"sendToGroup","group":"g","noEcho":true,"dataType":"binary","data":"AAEC/w=="}"#,
        ),
        (
            Upstream::Event {
                event: "e".into(),
                ack_id: None,
                data: Data::new(DataType::Protobuf, b"pb".to_vec()),
            },
            r#"{"type":"event","event":"e","dataType":"protobuf","data":"cGI="}"#,
        ),
    ];
    for (frame, expected) in cases {
        assert_eq!(encode_upstream(&frame), expected);
        assert_eq!(
            decode_upstream(&Bytes::from(expected)).unwrap(),
            frame,
            "{expected}"
        );
    }
}

#[test]
fn strings_are_escaped() {
    let frame = Upstream::SendToGroup {
        group: "a\"b\\c".into(),
        ack_id: None,
        no_echo: false,
        data: text("line\nnext\ttab\u{1}\u{7f}é😀"),
    };
    let encoded = encode_upstream(&frame);
    assert!(encoded.contains(r#""group":"a\"b\\c""#), "{encoded}");
    assert!(
        encoded.contains(r#""data":"line\nnext\ttab\u0001"#),
        "{encoded}"
    );
    let value: serde_json::Value = serde_json::from_str(&encoded).unwrap();
    assert_eq!(value["data"], "line\nnext\ttab\u{1}\u{7f}é😀");
    assert_eq!(decode_upstream(&Bytes::from(encoded)).unwrap(), frame);
}

#[test]
fn acks_of_every_kind() {
    assert_eq!(
        down(r#"{"type":"ack","ackId":1,"success":true}"#),
        Downstream::Ack {
            ack_id: 1,
            success: true,
            error: None
        }
    );
    for name in [
        "Forbidden",
        "InternalServerError",
        "Duplicate",
        "BadRequest",
        "SomethingNew",
    ] {
        let frame = format!(
            r#"{{"type":"ack","ackId":7,"success":false,"error":{{"name":"{name}","message":"m"}}}}"#
        );
        assert_eq!(
            down(&frame),
            Downstream::Ack {
                ack_id: 7,
                success: false,
                error: Some(ErrorDetail {
                    name: name.into(),
                    message: "m".into()
                })
            }
        );
    }
    assert_eq!(
        down(r#"{"type":"ack","ackId":2,"success":false,"error":{"name":"Forbidden"}}"#),
        Downstream::Ack {
            ack_id: 2,
            success: false,
            error: Some(ErrorDetail {
                name: "Forbidden".into(),
                message: String::new()
            })
        }
    );
}

#[test]
fn group_and_server_messages() {
    assert_eq!(
        down(
            r#"{"type":"message","from":"group","group":"g","fromUserId":"u","dataType":"text","data":"hi","sequenceId":7}"#
        ),
        Downstream::GroupMessage {
            group: "g".into(),
            from_user_id: Some("u".into()),
            data: text("hi"),
            sequence_id: Some(7)
        }
    );
    assert_eq!(
        down(
            r#"{"type":"message","from":"server","dataType":"json","data":{"Hello":"World"},"sequenceId":8}"#
        ),
        Downstream::ServerMessage {
            data: json(r#"{"Hello":"World"}"#),
            sequence_id: Some(8)
        }
    );
    assert_eq!(
        down(
            r#"{ "type": "message", "from": "server", "dataType" : "text", "data": "Hello World" }"#
        ),
        Downstream::ServerMessage {
            data: text("Hello World"),
            sequence_id: None
        }
    );
    assert_eq!(
        down(r#"{"type":"message","from":"server","dataType":"json","data":"Hello World"}"#),
        Downstream::ServerMessage {
            data: json(r#""Hello World""#),
            sequence_id: None
        }
    );
    assert_eq!(
        down(r#"{"type":"message","from":"server","dataType":"binary","data":"AAEC/w=="}"#),
        Downstream::ServerMessage {
            data: Data::new(DataType::Binary, vec![0u8, 1, 2, 255]),
            sequence_id: None
        }
    );
    assert_eq!(
        down(
            r#"{"type":"message","from":"group","group":"g","dataType":"json","data":{},"fromUserId":"abc"}"#
        ),
        Downstream::GroupMessage {
            group: "g".into(),
            from_user_id: Some("abc".into()),
            data: json("{}"),
            sequence_id: None
        }
    );
    assert_eq!(
        down(
            r#"{"type":"message","from":"group","group":"g","fromUserId":null,"dataType":"protobuf","data":"cGI="}"#
        ),
        Downstream::GroupMessage {
            group: "g".into(),
            from_user_id: None,
            data: Data::new(DataType::Protobuf, b"pb".to_vec()),
            sequence_id: None
        }
    );
}

/// Valid JSON that UTF-8 cannot carry: a JavaScript sender that cut a string inside a
/// surrogate pair writes a lone surrogate escape. The message is delivered with U+FFFD in
/// its place (one per lone surrogate), not dropped as a malformed frame; a pair decodes
/// whole.
#[test]
fn lone_surrogate_escapes_become_replacement_characters() {
    assert_eq!(
        down(
            r#"{"type":"message","from":"group","group":"g\udfff","fromUserId":"\ud800u","dataType":"text","data":"a\ud800b\ud83d\ude00c\udc00","sequenceId":7}"#
        ),
        Downstream::GroupMessage {
            group: "g\u{fffd}".into(),
            from_user_id: Some("\u{fffd}u".into()),
            data: text("a\u{fffd}b\u{1f600}c\u{fffd}"),
            sequence_id: Some(7)
        }
    );
    assert_eq!(
        down(r#"{"type":"message","from":"server","dataType":"text","data":"\ud83d"}"#),
        Downstream::ServerMessage {
            data: text("\u{fffd}"),
            sequence_id: None
        }
    );
    // JSON data is passed as written: the escape is the receiver's to read.
    assert_eq!(
        down(r#"{"type":"message","from":"server","dataType":"json","data":"\ud800"}"#),
        Downstream::ServerMessage {
            data: json(r#""\ud800""#),
            sequence_id: None
        }
    );
    // An escape that is not JSON still fails the frame.
    assert!(
        !down_err(br#"{"type":"message","from":"server","dataType":"text","data":"\ud80"}"#)
            .is_empty()
    );
}

#[test]
fn invoke_responses() {
    assert_eq!(
        down(
            r#"{"type":"invokeResponse","invocationId":"id","success":true,"dataType":"text","data":"x"}"#
        ),
        Downstream::InvokeResponse {
            invocation_id: "id".into(),
            success: true,
            data: Some(text("x")),
            error: None
        }
    );
    assert_eq!(
        down(
            r#"{"type":"invokeResponse","invocationId":"id","success":false,"error":{"name":"Timeout","message":"no"}}"#
        ),
        Downstream::InvokeResponse {
            invocation_id: "id".into(),
            success: false,
            data: None,
            error: Some(ErrorDetail {
                name: "Timeout".into(),
                message: "no".into()
            })
        }
    );
}

#[test]
fn system_frames_and_pong() {
    assert_eq!(
        down(
            r#"{"type":"system","event":"connected","userId":"u","connectionId":"c","reconnectionToken":"t"}"#
        ),
        Downstream::Connected {
            connection_id: "c".into(),
            user_id: Some("u".into()),
            reconnection_token: Some("t".into())
        }
    );
    assert_eq!(
        down(
            r#"{"type":"system","event":"connected","userId":null,"connectionId":"abcdefghijklmnop"}"#
        ),
        Downstream::Connected {
            connection_id: "abcdefghijklmnop".into(),
            user_id: None,
            reconnection_token: None
        }
    );
    assert_eq!(
        down(r#"{"type":"system","event":"disconnected","message":"reason"}"#),
        Downstream::Disconnected {
            message: Some("reason".into())
        }
    );
    assert_eq!(down(r#"{"type":"pong"}"#), Downstream::Pong);
}

#[test]
fn unknown_frames_are_reported_not_failed() {
    assert_eq!(
        down(r#"{"type":"groupState","group":{"weird":[1,2]},"ackId":"not a number"}"#),
        Downstream::Unknown {
            kind: "groupState".into()
        }
    );
    assert_eq!(
        down(r#"{"type":"message","from":"stream","data":1}"#),
        Downstream::Unknown {
            kind: "message".into()
        }
    );
    assert_eq!(
        down(r#"{"type":"system","event":"later"}"#),
        Downstream::Unknown {
            kind: "system".into()
        }
    );
    assert_eq!(
        down(r#"{"type":"ack","ackId":1,"success":true,"newField":{"x":[]}}"#).sequence_id(),
        None
    );
    assert!(decode_upstream(&Bytes::from_static(br#"{"type":"shout"}"#)).is_err());
}

#[test]
fn malformed_frames_are_errors() {
    let cases: &[&[u8]] = &[
        b"",
        b"not json",
        b"[1,2]",
        b"\"ack\"",
        b"{}",
        br#"{"type":1}"#,
        br#"{"type":"ack","success":true}"#,
        br#"{"type":"ack","ackId":-1,"success":true}"#,
        br#"{"type":"ack","ackId":"1","success":true}"#,
        br#"{"type":"ack","ackId":1}"#,
        br#"{"type":"ack","ackId":1,"success":false,"error":"x"}"#,
        br#"{"type":"ack","ackId":1,"ackId":2,"success":true}"#,
        br#"{"type":"message","from":"group","dataType":"text","data":"hi"}"#,
        br#"{"type":"message","from":"server","dataType":"xml","data":"hi"}"#,
        br#"{"type":"message","from":"server","data":"hi"}"#,
        br#"{"type":"message","from":"server","dataType":"text","data":5}"#,
        br#"{"type":"message","from":"server","dataType":"text"}"#,
        br#"{"type":"message","from":"server","dataType":"binary","data":"***"}"#,
        br#"{"type":"message","from":"server","dataType":"json","data":{"a":1},"sequenceId":1.5}"#,
        br#"{"type":"system","event":"connected"}"#,
        br#"{"type":"invokeResponse","success":true}"#,
        b"{\"type\":\"pong\"\xff}",
        br#"{ "type": "pong", }"#,
        br#"{"type":"pong"} trailing"#,
    ];
    for case in cases {
        let error = down_err(case);
        assert!(!error.is_empty());
    }
}

#[test]
fn deep_nesting_neither_overflows_nor_panics() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let unknown = format!(r#"{{"type":"x","data":{nested}}}"#);
    let frame = decode_downstream(&Bytes::from(unknown));
    assert!(matches!(frame, Ok(Downstream::Unknown { .. })));
    let message =
        format!(r#"{{"type":"message","from":"server","dataType":"json","data":{nested}}}"#);
    let frame = decode_downstream(&Bytes::from(message));
    assert!(
        matches!(frame, Ok(Downstream::ServerMessage { data, .. }) if data.bytes.len() == 200_000)
    );
    let deep_type = format!(r#"{{"x":{nested},"type":"ack"}}"#);
    assert!(decode_downstream(&Bytes::from(deep_type)).is_err());
}

#[test]
fn payloads_are_sliced_without_copy() {
    let frame = Bytes::from_static(
        br#"{"type":"message","from":"group","group":"g","dataType":"text","data":"a long enough payload","sequenceId":1}"#,
    );
    let Downstream::GroupMessage { data, .. } = decode_downstream(&frame).unwrap() else {
        panic!()
    };
    let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
    assert!(range.contains(&(data.bytes.as_ptr() as usize)));
    assert_eq!(&data.bytes[..], b"a long enough payload");

    let escaped = Bytes::from_static(
        br#"{"type":"message","from":"server","dataType":"text","data":"a\"b\u00e9\ud83d\ude00"}"#,
    );
    let Downstream::ServerMessage { data, .. } = decode_downstream(&escaped).unwrap() else {
        panic!()
    };
    assert_eq!(std::str::from_utf8(&data.bytes).unwrap(), "a\"bé😀");
}

#[test]
fn payload_validation() {
    assert!(validate_payload(&text("ok")).is_ok());
    assert!(validate_payload(&Data::new(DataType::Text, vec![0xff, 0xfe])).is_err());
    assert!(validate_payload(&json(r#"{"a":1}"#)).is_ok());
    assert!(validate_payload(&json("42")).is_ok());
    assert!(validate_payload(&json("")).is_err());
    assert!(validate_payload(&json("{")).is_err());
    assert!(validate_payload(&json("1 2")).is_err());
    assert!(validate_payload(&Data::new(DataType::Binary, vec![0xff])).is_ok());
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        any::<String>().prop_map(|s| Data::new(DataType::Text, s.into_bytes())),
        json_value().prop_map(|v| Data::new(DataType::Json, serde_json::to_vec(&v).unwrap())),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Data::new(DataType::Binary, b)),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Data::new(DataType::Protobuf, b)),
    ]
}

fn error_detail() -> impl Strategy<Value = ErrorDetail> {
    (any::<String>(), any::<String>()).prop_map(|(name, message)| ErrorDetail { name, message })
}

fn upstream() -> impl Strategy<Value = Upstream> {
    let s = any::<String>;
    prop_oneof![
        (s(), any::<Option<u64>>())
            .prop_map(|(group, ack_id)| Upstream::JoinGroup { group, ack_id }),
        (s(), any::<Option<u64>>())
            .prop_map(|(group, ack_id)| Upstream::LeaveGroup { group, ack_id }),
        (s(), any::<Option<u64>>(), any::<bool>(), data()).prop_map(
            |(group, ack_id, no_echo, data)| Upstream::SendToGroup {
                group,
                ack_id,
                no_echo,
                data
            }
        ),
        (s(), any::<Option<u64>>(), data()).prop_map(|(event, ack_id, data)| Upstream::Event {
            event,
            ack_id,
            data
        }),
        (s(), s(), data()).prop_map(|(invocation_id, event, data)| Upstream::Invoke {
            invocation_id,
            event,
            data
        }),
        s().prop_map(|invocation_id| Upstream::CancelInvocation { invocation_id }),
        any::<u64>().prop_map(|sequence_id| Upstream::SequenceAck { sequence_id }),
        Just(Upstream::Ping),
    ]
}

fn downstream() -> impl Strategy<Value = Downstream> {
    let s = any::<String>;
    prop_oneof![
        (
            any::<u64>(),
            any::<bool>(),
            prop::option::of(error_detail())
        )
            .prop_map(|(ack_id, success, error)| Downstream::Ack {
                ack_id,
                success,
                error
            }),
        (s(), any::<Option<String>>(), data(), any::<Option<u64>>()).prop_map(
            |(group, from_user_id, data, sequence_id)| Downstream::GroupMessage {
                group,
                from_user_id,
                data,
                sequence_id
            }
        ),
        (data(), any::<Option<u64>>())
            .prop_map(|(data, sequence_id)| Downstream::ServerMessage { data, sequence_id }),
        (
            s(),
            any::<bool>(),
            prop::option::of(data()),
            prop::option::of(error_detail())
        )
            .prop_map(
                |(invocation_id, success, data, error)| Downstream::InvokeResponse {
                    invocation_id,
                    success,
                    data,
                    error
                }
            ),
        (s(), any::<Option<String>>(), any::<Option<String>>()).prop_map(
            |(connection_id, user_id, reconnection_token)| Downstream::Connected {
                connection_id,
                user_id,
                reconnection_token
            }
        ),
        any::<Option<String>>().prop_map(|message| Downstream::Disconnected { message }),
        Just(Downstream::Pong),
        "[a-zA-Z]{1,12}"
            .prop_filter("a known type", |k| ![
                "ack",
                "message",
                "invokeResponse",
                "system",
                "pong"
            ]
            .contains(&k.as_str()))
            .prop_map(|kind| Downstream::Unknown { kind }),
    ]
}

proptest! {
    #[test]
    fn upstream_round_trips(frame in upstream()) {
        let encoded = encode_upstream(&frame);
        prop_assert!(serde_json::from_str::<serde_json::Value>(&encoded).is_ok());
        prop_assert_eq!(decode_upstream(&Bytes::from(encoded)).unwrap(), frame);
    }

    #[test]
    fn downstream_round_trips(frame in downstream()) {
        let encoded = encode_downstream(&frame);
        prop_assert!(serde_json::from_str::<serde_json::Value>(&encoded).is_ok());
        prop_assert_eq!(decode_downstream(&Bytes::from(encoded)).unwrap(), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let bytes = Bytes::from(bytes);
        let _ = decode_downstream(&bytes);
        let _ = decode_upstream(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(frame in downstream(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut encoded = encode_downstream(&frame).into_bytes();
        let at = cut.index(encoded.len());
        encoded[at] = byte;
        let _ = decode_downstream(&Bytes::from(encoded.clone()));
        encoded.truncate(at);
        let _ = decode_downstream(&Bytes::from(encoded));
    }
}

#[test]
fn replace_ack_id_rewrites_only_the_frames_own_ack_id() {
    let frame = json::encode_upstream(&Upstream::SendToGroup {
        group: r#"g,"ackId":12"#.into(),
        ack_id: Some(12),
        no_echo: true,
        data: Data {
            data_type: DataType::Json,
            bytes: Bytes::from_static(br#"{"x":1,"ackId":12}"#),
        },
    });
    let renumbered = json::replace_ack_id(&frame, 12, 7).unwrap();
    let expected = json::encode_upstream(&Upstream::SendToGroup {
        group: r#"g,"ackId":12"#.into(),
        ack_id: Some(7),
        no_echo: true,
        data: Data {
            data_type: DataType::Json,
            bytes: Bytes::from_static(br#"{"x":1,"ackId":12}"#),
        },
    });
    assert_eq!(renumbered, expected);
    assert_eq!(json::replace_ack_id(&frame, 1, 7), None);
    assert_eq!(json::replace_ack_id(&frame, 123, 7), None);
    let unacked = json::encode_upstream(&Upstream::Ping);
    assert_eq!(json::replace_ack_id(&unacked, 1, 2), None);
}

#[test]
fn the_compact_ack_fast_path_agrees_with_the_general_parser() {
    assert_eq!(
        down(r#"{"type":"ack","ackId":42,"success":true}"#),
        Downstream::Ack {
            ack_id: 42,
            success: true,
            error: None
        }
    );
    assert_eq!(
        down(r#"{"type":"ack","ackId":18446744073709551615,"success":true}"#),
        Downstream::Ack {
            ack_id: u64::MAX,
            success: true,
            error: None
        }
    );
    down_err(br#"{"type":"ack","ackId":007,"success":true}"#);
    down_err(br#"{"type":"ack","ackId":,"success":true}"#);
    down_err(br#"{"type":"ack","ackId":-1,"success":true}"#);
    down_err(br#"{"type":"ack","ackId":18446744073709551616,"success":true}"#);
}

proptest! {
    #[test]
    fn borrowed_encoders_match_encode_upstream(name in "\\PC*|[\"\\\\\\x00-\\x1f a-z]{0,40}", text in "\\PC*|[\"\\\\\\x00-\\x1f a-z]{0,40}", ack in proptest::option::of(any::<u64>()), no_echo in any::<bool>()) {
        let data = Data { data_type: DataType::Text, bytes: Bytes::from(text.clone()) };
        prop_assert_eq!(
            json::encode_send_to_group(&name, ack, no_echo, data.data_type, &data.bytes).unwrap(),
            encode_upstream(&Upstream::SendToGroup { group: name.clone(), ack_id: ack, no_echo, data: data.clone() })
        );
        prop_assert_eq!(
            json::encode_event(&name, ack, data.data_type, &data.bytes).unwrap(),
            encode_upstream(&Upstream::Event { event: name.clone(), ack_id: ack, data: data.clone() })
        );
        let decoded: serde_json::Value = serde_json::from_str(&json::encode_event(&name, ack, data.data_type, &data.bytes).unwrap()).unwrap();
        prop_assert_eq!(decoded["data"].as_str(), Some(text.as_str()));
        prop_assert_eq!(decoded["event"].as_str(), Some(name.as_str()));
    }
}

#[test]
fn borrowed_encoders_check_the_payload() {
    let bad_text = Data {
        data_type: DataType::Text,
        bytes: Bytes::from_static(b"\xff"),
    };
    assert!(
        json::encode_send_to_group("g", None, false, bad_text.data_type, &bad_text.bytes).is_err()
    );
    let bad_json = Data {
        data_type: DataType::Json,
        bytes: Bytes::from_static(b"{"),
    };
    assert!(json::encode_event("e", Some(1), bad_json.data_type, &bad_json.bytes).is_err());
    let binary = Data {
        data_type: DataType::Binary,
        bytes: Bytes::from_static(b"\xff\x00"),
    };
    assert_eq!(
        json::encode_event("e", Some(1), binary.data_type, &binary.bytes).unwrap(),
        r#"{"type":"event","event":"e","ackId":1,"dataType":"binary","data":"/wA="}"#
    );
}
