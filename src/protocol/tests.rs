use super::*;

fn sample() -> Vec<Envelope> {
    vec![
        Envelope::new(Kind::Ping),
        Envelope::new(Kind::Join)
            .with_ref(1)
            .with_room("lobby")
            .with_data(Payload::encode(Format::Json, &serde_json::json!({"a": 1})).unwrap()),
        Envelope::new(Kind::Call).with_ref(u64::MAX).with_event("say \"hi\"\n").with_room("r/ü"),
        Envelope::error(Some(7), 404, "no handler for event `x`"),
        Envelope::new(Kind::Event)
            .with_room("r")
            .with_event("e")
            .with_data(Payload::encode(Format::Json, &vec![1, 2, 3]).unwrap()),
    ]
}

#[test]
fn round_trip_both_formats() {
    for format in [Format::Json, Format::MsgPack] {
        for env in sample() {
            let bytes = env.encode(format).unwrap();
            let back = Envelope::decode(format, &bytes).unwrap();
            assert_eq!(back.kind, env.kind);
            assert_eq!(back.reference, env.reference);
            assert_eq!(back.room, env.room);
            assert_eq!(back.event, env.event);
            assert_eq!(back.code, env.code);
            assert_eq!(back.message, env.message);
            let a: Option<serde_json::Value> = back.data.map(|d| d.decode().unwrap());
            let b: Option<serde_json::Value> = env.data.map(|d| d.decode().unwrap());
            assert_eq!(a, b);
        }
    }
}

