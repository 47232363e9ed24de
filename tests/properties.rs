//! Property tests of the envelope codecs (proptest): encode → decode is the
//! identity for every envelope, in both formats; decoding arbitrary bytes
//! never panics; payloads survive a trip through the other format.
//!
//! The cargo-fuzz targets in `fuzz/` explore the decoders far longer; these
//! run on every `cargo test`.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use switchboard::protocol::{Envelope, Format, Kind, Payload, Version};

const KINDS: [Kind; 12] = [
    Kind::Gap,
    Kind::Hello,
    Kind::Join,
    Kind::Leave,
    Kind::Call,
    Kind::Reply,
    Kind::Error,
    Kind::Event,
    Kind::Ping,
    Kind::Pong,
    Kind::Lagged,
    Kind::Refresh,
];

/// Any JSON value, nested a few levels (finite numbers only: JSON has no
/// NaN or infinity).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn envelope(format: Format) -> impl Strategy<Value = Envelope> {
    (
        prop::sample::select(KINDS.to_vec()),
        any::<Option<u64>>(),
        prop::option::of("\\PC{0,20}"),
        prop::option::of("\\PC{0,20}"),
        any::<Option<u32>>(),
        prop::option::of("\\PC{0,40}"),
        prop::option::of(json_value()),
        (any::<Option<u64>>(), prop::option::of("\\PC{0,20}"), any::<Option<u64>>()),
    )
        .prop_map(move |(kind, reference, room, event, code, message, data, (offset, epoch, rewind))| {
            let mut env = Envelope::new(kind);
            env.reference = reference;
            env.room = room;
            env.event = event;
            env.code = code;
            env.message = message;
            // `null` data is "absent" on the wire, so it is generated as None.
            env.data = data.filter(|d| !d.is_null()).map(|d| Payload::encode(format, &d).unwrap());
            env.offset = offset;
            env.epoch = epoch;
            env.rewind = rewind;
            env
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn json_envelopes_round_trip(env in envelope(Format::Json)) {
        let bytes = env.encode(Format::Json).unwrap();
        prop_assert_eq!(Envelope::decode(Format::Json, &bytes).unwrap(), env);
    }

    #[test]
    fn msgpack_envelopes_round_trip(env in envelope(Format::MsgPack)) {
        let bytes = env.encode(Format::MsgPack).unwrap();
        prop_assert_eq!(Envelope::decode(Format::MsgPack, &bytes).unwrap(), env);
    }

    #[test]
    fn envelopes_survive_the_other_format(env in envelope(Format::Json)) {
        // Encoding in MessagePack transcodes `data`; decoding it back gives
        // the same values.
        let bytes = env.encode(Format::MsgPack).unwrap();
        let back = Envelope::decode(Format::MsgPack, &bytes).unwrap();
        prop_assert_eq!((back.kind, back.reference, &back.room, &back.event), (env.kind, env.reference, &env.room, &env.event));
        prop_assert_eq!((back.code, &back.message), (env.code, &env.message));
        let values = |e: &Envelope| e.data.as_ref().map(|d| d.decode::<Value>().unwrap());
        prop_assert_eq!(values(&back), values(&env));
    }

    #[test]
    fn version_2_events_round_trip_as_arrays(env in envelope(Format::Json), msgpack in any::<bool>()) {
        // What a server sends as an event: room or none, a name, data, an offset or none.
        let format = if msgpack { Format::MsgPack } else { Format::Json };
        let mut event = Envelope::new(Kind::Event).with_event(env.event.clone().unwrap_or_else(|| "e".into()));
        event.room = env.room.clone();
        event.offset = env.offset;
        event.data = env.data.clone();
        let bytes = event.encode_as(format, Version::V2).unwrap();
        prop_assert!(bytes.len() < event.encode(format).unwrap().len());
        let back = Envelope::decode_as(format, Version::V2, &bytes).unwrap();
        prop_assert_eq!((back.kind, &back.room, &back.event, back.offset), (Kind::Event, &event.room, &event.event, event.offset));
        let values = |e: &Envelope| e.data.as_ref().map_or(Value::Null, |d| d.decode::<Value>().unwrap());
        prop_assert_eq!(values(&back), values(&event));
        // Every other message is as in version 1.
        if env.kind != Kind::Event {
            prop_assert_eq!(env.encode_as(format, Version::V2).unwrap(), env.encode(format).unwrap());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let bytes = Bytes::from(bytes);
        for format in [Format::Json, Format::MsgPack] {
            if let Ok(env) = Envelope::decode(format, &bytes) {
                let again = env.encode(format).unwrap();
                prop_assert_eq!(Envelope::decode(format, &again).unwrap(), env);
            }
            let _ = Envelope::decode_as(format, Version::V2, &bytes);
            let _ = Envelope::reference_of(format, &bytes);
        }
    }

    #[test]
    fn depth_check_matches_construction(depth in 0usize..40, limit in 1usize..40) {
        let mut v = Value::from(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        for format in [Format::Json, Format::MsgPack] {
            let p = Payload::encode(format, &v).unwrap();
            prop_assert_eq!(p.exceeds_depth(limit), depth > limit, "{:?} depth {} limit {}", format, depth, limit);
        }
    }
}
