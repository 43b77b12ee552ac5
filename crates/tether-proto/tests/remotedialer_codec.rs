//! The remotedialer framing: golden byte sequences captured from a Go server, round trips,
//! Go's read limits and hostile input.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_proto::ProtoErrorKind;
use tether_proto::remotedialer::{
    Decoded, MAX_CONNECT_LEN, MAX_ERROR_LEN, RdLimits, RdMessage, decode, encode, encode_to_bytes,
    get_signed_varint, put_signed_varint,
};

fn hex(text: &str) -> Vec<u8> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).expect("test hex"))
        .collect()
}

fn with_body(header: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = hex(header);
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn golden_connect_from_go_server() {
    let wire = with_body("d4ebb298d889d99cfb01 04 04 b0ea01", b"tcp/127.0.0.1:7007");
    let decoded = decode(&wire, &RdLimits::default()).expect("decodes");
    assert_eq!(
        decoded.message,
        RdMessage::Connect {
            conn: 2,
            proto: "tcp".into(),
            address: "127.0.0.1:7007".into(),
        }
    );
    // The counter is whatever Go's random start was; re-encoding it gives the same bytes.
    assert_eq!(
        &encode_to_bytes(decoded.id, &decoded.message)[..],
        &wire[..]
    );
}

#[test]
fn golden_data_and_error() {
    let data = with_body("54 04 02 b0ea01", b"pong-from-rawcli");
    let message = RdMessage::Data {
        conn: 2,
        payload: Bytes::from_static(b"pong-from-rawcli"),
    };
    assert_eq!(&encode_to_bytes(42, &message)[..], &data[..]);
    assert_eq!(
        decode(&data, &RdLimits::default()),
        Ok(Decoded { id: 42, message })
    );

    // Error has no deadline field.
    let error = with_body("56 04 06", b"EOF");
    let message = RdMessage::Error {
        conn: 2,
        message: "EOF".into(),
    };
    assert_eq!(&encode_to_bytes(43, &message)[..], &error[..]);
    assert_eq!(
        decode(&error, &RdLimits::default()),
        Ok(Decoded { id: 43, message })
    );
}

#[test]
fn golden_session_messages() {
    // SyncConnections: connID 0, no deadline, little-endian u64 ids.
    let sync = RdMessage::SyncConnections { conns: vec![2, 5] };
    let mut expected = hex("02 00 10");
    expected.extend_from_slice(&2u64.to_le_bytes());
    expected.extend_from_slice(&5u64.to_le_bytes());
    assert_eq!(&encode_to_bytes(1, &sync)[..], &expected[..]);
    // Pause and Resume: header only.
    assert_eq!(
        &encode_to_bytes(1, &RdMessage::Pause { conn: 3 })[..],
        &hex("02 06 0c")[..]
    );
    assert_eq!(
        &encode_to_bytes(1, &RdMessage::Resume { conn: 3 })[..],
        &hex("02 06 0e")[..]
    );
    // 15000 encodes as b0 ea 01.
    let mut deadline = Vec::new();
    put_signed_varint(&mut deadline, 15_000);
    assert_eq!(deadline, hex("b0ea01"));
}

#[test]
fn deadline_is_read_and_discarded() {
    // Any deadline value is accepted on Data and Connect.
    let wire = with_body("54 04 02 00", b"x");
    let decoded = decode(&wire, &RdLimits::default()).expect("decodes");
    assert_eq!(
        decoded.message,
        RdMessage::Data {
            conn: 2,
            payload: Bytes::from_static(b"x"),
        }
    );
}

#[test]
fn read_limits_follow_go() {
    // Error text: Go reads at most 100 bytes.
    let long = "e".repeat(300);
    let wire = with_body("02 04 06", long.as_bytes());
    match decode(&wire, &RdLimits::default())
        .expect("decodes")
        .message
    {
        RdMessage::Error { message, .. } => assert_eq!(message.len(), MAX_ERROR_LEN),
        other => panic!("unexpected {other:?}"),
    }
    // Encoding cuts an error on a character boundary.
    let wide = "é".repeat(80);
    let bytes = encode_to_bytes(1, &RdMessage::error(2, &wide));
    let decoded = decode(&bytes, &RdLimits::default()).expect("decodes");
    match decoded.message {
        RdMessage::Error { message, .. } => {
            assert!(message.len() <= MAX_ERROR_LEN);
            assert!(message.chars().all(|c| c == 'é'));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Connect: at most 266 bytes; longer is refused with the connection id.
    let address = format!("{}:1", "h".repeat(MAX_CONNECT_LEN));
    let wire = with_body("02 0a 04 b0ea01", format!("tcp/{address}").as_bytes());
    let err = decode(&wire, &RdLimits::default()).expect_err("too long");
    assert_eq!(err.stream, Some(5));
    assert!(matches!(err.kind, ProtoErrorKind::TooLarge { .. }));
    // Data above the configured limit.
    let wire = with_body("02 04 02 b0ea01", &[0u8; 11]);
    let err = decode(&wire, &RdLimits { max_data: 10 }).expect_err("too large");
    assert_eq!(err.stream, Some(2));
}

#[test]
fn malformed_messages_name_their_connection() {
    let no_slash = with_body("02 04 04 b0ea01", b"tcp127.0.0.1:1");
    let err = decode(&no_slash, &RdLimits::default()).expect_err("no slash");
    assert_eq!(err.stream, Some(2));
    let bad_sync = with_body("02 00 10", &[1, 2, 3]);
    assert!(decode(&bad_sync, &RdLimits::default()).is_err());
    assert!(decode(&[], &RdLimits::default()).is_err());
    assert!(decode(&hex("02 04"), &RdLimits::default()).is_err());
    assert!(decode(&[0xff; 11], &RdLimits::default()).is_err());
    // A negative connection id is refused.
    assert!(decode(&hex("02 01 02 b0ea01"), &RdLimits::default()).is_err());
}

#[test]
fn unknown_types_are_kept_for_ignoring() {
    let wire = hex("02 04 12");
    assert_eq!(
        decode(&wire, &RdLimits::default())
            .expect("decodes")
            .message,
        RdMessage::Unknown {
            msg_type: 9,
            conn: 2
        }
    );
}

fn arb_message() -> impl Strategy<Value = RdMessage> {
    let conn = prop_oneof![1u64..=300, 1u64..=(i64::MAX as u64)];
    let text = "[ -~]{0,100}";
    prop_oneof![
        (
            conn.clone(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(conn, payload)| RdMessage::Data {
                conn,
                payload: Bytes::from(payload),
            }),
        (conn.clone(), "[a-z]{1,5}", "[ -~]{0,200}").prop_map(|(conn, proto, address)| {
            RdMessage::Connect {
                conn,
                proto,
                address,
            }
        }),
        (conn.clone(), text).prop_map(|(conn, message)| RdMessage::Error { conn, message }),
        "[ -~]{0,100}".prop_map(|key| RdMessage::AddClient { key }),
        "[ -~]{0,100}".prop_map(|key| RdMessage::RemoveClient { key }),
        conn.clone().prop_map(|conn| RdMessage::Pause { conn }),
        conn.clone().prop_map(|conn| RdMessage::Resume { conn }),
        proptest::collection::vec(any::<u64>(), 0..50)
            .prop_map(|conns| RdMessage::SyncConnections { conns }),
        (9i64..=1000, conn).prop_map(|(msg_type, conn)| RdMessage::Unknown { msg_type, conn }),
    ]
}

proptest! {
    #[test]
    fn signed_varints_round_trip(value in any::<i64>()) {
        let mut buf = Vec::new();
        put_signed_varint(&mut buf, value);
        prop_assert_eq!(get_signed_varint(&buf), Ok((value, buf.len())));
    }

    #[test]
    fn messages_round_trip(id in any::<i64>(), message in arb_message()) {
        let mut buf = BytesMut::new();
        encode(id, &message, &mut buf);
        let decoded = decode(&buf, &RdLimits::default());
        prop_assert_eq!(decoded, Ok(Decoded { id, message }));
    }

    #[test]
    fn hostile_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &RdLimits { max_data: 64 });
    }
}
