//! Reading what this process's metrics recorder holds, for tests that
//! assert a service recorded what it did.
//!
//! Every test of one binary shares the one global recorder, so a test
//! asserts on series only it writes (its own pool's label) or on how much
//! a shared series grew while it ran, never on a shared series' total.

/// The Prometheus text this process would serve on `/metrics` now.
pub fn scrape() -> String {
    let handle = flotilla_telemetry::metrics::install();
    handle.run_upkeep();
    handle.render()
}

/// The value of the sample whose line is `series` (name and labels, as
/// rendered) followed by its value; `None` when there is none.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// [`sample`] of a fresh [`scrape`], 0 when the series is not there yet.
pub fn value(series: &str) -> f64 {
    sample(&scrape(), series).unwrap_or(0.0)
}
