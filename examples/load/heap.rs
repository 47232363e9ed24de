//! Live heap of this process, counted by the global allocator: a
//! noise-free figure for what each held connection costs the server
//! (`load idle` asks its server child for it; see `docs/performance.md`).
//!
//! The system allocator wrapped by `stats_alloc`: every allocation and
//! free is a few atomic adds, so the figure is exact (the bytes asked
//! for, and the blocks), where RSS moves by pages and with the
//! allocator's caches.

use stats_alloc::INSTRUMENTED_SYSTEM;

/// The live heap now: `bytes blocks`.
pub fn report() -> String {
    let s = INSTRUMENTED_SYSTEM.stats();
    let bytes = s.bytes_allocated as i64 - s.bytes_deallocated as i64;
    let blocks = s.allocations as i64 - s.deallocations as i64;
    format!("{bytes} {blocks}")
}

/// Answers `heap` lines on stdin with `heap <report>` on stdout, from a
/// thread of its own (the server's runtime is not involved).
pub fn serve_stdin() {
    std::thread::spawn(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.trim() == "heap" {
                println!("heap {}", report());
            }
            line.clear();
        }
    });
}

/// A [`report`] as read back by the parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heap {
    pub bytes: i64,
    pub blocks: i64,
}

impl Heap {
    pub fn parse(line: &str) -> Option<Heap> {
        let mut it = line.split_whitespace();
        Some(Heap { bytes: it.next()?.parse().ok()?, blocks: it.next()?.parse().ok()? })
    }
}
