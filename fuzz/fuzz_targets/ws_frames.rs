//! The WebSocket frame reader with permessage-deflate: framing, masking,
//! fragmentation, control frames, close codes, UTF-8, and inflating with a
//! hard cap.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::ws_frames(data);
});