#[test]
fn json_data_is_a_zero_copy_slice() {
    let frame = Bytes::from_static(br#"{"type":"call","ref":3,"event":"x","data":{"k":[1,2]}}"#);
    let env = Envelope::decode(Format::Json, &frame).unwrap();
    let data = env.data.unwrap();
    assert_eq!(data.bytes().as_ref(), br#"{"k":[1,2]}"#);
    assert_eq!(data.bytes().as_ptr(), frame[frame.len() - 12..].as_ptr());
}

#[test]
fn json_errors_are_classified() {
    type Check = fn(&ProtocolError) -> bool;
    let cases: &[(&[u8], Check)] = &[
        (b"{not json", |e| matches!(e, ProtocolError::Malformed(_))),
        (b"[1,2]", |e| matches!(e, ProtocolError::Invalid(_))),
        (br#"{"ref":1}"#, |e| matches!(e, ProtocolError::Invalid(_))),
        (br#"{"type":"frobnicate"}"#, |e| matches!(e, ProtocolError::UnknownType(_))),
        (br#"{"type":"call","ref":"one"}"#, |e| matches!(e, ProtocolError::Invalid(_))),
        (br#"{"type":"call","ref":-1}"#, |e| matches!(e, ProtocolError::Invalid(_))),
    ];
    for (input, check) in cases {
        let err = Envelope::decode(Format::Json, &Bytes::copy_from_slice(input)).unwrap_err();
        assert!(check(&err), "{} -> {err:?}", String::from_utf8_lossy(input));
        assert_eq!(err.code(), ErrorCode::BAD_REQUEST);
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let env = Envelope::decode(Format::Json, &Bytes::from_static(br#"{"type":"ping","future":{"x":1}}"#)).unwrap();
    assert_eq!(env.kind, Kind::Ping);
}

#[test]
fn msgpack_rejects_garbage_without_panicking() {
    let inputs: &[&[u8]] = &[
        &[],
        &[0xc1],
        &[0x81],
        &[0x81, 0xa4, b't', b'y', b'p', b'e'],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0x81, 0xa4, b'd', b'a', b't', b'a', 0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0x93, 1, 2, 3],
        &[0x81, 0x01, 0x02],
    ];
    for input in inputs {
        let err = Envelope::decode(Format::MsgPack, &Bytes::copy_from_slice(input)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BAD_REQUEST, "{input:?}");
    }
}

#[test]
fn msgpack_depth_limit() {
    let mut deep = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'c', b'a', b'l', b'l', 0xa4, b'd', b'a', b't', b'a'];
    deep.extend(std::iter::repeat_n(0x91u8, 10_000));
    deep.push(0xc0);
    let err = Envelope::decode(Format::MsgPack, &Bytes::from(deep)).unwrap_err();
    assert!(err.to_string().contains("nesting"), "{err}");
}

#[test]
fn payload_transcodes_between_formats() {
    let v = serde_json::json!({"name": "ä\"", "n": [1, -2, 3.5, null, true]});
    let j = Payload::encode(Format::Json, &v).unwrap();
    let m = j.to_format(Format::MsgPack).unwrap();
    assert_eq!(m.decode::<serde_json::Value>().unwrap(), v);
    let j2 = m.to_format(Format::Json).unwrap();
    assert_eq!(j2.decode::<serde_json::Value>().unwrap(), v);
}

#[test]
fn close_code_ranges() {
    assert!(CloseCode::GOING_AWAY.should_reconnect());
    assert!(CloseCode::SLOW_CONSUMER.should_reconnect());
    assert!(CloseCode::HEARTBEAT_TIMEOUT.should_reconnect());
    assert!(!CloseCode::NORMAL.should_reconnect());
    assert!(!CloseCode::POLICY.should_reconnect());
    assert!(!CloseCode::KICKED.should_reconnect());
}

#[test]
fn json_depth_limit_and_strings() {
    let ok = format!(r#"{{"type":"call","data":{}"[[[[\"]]]]"{}}}"#, "[".repeat(128), "]".repeat(128));
    assert!(Envelope::decode(Format::Json, &Bytes::from(ok)).is_ok());
    let deep = format!(r#"{{"type":"call","data":{}{}}}"#, "[".repeat(129), "]".repeat(129));
    let err = Envelope::decode(Format::Json, &Bytes::from(deep)).unwrap_err();
    assert!(err.to_string().contains("nesting"), "{err}");
}

#[test]
fn reference_is_recovered_from_refused_frames() {
    let cases: &[(&[u8], Option<u64>)] = &[
        (br#"{"type":"frobnicate","ref":3}"#, Some(3)),
        (br#"{"ref":1}"#, Some(1)),
        (br#"{"type":"call","ref":2,"event":7}"#, Some(2)),
        (br#"{"type":"call","ref":"x"}"#, None),
        (br#"{"type":"call","ref":-1}"#, None),
        (b"{not json", None),
    ];
    for (input, want) in cases {
        assert!(Envelope::decode(Format::Json, &Bytes::copy_from_slice(input)).is_err());
        assert_eq!(Envelope::reference_of(Format::Json, input), *want, "{}", String::from_utf8_lossy(input));
    }
    let unknown = Parts { reference: Some(9), ..Parts::new(Kind::Ping) }.encode(Format::MsgPack);
    let mut bytes = unknown.to_vec();
    // Rename the type "ping" to "pong"-like garbage: "pxng".
    let pos = bytes.windows(4).position(|w| w == b"ping").unwrap();
    bytes[pos + 1] = b'x';
    assert!(Envelope::decode(Format::MsgPack, &Bytes::from(bytes.clone())).is_err());
    assert_eq!(Envelope::reference_of(Format::MsgPack, &bytes), Some(9));
}

#[test]
fn msgpack_duplicate_keys_are_refused() {
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, 2).unwrap();
    for _ in 0..2 {
        rmp::encode::write_str(&mut out, "type").unwrap();
        rmp::encode::write_str(&mut out, "ping").unwrap();
    }
    let err = Envelope::decode(Format::MsgPack, &Bytes::from(out)).unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
}

/// One envelope written field by field in both formats, so that duplicate
/// keys and trailing bytes (which no serializer produces) can be tested.
type Fields<'a> = &'a [(&'a str, serde_json::Value)];

fn both_formats(fields: Fields<'_>, trailing: bool) -> [(Format, Vec<u8>); 2] {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("{}:{v}", serde_json::json!(k))).collect();
    let mut json = format!("{{{}}}", body.join(",")).into_bytes();
    let mut msgpack = Vec::new();
    rmp::encode::write_map_len(&mut msgpack, fields.len() as u32).unwrap();
    for (k, v) in fields {
        rmp::encode::write_str(&mut msgpack, k).unwrap();
        msgpack.extend(rmp_serde::to_vec(v).unwrap());
    }
    if trailing {
        json.extend_from_slice(b" {}");
        msgpack.push(0x80);
    }
    [(Format::Json, json), (Format::MsgPack, msgpack)]
}

#[test]
fn both_formats_keep_the_same_ref_of_a_refused_envelope() {
    use serde_json::json;
    let cases: &[(Fields<'_>, bool, Option<u64>)] = &[
        (&[("type", json!("frobnicate")), ("ref", json!(3))], false, Some(3)),
        // Trailing data after a complete envelope: refused, `ref` kept.
        (&[("type", json!("ping")), ("ref", json!(4))], true, Some(4)),
        // A duplicate key other than `ref`: refused, `ref` kept.
        (&[("type", json!("ping")), ("ref", json!(5)), ("type", json!("ping"))], false, Some(5)),
        // A duplicate `ref`: the first one counts.
        (&[("type", json!("ping")), ("ref", json!(6)), ("ref", json!(7))], false, Some(6)),
        (&[("type", json!("ping")), ("ref", json!("x")), ("ref", json!(7))], false, None),
        // Wrong-typed `ref`, and a wrong-typed field next to a good `ref`.
        (&[("type", json!("call")), ("ref", json!(-1))], false, None),
        (&[("type", json!("call")), ("ref", json!(8)), ("room", json!(1))], false, Some(8)),
    ];
    for (fields, trailing, want) in cases {
        for (format, bytes) in both_formats(fields, *trailing) {
            assert!(Envelope::decode(format, &Bytes::from(bytes.clone())).is_err(), "{format:?} {fields:?}");
            assert_eq!(Envelope::reference_of(format, &bytes), *want, "{format:?} {fields:?} trailing={trailing}");
        }
    }
    // A map cut short after its `ref` keeps it; one cut before it does not.
    for (format, bytes) in both_formats(&[("ref", json!(9)), ("type", json!("ping"))], false) {
        assert_eq!(Envelope::reference_of(format, &bytes[..bytes.len() - 3]), Some(9), "{format:?}");
    }
    for (format, bytes) in both_formats(&[("type", json!("ping")), ("ref", json!(9))], false) {
        assert_eq!(Envelope::reference_of(format, &bytes[..bytes.len() - 4]), None, "{format:?}");
    }
}

#[test]
fn v2_events_are_compact_arrays_and_round_trip() {
    let data = Payload::encode(Format::Json, &serde_json::json!({"seq": 1, "text": "hé"})).unwrap();
    let cases = [
        Envelope::new(Kind::Event).with_room("bench").with_event("pub").with_data(data.clone()),
        Envelope { offset: Some(42), ..Envelope::new(Kind::Event).with_room("r/ü").with_event("say \"hi\"") },
        // Sent to one connection: no room.
        Envelope::new(Kind::Event).with_event("direct").with_data(data.clone()),
    ];
    for format in [Format::Json, Format::MsgPack] {
        for env in &cases {
            let bytes = env.encode_as(format, Version::V2).unwrap();
            let v1 = env.encode(format).unwrap();
            assert!(bytes.len() < v1.len(), "{format:?}: v2 {} bytes, v1 {}", bytes.len(), v1.len());
            let back = Envelope::decode_as(format, Version::V2, &bytes).unwrap();
            assert_eq!(back.kind, Kind::Event);
            assert_eq!(back.room, env.room);
            assert_eq!(back.event, env.event);
            assert_eq!(back.offset, env.offset);
            let got: serde_json::Value = back.data.unwrap().decode().unwrap();
            let want: serde_json::Value = env.data.as_ref().map_or(serde_json::Value::Null, |d| d.decode().unwrap());
            assert_eq!(got, want);
            // A v2 decoder reads v1 objects too; a v1 decoder refuses arrays.
            assert_eq!(Envelope::decode_as(format, Version::V2, &v1).unwrap().event, env.event);
            assert!(Envelope::decode(format, &bytes).is_err());
        }
    }
    let json = cases[0].encode_as(Format::Json, Version::V2).unwrap();
    assert_eq!(&json[..], r#"["bench","pub",{"seq":1,"text":"hé"}]"#.as_bytes());
    let direct = cases[2].encode_as(Format::Json, Version::V2).unwrap();
    assert!(direct.starts_with(br#"[null,"direct","#));
    let offset = cases[1].encode_as(Format::Json, Version::V2).unwrap();
    assert_eq!(&offset[..], r#"["r/ü","say \"hi\"",null,42]"#.as_bytes());
}

#[test]
fn v2_leaves_every_other_envelope_as_in_v1() {
    for format in [Format::Json, Format::MsgPack] {
        for env in sample().into_iter().filter(|e| e.kind != Kind::Event) {
            assert_eq!(env.encode_as(format, Version::V2).unwrap(), env.encode(format).unwrap());
        }
    }
}

#[test]
fn v2_refuses_malformed_event_arrays() {
    for bad in [
        &br#"[]"#[..],
        br#"["room"]"#,
        br#"["room","e"]"#,
        br#"["room",null,1]"#,
        br#"[1,"e",1]"#,
        br#"["room","e",1,-1]"#,
        br#"["room","e",1,2,3]"#,
        br#"["room","e",1"#,
    ] {
        let got = Envelope::decode_as(Format::Json, Version::V2, &Bytes::from_static(bad));
        assert!(got.is_err(), "{} was accepted", String::from_utf8_lossy(bad));
    }
    let deep = format!(r#"["r","e",{}{}]"#, "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert!(Envelope::decode_as(Format::Json, Version::V2, &Bytes::from(deep)).is_err());
    for bad in [&[0x92, 0xa1, b'r', 0xa1, b'e'][..], &[0x93, 0xa1, b'r', 0xc0, 0x01], &[0x93, 0xa1, b'r', 0xa1, b'e']] {
        assert!(Envelope::decode_as(Format::MsgPack, Version::V2, &Bytes::copy_from_slice(bad)).is_err());
    }
}

#[test]
fn subprotocols_name_format_and_version() {
    for format in [Format::Json, Format::MsgPack] {
        for version in [Version::V1, Version::V2] {
            let name = version.subprotocol(format);
            assert_eq!(Format::from_subprotocol(name), Some(format));
            assert_eq!(Version::from_subprotocol(name), Some(version));
        }
    }
    assert_eq!(Version::from_subprotocol("switchboard.v3.json"), None);
    assert_eq!(Format::Json.subprotocol(), SUBPROTOCOL_JSON);
}

#[test]
fn msgpack_payload_of_a_raw_value_is_its_value() {
    // A handler relaying a client's `data` as `Box<RawValue>`: MessagePack
    // members must get the value, not serde_json's private marker struct.
    let raw: Box<serde_json::value::RawValue> = serde_json::from_str(r#"{"seq":5,"k":[1,"x"]}"#).unwrap();
    let want = serde_json::json!({"seq": 5, "k": [1, "x"]});
    let p = Payload::encode(Format::MsgPack, &*raw).unwrap();
    assert_eq!(p.decode::<serde_json::Value>().unwrap(), want);
    assert_eq!(p.bytes()[0], 0x82, "a map of two");
    // Nested too.
    let nested = serde_json::json!({"outer": 1});
    #[derive(serde::Serialize)]
    struct Wrap<'a> {
        inner: &'a serde_json::value::RawValue,
        n: serde_json::Value,
    }
    let p = Payload::encode(Format::MsgPack, &Wrap { inner: &raw, n: nested }).unwrap();
    assert_eq!(p.decode::<serde_json::Value>().unwrap(), serde_json::json!({"inner": want, "n": {"outer": 1}}));
    // Values JSON cannot hold still go straight to MessagePack.
    let map = std::collections::BTreeMap::from([(1u8, "a")]);
    assert!(Payload::encode(Format::MsgPack, &map).is_ok());
}
