//! MessagePack envelope decoder: no panic, re-encode round trip, payload helpers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::envelope(switchboard::protocol::Format::MsgPack, data);
});
