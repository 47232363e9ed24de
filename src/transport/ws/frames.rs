//! Counting the frames a client sends, as their bytes are read and before
//! tungstenite assembles them into messages.
//!
//! tungstenite hides continuation fragments (it hands over whole messages)
//! and has no limit on how many fragments a message may have, so a client
//! could send endless empty continuation frames, or pings, that cost CPU
//! and never count as a message. [`FrameCounter`] parses just the frame
//! headers of the inbound byte stream (skipping payloads, so it costs a few
//! instructions per frame) to:
//!
//! - report how many frames each data message came in
//!   ([`Fragments`], [`Transport::fragments`](crate::transport::Transport::fragments)),
//!   so that the session charges every frame to the connection's rate
//!   limit, continuations included (control frames it sees on their own);
//! - refuse a message made of more than `max_fragments` frames (the
//!   connection is closed with 1009, "message too big").
//!
//! It does not validate frames: tungstenite does, on the same bytes, and
//! closes the connection on anything malformed.

use crate::transport::Fragments;

/// The error a read fails with when a message has too many fragments.
#[derive(Debug, thiserror::Error)]
#[error("message in more than {0} fragments")]
pub(crate) struct TooManyFragments(pub(crate) u32);

/// Frame-header parser over the inbound byte stream. See the module docs.
#[derive(Debug)]
pub(crate) struct FrameCounter {
    /// The header being read: up to 2 + 8 (length) + 4 (mask) bytes.
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// Data frames (first and continuations) of the message in progress.
    fragments: u32,
    max_fragments: u32,
    /// Frames per message, shared with the session.
    counts: Fragments,
}

impl FrameCounter {
    pub(crate) fn new(max_fragments: u32) -> FrameCounter {
        FrameCounter { head: [0; 14], have: 0, skip: 0, fragments: 0, max_fragments, counts: Fragments::new() }
    }

    /// The frames-per-message counts, for the session.
    pub(crate) fn counts(&self) -> Fragments {
        self.counts.clone()
    }

    /// The length of the header being read, once its first two bytes are
    /// in: 2, plus 2 or 8 for an extended length, plus 4 for a mask.
    fn header_len(&self) -> usize {
        let ext = match self.head[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    /// Feeds bytes read from the socket, in order.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TooManyFragments> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            // Header bytes: two, then as many more as those two announce.
            let want = if self.have < 2 { 2 } else { self.header_len() };
            let n = (want - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 2 || self.have < self.header_len() {
                continue;
            }
            self.frame_done()?;
        }
        Ok(())
    }

    /// A whole header is in: count the frame, check the fragments, and skip
    /// its payload.
    fn frame_done(&mut self) -> Result<(), TooManyFragments> {
        let (fin, opcode) = (self.head[0] & 0x80 != 0, self.head[0] & 0x0F);
        self.skip = match self.head[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            len => u64::from(len),
        };
        self.have = 0;
        // Control frames (0x8 and up) may come between fragments and do not
        // end the message.
        if opcode & 0x8 == 0 {
            self.fragments += 1;
            if self.fragments > self.max_fragments {
                return Err(TooManyFragments(self.max_fragments));
            }
            if fin {
                self.counts.message_read(self.fragments);
                self.fragments = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload_len {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0x55, payload_len));
        f
    }

    #[test]
    fn counts_frames_per_message_and_skips_payloads_whatever_the_read_sizes() {
        let mut stream = Vec::new();
        stream.extend(frame(true, 0x1, 5)); // text
        stream.extend(frame(false, 0x2, 200)); // binary, first fragment
        stream.extend(frame(true, 0x9, 0)); // a ping between fragments
        stream.extend(frame(false, 0x0, 0)); // an empty continuation
        stream.extend(frame(true, 0x0, 70_000)); // the last one, 64-bit length
        stream.extend(frame(true, 0xA, 3)); // pong
        for step in [1, 2, 3, 7, 13, 100, 1 << 20] {
            let mut c = FrameCounter::new(3);
            for chunk in stream.chunks(step) {
                c.feed(chunk).unwrap();
            }
            let counts = c.counts();
            assert_eq!([counts.next_message(), counts.next_message(), counts.next_message()], [1, 3, 1]);
            assert_eq!((c.have, c.skip, c.fragments), (0, 0, 0), "read size {step}");
        }
    }

    #[test]
    fn a_message_in_too_many_fragments_is_refused() {
        let mut c = FrameCounter::new(4);
        // Four fragments, pings between: fine, and the next message starts over.
        for _ in 0..2 {
            c.feed(&frame(false, 0x1, 1)).unwrap();
            for _ in 0..2 {
                c.feed(&frame(false, 0x0, 0)).unwrap();
                c.feed(&frame(true, 0x9, 0)).unwrap();
            }
            c.feed(&frame(true, 0x0, 1)).unwrap();
        }
        // A fifth fragment (empty continuations, never finished) is refused.
        c.feed(&frame(false, 0x2, 0)).unwrap();
        for _ in 0..3 {
            c.feed(&frame(false, 0x0, 0)).unwrap();
        }
        assert!(c.feed(&frame(false, 0x0, 0)).is_err());
    }
}
