//! The soak's RSS trend (issue 18): the least-squares slope of RSS over a
//! run's samples, and whether it says RSS rises while the churn is steady.
//! Plain functions of the samples, so `tests/soak_trend.rs` includes this
//! file and tests the rule without building the load tool.

/// RSS still grows in the first minutes of churn (buffers, tables and the
/// allocator's arenas reach their working size): the trend is judged on
/// the samples after this many seconds, and only when they span
/// `TREND_SPAN` seconds and number five or more.
const WARM_UP: f64 = 120.0;
const TREND_SPAN: f64 = 480.0;

/// The RSS trend of a run: the slope in KiB a minute and what it says.
pub struct Trend {
    pub slope: f64,
    /// Two standard errors of the slope (the samples swing by a MiB or
    /// two with each burst of churn).
    margin: f64,
    /// `None` when the run is too short to judge (the slope is then over
    /// every sample); else whether RSS is flat: the slope is not above the
    /// bound by more than its margin.
    pub flat: Option<bool>,
    max: f64,
}

/// The RSS trend of `samples` (`(seconds, KiB)`) against `max_kib_per_min`.
pub fn trend(samples: &[(f64, f64)], max_kib_per_min: f64) -> Trend {
    let steady: Vec<(f64, f64)> = samples.iter().copied().filter(|s| s.0 >= WARM_UP).collect();
    let span = steady.last().map_or(0.0, |l| l.0 - steady[0].0);
    if steady.len() >= 5 && span >= TREND_SPAN {
        let slope = slope_kib_per_min(&steady);
        let margin = 2.0 * slope_error(&steady, slope);
        Trend { slope, margin, flat: Some(slope - margin <= max_kib_per_min), max: max_kib_per_min }
    } else {
        Trend { slope: slope_kib_per_min(samples), margin: 0.0, flat: None, max: max_kib_per_min }
    }
}

impl std::fmt::Display for Trend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (slope, margin, max) = (self.slope, self.margin, self.max);
        match self.flat {
            Some(flat) => write!(
                f,
                "slope {slope:+.0} ± {margin:.0} KiB/min after the first {WARM_UP} s: {} --max-slope {max}",
                if flat { "flat, within" } else { "RISING, above" }
            ),
            None => write!(
                f,
                "slope {slope:+.0} KiB/min, not judged (a run of {} min or more is)",
                (WARM_UP + TREND_SPAN) / 60.0
            ),
        }
    }
}

/// The standard error of a least-squares slope, in KiB a minute.
fn slope_error(samples: &[(f64, f64)], slope_per_min: f64) -> f64 {
    let n = samples.len() as f64;
    let (mx, my) = (samples.iter().map(|s| s.0).sum::<f64>() / n, samples.iter().map(|s| s.1).sum::<f64>() / n);
    let b = slope_per_min / 60.0;
    let residuals: f64 = samples.iter().map(|s| (s.1 - my - b * (s.0 - mx)).powi(2)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    (residuals / (n - 2.0) / den).sqrt() * 60.0
}

pub fn slope_kib_per_min(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (samples.iter().map(|s| s.0).sum::<f64>() / n, samples.iter().map(|s| s.1).sum::<f64>() / n);
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}
