//! The pool commands: list, get (with the pool's recent pauses, resumes and
//! probes), create, set, pause, resume, delete.

use clap::{Args, Subcommand};
use flotilla_proto::v1;
use serde_json::Value;

use crate::client::Api;
use crate::error::CliError;
use crate::output::{self, Output};
use crate::parse_label;

#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// List every pool.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show one pool.
    Get {
        name: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create a pool.
    Create(CreateArgs),
    /// Change a pool: its desired capacity (the number of live instances
    /// the scheduler keeps in it, whoever created them), its price or its
    /// spend cap.
    Set(SetArgs),
    /// Resume a paused pool: its failure count is cleared and its waiting
    /// instances get machines again. A pool pauses itself after repeated
    /// provisioning or startup failures (see STATUS in `flotilla pools`).
    Resume {
        name: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Pause a pool: no new machines are created for it (running ones stay,
    /// terminations go on) until `flotilla pools resume`.
    Pause {
        name: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete a pool. Refused while it has live instances, unless --force:
    /// then they are terminated and the pool is deleted once they are gone.
    /// Its name can then be used for a new pool.
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: String,
    /// Delete even though the pool has live instances: their termination
    /// is requested (drained, as `flotilla terminate --pool`), the pool takes
    /// no new instances, and it is deleted once none is left.
    #[arg(long)]
    pub force: bool,
    /// Recorded with the deletion and in each terminated instance's history.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// What `pools delete` says about the api's answer (stderr), beyond the pool.
pub fn delete_notes(name: &str, answer: &v1::DeletePoolResponse) -> Vec<String> {
    if answer.deleted {
        return vec![format!(
            "pool {name} deleted (it had no live instances); its name can be used again"
        )];
    }
    let n = answer.live_instances;
    let mut notes = vec![format!(
        "pool {name} is being deleted: {n} instance{} still live, {} asked to terminate now; \
         it takes no new instances and is deleted once none is left",
        if n == 1 { " is" } else { "s are" },
        answer.terminating_ids.len()
    )];
    notes.push(format!(
        "follow it with `flotilla list --pool {name}`; an instance whose teardown can never \
         finish (its provider gone for good) is given up with `flotilla abandon ID --reason ...`"
    ));
    notes
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// 1-63 chars, [a-z0-9-], starting with a letter.
    pub name: String,
    /// "local", "fly", "scaleway", "docker" or "sim".
    #[arg(long)]
    pub provider: String,
    /// Provider size name ("shared-cpu-1x", "GP1-XS"; anything for local).
    #[arg(long)]
    pub instance_type: String,
    /// Provider region or zone ("ams", "fr-par-1"; anything for local).
    #[arg(long)]
    pub region: String,
    /// Image the machines run; for `local`, the agent command line.
    #[arg(long, default_value = "")]
    pub image: String,
    /// Instances the scheduler keeps in the pool.
    #[arg(long, default_value_t = 0)]
    pub desired: u32,
    /// Data volume per instance in GB; 0 for none.
    #[arg(long, default_value_t = 0)]
    pub volume_size_gb: u32,
    /// Price of one machine per hour in millionths of the billing currency;
    /// 0: the services' INSTANCE_PRICES table prices it.
    #[arg(long, default_value_t = 0)]
    pub price_per_hour_micros: u64,
    /// Where a worker answers when it is up, probed while it boots (any
    /// 2xx means ready); placeholders {machine_id}, {instance_id}, {name},
    /// {private_ip}. Unset: boot progress comes only from the agent.
    #[arg(long, default_value = "")]
    pub health_check_url: String,
    /// Seconds a machine may take to boot (0: the scheduler's default).
    #[arg(long, default_value_t = 0)]
    pub booting_timeout: u32,
    /// Seconds a worker may spend installing (0: the scheduler's default).
    #[arg(long, default_value_t = 0)]
    pub installing_timeout: u32,
    /// Seconds a worker may spend starting (0: the scheduler's default).
    #[arg(long, default_value_t = 0)]
    pub starting_timeout: u32,
    /// Seconds a cordoned worker is waited for before it is stopped anyway
    /// (0: the terminator's default).
    #[arg(long, default_value_t = 0)]
    pub draining_timeout: u32,
    /// Most the pool's live instances may cost per hour, in currency units
    /// (e.g. 12.50); Provision and pool capacity stop at it. 0: no cap.
    #[arg(long, value_parser = parse_spend_cap, default_value = "0")]
    pub spend_cap: u64,
    /// Most instances voluntarily disrupted at once (scale-down, max
    /// lifetime, idle stop): a count ("3") or a percentage ("10%").
    #[arg(long, default_value = "10%")]
    pub disruption_budget: String,
    /// Replace each instance after this long ("24h", "90m", "3600"): its
    /// replacement is ready before it is drained. Unset: never.
    #[arg(long, value_parser = parse_duration_secs, default_value = "0")]
    pub max_lifetime: u32,
    /// Drain and terminate an instance above the desired capacity whose
    /// worker reported idle this long ("5m"). Unset: never.
    #[arg(long, value_parser = parse_duration_secs, default_value = "0")]
    pub idle_timeout: u32,
    /// What idle stop does: terminate, or stop (drain, stop the machine
    /// and return it to the warm stock; see --warm).
    #[arg(long, value_parser = ["terminate", "stop"], default_value = "terminate")]
    pub idle_action: String,
    /// Machines to keep created and stopped, so Provision starts one
    /// instead of creating one (0: none).
    #[arg(long, default_value_t = 0)]
    pub warm: u32,
    /// Pool label (key=value; repeat for more).
    #[arg(long, value_parser = parse_label)]
    pub label: Vec<(String, String)>,
    /// Succeed (showing the existing pool) when a pool of this name exists.
    #[arg(long)]
    pub if_not_exists: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub name: String,
    /// New desired capacity.
    #[arg(long)]
    pub desired: Option<u32>,
    /// New price of one machine per hour, in millionths.
    #[arg(long)]
    pub price_per_hour_micros: Option<u64>,
    /// New spend cap per hour, in currency units (e.g. 12.50); 0 removes
    /// it. Lowering it terminates nothing: new instances wait until the
    /// pool's spend is under it.
    #[arg(long, value_parser = parse_spend_cap)]
    pub spend_cap: Option<u64>,
    /// New disruption budget: a count ("3") or a percentage ("10%").
    #[arg(long)]
    pub disruption_budget: Option<String>,
    /// New max lifetime ("24h"); 0 turns expiry off.
    #[arg(long, value_parser = parse_duration_secs)]
    pub max_lifetime: Option<u32>,
    /// New idle timeout ("5m"); 0 turns idle stop off.
    #[arg(long, value_parser = parse_duration_secs)]
    pub idle_timeout: Option<u32>,
    /// New idle action: terminate or stop.
    #[arg(long, value_parser = ["terminate", "stop"])]
    pub idle_action: Option<String>,
    /// New warm stock size; 0 lets every warm machine go (deleted).
    #[arg(long)]
    pub warm: Option<u32>,
    /// Apply only if the pool is still at this version (from `pools get`).
    #[arg(long, default_value_t = 0)]
    pub expected_version: u64,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// A spend cap given in currency units (`12.50`), as micros.
fn parse_spend_cap(s: &str) -> Result<u64, String> {
    flotilla_core::price::parse_amount(s).map(|m| m.max(0) as u64)
}

/// A duration as seconds: a number with an optional unit (s, m, h, d), or
/// several (`1h30m`); a bare number is seconds.
pub fn parse_duration_secs(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a duration: give e.g. 90s, 5m, 24h, 7d or 1h30m");
    if s.is_empty() {
        return Err(bad());
    }
    let (mut total, mut digits) = (0u64, String::new());
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        digits.clear();
    }
    if !digits.is_empty() {
        total = total.saturating_add(digits.parse::<u64>().map_err(|_| bad())?);
    }
    u32::try_from(total).map_err(|_| bad())
}

fn print_pools(pools: &[v1::Pool], out: Output) {
    match out {
        Output::Table | Output::Wide => {
            print!("{}", output::pools_table(pools, chrono::Utc::now()))
        }
        Output::Json | Output::Yaml => {
            let v = if let [one] = pools {
                output::pool_json(one)
            } else {
                Value::Array(pools.iter().map(output::pool_json).collect())
            };
            println!("{}", output::document(&v, out));
        }
        Output::Ids => pools.iter().for_each(|p| println!("{}", p.name)),
    }
}

async fn get_pool(api: &Api, name: &str) -> Result<v1::Pool, CliError> {
    Ok(api
        .client()
        .get_pool(api.request(v1::GetPoolRequest {
            name: name.to_owned(),
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner())
}

pub async fn run(api: &Api, command: PoolsCommand) -> Result<(), CliError> {
    match command {
        PoolsCommand::List { output } => {
            let pools = api
                .client()
                .list_pools(api.request(v1::ListPoolsRequest {}))
                .await
                .map_err(|s| api.error(s))?
                .into_inner()
                .pools;
            if pools.is_empty() && matches!(output, Output::Table | Output::Wide) {
                eprintln!("no pools; create one with `flotilla pools create`");
                return Ok(());
            }
            // A list in JSON stays a list even with one element.
            if matches!(output, Output::Json | Output::Yaml) {
                let v = Value::Array(pools.iter().map(output::pool_json).collect());
                println!("{}", output::document(&v, output));
            } else {
                print_pools(&pools, output);
            }
        }
        PoolsCommand::Get { name, output } => {
            let pool = get_pool(api, &name).await?;
            match output {
                Output::Table | Output::Wide => {
                    print_pools(std::slice::from_ref(&pool), output);
                    print!("{}", output::pool_events_table(&pool.recent_events));
                }
                Output::Json | Output::Yaml => {
                    let mut v = output::pool_json(&pool);
                    v["recent_events"] = Value::Array(
                        pool.recent_events
                            .iter()
                            .map(output::pool_event_json)
                            .collect(),
                    );
                    println!("{}", output::document(&v, output));
                }
                Output::Ids => print_pools(&[pool], output),
            }
        }
        PoolsCommand::Create(a) => {
            let pool = v1::Pool {
                name: a.name.clone(),
                provider: a.provider,
                instance_type: a.instance_type,
                region: a.region,
                desired_capacity: a.desired,
                labels: a.label.into_iter().collect(),
                image: a.image,
                volume_size_gb: a.volume_size_gb,
                price_per_hour_micros: a.price_per_hour_micros,
                health_check_url: a.health_check_url,
                timeouts: Some(v1::PoolTimeouts {
                    booting_seconds: a.booting_timeout,
                    installing_seconds: a.installing_timeout,
                    starting_seconds: a.starting_timeout,
                    draining_seconds: a.draining_timeout,
                }),
                spend_cap_per_hour_micros: a.spend_cap,
                disruption_budget: a.disruption_budget,
                max_lifetime_seconds: a.max_lifetime,
                idle_timeout_seconds: a.idle_timeout,
                idle_action: a.idle_action,
                warm_size: a.warm,
                ..Default::default()
            };
            let created = api
                .client()
                .create_pool(api.request(v1::CreatePoolRequest { pool: Some(pool) }))
                .await
                .map_err(|s| api.error(s));
            let pool = match created {
                Ok(p) => p.into_inner(),
                Err(CliError::Conflict(_)) if a.if_not_exists => {
                    eprintln!("pool {} exists already", a.name);
                    get_pool(api, &a.name).await?
                }
                Err(e) => return Err(e),
            };
            print_pools(&[pool], a.output);
        }
        PoolsCommand::Set(a) => {
            if a.desired.is_none()
                && a.price_per_hour_micros.is_none()
                && a.spend_cap.is_none()
                && a.disruption_budget.is_none()
                && a.max_lifetime.is_none()
                && a.idle_timeout.is_none()
                && a.idle_action.is_none()
                && a.warm.is_none()
            {
                return Err(CliError::Invalid(
                    "nothing to change: give --desired N, --price-per-hour-micros P, \
                     --spend-cap AMOUNT, --warm N, --disruption-budget N|P%, --max-lifetime D, \
                     --idle-timeout D or --idle-action terminate|stop"
                        .into(),
                ));
            }
            let pool = api
                .client()
                .update_pool(api.request(v1::UpdatePoolRequest {
                    name: a.name,
                    desired_capacity: a.desired,
                    timeouts: None,
                    price_per_hour_micros: a.price_per_hour_micros,
                    spend_cap_per_hour_micros: a.spend_cap,
                    disruption_budget: a.disruption_budget,
                    max_lifetime_seconds: a.max_lifetime,
                    idle_timeout_seconds: a.idle_timeout,
                    idle_action: a.idle_action,
                    warm_size: a.warm,
                    expected_version: a.expected_version,
                    ..Default::default()
                }))
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            print_pools(&[pool], a.output);
        }
        PoolsCommand::Resume { name, output } => {
            let pool = set_paused(api, name, false).await?;
            print_pools(&[pool], output);
        }
        PoolsCommand::Pause { name, output } => {
            let pool = set_paused(api, name, true).await?;
            print_pools(&[pool], output);
        }
        PoolsCommand::Delete(a) => {
            let answer = api
                .client()
                .delete_pool(api.request(v1::DeletePoolRequest {
                    name: a.name.clone(),
                    force: a.force,
                    reason: a.reason,
                }))
                .await
                .map_err(|s| api.error(s))?
                .into_inner();
            for note in delete_notes(&a.name, &answer) {
                eprintln!("{note}");
            }
            match a.output {
                out @ (Output::Json | Output::Yaml) => println!(
                    "{}",
                    output::document(
                        &serde_json::json!({
                        "name": a.name,
                        "deleted": answer.deleted,
                        "live_instances": answer.live_instances,
                        "terminating_ids": answer.terminating_ids,
                        "pool": answer.pool.as_ref().map(output::pool_json),
                        }),
                        out
                    )
                ),
                Output::Ids => answer
                    .terminating_ids
                    .iter()
                    .for_each(|id| println!("{id}")),
                Output::Table | Output::Wide => {
                    if let Some(pool) = &answer.pool {
                        print_pools(std::slice::from_ref(pool), Output::Table);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn set_paused(api: &Api, name: String, paused: bool) -> Result<v1::Pool, CliError> {
    Ok(api
        .client()
        .update_pool(api.request(v1::UpdatePoolRequest {
            name,
            paused: Some(paused),
            ..Default::default()
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::parse_duration_secs;

    #[test]
    fn durations_take_units_and_refuse_anything_else() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("5m"), Ok(300));
        assert_eq!(parse_duration_secs("24h"), Ok(86_400));
        assert_eq!(parse_duration_secs("7d"), Ok(7 * 86_400));
        assert_eq!(parse_duration_secs("1h30m"), Ok(5400));
        assert_eq!(parse_duration_secs("0"), Ok(0));
        for bad in ["", "h", "5 m", "5x", "-5m", "1.5h", "99999999999d"] {
            let e = parse_duration_secs(bad).expect_err(bad);
            assert!(e.contains("is not a duration"), "{e}");
        }
    }
}
