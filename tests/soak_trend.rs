//! The rule `load soak` judges RSS by (examples/load/trend.rs): a flat
//! run that swings passes, a leak fails, a short run is not judged.

#[path = "../examples/load/trend.rs"]
mod trend;

use trend::trend;

/// `(seconds, KiB)` every 30 s for `minutes`, rising `kib_per_min`, with
/// a swing of ±1.5 MiB from sample to sample.
fn run(minutes: u32, kib_per_min: f64) -> Vec<(f64, f64)> {
    (1..=minutes * 2)
        .map(|i| {
            let t = f64::from(i) * 30.0;
            let swing = [0.0, 1536.0, -1024.0, 512.0, -1536.0, 1024.0][i as usize % 6];
            (t, 40_000.0 + kib_per_min * t / 60.0 + swing)
        })
        .collect()
}

#[test]
fn a_flat_run_that_swings_passes_and_a_leak_fails() {
    assert_eq!(trend(&run(30, 0.0), 128.0).flat, Some(true));
    assert_eq!(trend(&run(30, 100.0), 128.0).flat, Some(true));
    let leak = trend(&run(30, 512.0), 128.0);
    assert_eq!(leak.flat, Some(false), "{leak}");
    assert!((leak.slope - 512.0).abs() < 64.0, "{leak}");
}

#[test]
fn a_short_run_is_not_judged() {
    let short = trend(&run(5, 5000.0), 128.0);
    assert_eq!(short.flat, None, "{short}");
    assert!(short.to_string().contains("not judged"), "{short}");
}
