//! The backplane's room-message layout: no panic, re-encode round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::backplane_message(data);
});
