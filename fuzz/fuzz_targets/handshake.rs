//! The WebSocket upgrade request: HTTP head parser, negotiation, query and
//! cookie readers, forwarded-for walk, origin check.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::handshake(data);
});
