//! Live heap of this process, counted by the global allocator: a
//! noise-free figure for what each held connection costs the server
//! (`load idle` asks its server child for it; see `docs/performance.md`).
//!
//! The system allocator wrapped by `stats_alloc`: every allocation and
//! free is a few atomic adds on counters shared by every thread, so the
//! figure is exact (the bytes asked for, and the blocks), where RSS moves
//! by pages and with the allocator's caches. Those shared atomics cost the
//! server about a tenth more CPU per delivery in a fan-out run (measured:
//! 0.185 against 0.1675 s per million deliveries, 1,000 subscribers,
//! unpaced), so the counting allocator is only in builds made with
//! `RUSTFLAGS="--cfg load_heap"`; other builds report the heap as `NaN`.

#[cfg(load_heap)]
use stats_alloc::INSTRUMENTED_SYSTEM;

/// The live heap now: `bytes blocks`.
#[cfg(not(load_heap))]
pub fn report() -> String {
    "off".to_owned()
}

/// The live heap now: `bytes blocks`.
#[cfg(load_heap)]
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
    /// `None`: the server was built without the counting allocator.
    pub counted: Option<(i64, i64)>,
}

impl Heap {
    pub fn parse(line: &str) -> Option<Heap> {
        if line.trim() == "off" {
            return Some(Heap { counted: None });
        }
        let mut it = line.split_whitespace();
        Some(Heap { counted: Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?)) })
    }

    /// Bytes and blocks per connection grown from `before` to `self` over
    /// `n` connections (NaN when not counted).
    pub fn per_connection(&self, before: &Heap, n: usize) -> (f64, f64) {
        match (self.counted, before.counted) {
            (Some((b1, k1)), Some((b0, k0))) => ((b1 - b0) as f64 / n as f64, (k1 - k0) as f64 / n as f64),
            _ => (f64::NAN, f64::NAN),
        }
    }
}
