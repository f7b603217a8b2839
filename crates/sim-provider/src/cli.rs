//! The `flotilla-sim` command line: where to listen, the token, and the
//! starting fault set (flags or `SIM_*` environment variables).

use std::net::SocketAddr;

use clap::Parser;

use crate::cloud::SimConfig;
use crate::faults::{Faults, InvalidFaults};

/// A simulated Fly.io Machines API for tests and benchmarks.
#[derive(Debug, Clone, Parser)]
#[command(name = "flotilla-sim", version)]
pub struct SimArgs {
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:4280")]
    pub listen: SocketAddr,
    /// Bearer token every `/v1` call must carry.
    #[arg(long, env = "SIM_TOKEN", default_value = "sim-token")]
    pub token: String,
    /// Region of machines created without one.
    #[arg(long, env = "SIM_DEFAULT_REGION", default_value = "iad")]
    pub default_region: String,
    /// The whole fault set as JSON, as `PUT /_sim/faults` takes it; the
    /// flags below override single knobs of it.
    #[arg(long, env = "SIM_FAULTS")]
    pub faults: Option<String>,
    #[arg(long, env = "SIM_LATENCY_MS")]
    pub latency_ms: Option<u64>,
    #[arg(long, env = "SIM_LATENCY_JITTER_MS")]
    pub latency_jitter_ms: Option<u64>,
    #[arg(long, env = "SIM_RETRY_AFTER_SECS")]
    pub retry_after_secs: Option<u64>,
    #[arg(long, env = "SIM_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,
    #[arg(long, env = "SIM_CREATE_SUCCEEDS_BUT_ERRORS_RATE")]
    pub create_succeeds_but_errors_rate: Option<f64>,
    #[arg(long, env = "SIM_START_FAILS_RATE")]
    pub start_fails_rate: Option<f64>,
    #[arg(long, env = "SIM_DIE_RATE")]
    pub die_rate: Option<f64>,
    /// `MIN,MAX` milliseconds after `started` at which a dying machine stops.
    #[arg(long, env = "SIM_DIE_AFTER_MS", value_delimiter = ',')]
    pub die_after_ms: Option<Vec<u64>>,
    /// How long a create takes before it answers.
    #[arg(long, env = "SIM_CREATE_DELAY_MS")]
    pub create_delay_ms: Option<u64>,
    #[arg(long, env = "SIM_START_DELAY_MS")]
    pub start_delay_ms: Option<u64>,
    #[arg(long, env = "SIM_STOP_DELAY_MS")]
    pub stop_delay_ms: Option<u64>,
    #[arg(long, env = "SIM_DESTROY_DELAY_MS")]
    pub destroy_delay_ms: Option<u64>,
    #[arg(long, env = "SIM_DESTROYED_LINGER_MS")]
    pub destroyed_linger_ms: Option<u64>,
    #[arg(long, env = "SIM_VOLUME_RELEASE_DELAY_MS")]
    pub volume_release_delay_ms: Option<u64>,
    /// Fly's per-machine rate limits (on by default).
    #[arg(long, env = "SIM_RATE_LIMITS", action = clap::ArgAction::Set)]
    pub rate_limits: Option<bool>,
    /// The apps that exist, comma-separated; any other app answers 404.
    #[arg(long, env = "SIM_APPS", value_delimiter = ',', default_value = crate::cloud::DEFAULT_APP)]
    pub apps: Vec<String>,
}

impl SimArgs {
    pub fn config(&self) -> Result<SimConfig, InvalidFaults> {
        let mut faults = match &self.faults {
            Some(json) => serde_json::from_str(json)
                .map_err(|err| InvalidFaults(format!("--faults: {err}")))?,
            None => Faults::default(),
        };
        let overrides = [
            (self.latency_ms, &mut faults.latency_ms),
            (self.latency_jitter_ms, &mut faults.latency_jitter_ms),
            (self.retry_after_secs, &mut faults.retry_after_secs),
            (self.timeout_ms, &mut faults.timeout_ms),
            (self.create_delay_ms, &mut faults.create_delay_ms),
            (self.start_delay_ms, &mut faults.start_delay_ms),
            (self.stop_delay_ms, &mut faults.stop_delay_ms),
            (self.destroy_delay_ms, &mut faults.destroy_delay_ms),
            (self.destroyed_linger_ms, &mut faults.destroyed_linger_ms),
            (
                self.volume_release_delay_ms,
                &mut faults.volume_release_delay_ms,
            ),
        ];
        for (given, knob) in overrides {
            if let Some(value) = given {
                *knob = value;
            }
        }
        let rates = [
            (
                self.create_succeeds_but_errors_rate,
                &mut faults.create_succeeds_but_errors_rate,
            ),
            (self.start_fails_rate, &mut faults.start_fails_rate),
            (self.die_rate, &mut faults.die_rate),
        ];
        for (given, knob) in rates {
            if let Some(value) = given {
                *knob = value;
            }
        }
        if let Some(range) = &self.die_after_ms {
            faults.die_after_ms = <[u64; 2]>::try_from(range.as_slice()).map_err(|_| {
                InvalidFaults("--die-after-ms takes exactly two values: MIN,MAX".to_owned())
            })?;
        }
        if let Some(on) = self.rate_limits {
            faults.rate_limits = on;
        }
        faults.validate()?;
        Ok(SimConfig {
            token: self.token.clone(),
            default_region: self.default_region.clone(),
            faults,
            apps: self.apps.clone(),
            record_requests: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_json_fault_set() {
        let args = SimArgs::parse_from([
            "flotilla-sim",
            "--faults",
            r#"{"start_delay_ms": 5, "die_rate": 0.5}"#,
            "--die-rate",
            "0.25",
            "--die-after-ms",
            "10,20",
        ]);
        let faults = args.config().unwrap().faults;
        assert_eq!(faults.start_delay_ms, 5);
        assert_eq!(faults.die_rate, 0.25);
        assert_eq!(faults.die_after_ms, [10, 20]);
    }

    #[test]
    fn an_out_of_range_rate_flag_is_refused() {
        let args = SimArgs::parse_from(["flotilla-sim", "--start-fails-rate", "2"]);
        assert!(args.config().is_err());
    }
}
