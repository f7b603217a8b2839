//! The instance commands: provision, list, get, watch, terminate, drain,
//! abandon.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgGroup, Args};
use flotilla_core::InstanceState;
use flotilla_proto::v1;
use serde_json::{Value, json};

use crate::client::Api;
use crate::error::CliError;
use crate::follow::follow;
use crate::output::{self, Output};
use crate::parse_label;
use crate::wait::wait_for;

fn parse_state(s: &str) -> Result<InstanceState, String> {
    InstanceState::from_str(s).map_err(|_| {
        let all: Vec<&str> = InstanceState::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown state {s:?}; one of: {}", all.join(", "))
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["count", "name"])))]
pub struct ProvisionArgs {
    /// Pool the instances join.
    #[arg(long)]
    pub pool: String,
    /// Number of instances.
    #[arg(long)]
    pub count: Option<u32>,
    /// Explicit instance names (repeat, or comma-separated), instead of --count.
    #[arg(long, value_delimiter = ',')]
    pub name: Vec<String>,
    /// Label for every new instance (key=value; repeat for more).
    #[arg(long, value_parser = parse_label)]
    pub label: Vec<(String, String)>,
    /// Retrying with the same key returns the first answer and creates nothing.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Validate and show what would be created; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Return once the api accepted the request, without waiting for `ready`.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for every instance to be ready (or failed).
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn print_instances(instances: &[v1::Instance], out: Output) {
    match out {
        Output::Table => print!("{}", output::instances_table(instances, chrono::Utc::now())),
        Output::Json => print_json(&Value::Array(
            instances.iter().map(output::instance_json).collect(),
        )),
        Output::Ids => instances.iter().for_each(|i| println!("{}", i.id)),
    }
}

pub async fn provision(api: &Api, a: ProvisionArgs) -> Result<(), CliError> {
    let answer = api
        .client()
        .provision(api.request(v1::ProvisionRequest {
            pool: a.pool.clone(),
            count: a.count.unwrap_or(0),
            names: a.name,
            labels: a.label.into_iter().collect(),
            idempotency_key: a.idempotency_key,
            dry_run: a.dry_run,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    let n = answer.instances.len();
    if answer.dry_run {
        eprintln!("dry run: {n} instances would be created in pool {}", a.pool);
        print_instances(&answer.instances, a.output);
        return Ok(());
    }
    eprintln!(
        "{} {n} instance{} in pool {}",
        if answer.replayed {
            "already accepted earlier (same idempotency key):"
        } else {
            "accepted"
        },
        if n == 1 { "" } else { "s" },
        a.pool
    );
    if a.no_wait {
        print_instances(&answer.instances, a.output);
        return Ok(());
    }
    let ids: Vec<String> = answer.instances.iter().map(|i| i.id.clone()).collect();
    let result = wait_for(
        api,
        &a.pool,
        &ids,
        InstanceState::Ready,
        Duration::from_secs(a.wait_timeout),
    )
    .await;
    print_instances(&result?, a.output);
    Ok(())
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Only these states (repeat, or comma-separated), e.g. ready,worker_dead.
    #[arg(long, value_delimiter = ',', value_parser = parse_state)]
    pub state: Vec<InstanceState>,
    /// Only instances carrying this label (key=value; repeat for more).
    #[arg(long, value_parser = parse_label)]
    pub label: Vec<(String, String)>,
    /// Include terminated instances.
    #[arg(long, short = 'a', conflicts_with = "state")]
    pub all: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn list(api: &Api, a: ListArgs) -> Result<(), CliError> {
    let states: Vec<InstanceState> = if !a.state.is_empty() {
        a.state
    } else if a.all {
        Vec::new()
    } else {
        InstanceState::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .collect()
    };
    let states: Vec<i32> = states
        .into_iter()
        .map(|s| v1::InstanceState::from(s) as i32)
        .collect();
    let labels: HashMap<String, String> = a.label.into_iter().collect();
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .client()
            .list_instances(api.request(v1::ListInstancesRequest {
                pool: a.pool.clone().unwrap_or_default(),
                states: states.clone(),
                labels: labels.clone(),
                page_size: 1000,
                page_token,
            }))
            .await
            .map_err(|s| api.error(s))?
            .into_inner();
        all.extend(page.instances);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if all.is_empty() && a.output == Output::Table {
        eprintln!("no instances");
        return Ok(());
    }
    print_instances(&all, a.output);
    Ok(())
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Instance id.
    pub id: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn get(api: &Api, a: GetArgs) -> Result<(), CliError> {
    let instance = api
        .client()
        .get_instance(api.request(v1::GetInstanceRequest { id: a.id.clone() }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    let history = api
        .client()
        .get_instance_history(api.request(v1::GetInstanceHistoryRequest { id: a.id }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner()
        .entries;
    match a.output {
        Output::Table => {
            print!(
                "{}",
                output::instance_details(&instance, chrono::Utc::now())
            );
            println!("\nHISTORY");
            print!("{}", output::history_table(&history));
        }
        Output::Json => print_json(&json!({
            "instance": output::instance_json(&instance),
            "history": history.iter().map(output::history_json).collect::<Vec<_>>(),
        })),
        Output::Ids => println!("{}", instance.id),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this pool's events.
    #[arg(long)]
    pub pool: Option<String>,
    /// Only these instances (repeat, or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub id: Vec<String>,
    /// Replay from this event stream sequence (the SEQ column; each JSON
    /// event carries its `stream_sequence`); 0 means new events only. A lost
    /// stream (the api restarting) is reopened with backoff from the
    /// sequence after the last event shown.
    #[arg(long, default_value_t = 0)]
    pub from_sequence: u64,
    /// `table` prints one line per event, `json` one object per line.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn watch(api: &Api, a: WatchArgs) -> Result<(), CliError> {
    let pool = a.pool.unwrap_or_default();
    let ids = a.id;
    let output = a.output;
    eprintln!("watching instance events (Ctrl-C to stop)");
    if output == Output::Table {
        println!("{}", output::EVENT_HEADER);
    }
    let stopped = follow(
        a.from_sequence,
        |start_sequence| {
            let mut client = api.client();
            let request = api.stream_request(v1::WatchEventsRequest {
                start_sequence,
                pool: pool.clone(),
                instance_ids: ids.clone(),
            });
            async move { Ok(client.watch_events(request).await?.into_inner()) }
        },
        |event| match output {
            Output::Json => println!("{}", output::event_json(event)),
            Output::Ids => println!("{}", event.instance_id),
            Output::Table => println!("{}", output::event_line(event)),
        },
        |notice| eprintln!("{notice}"),
    )
    .await;
    Err(api.error(stopped.0))
}

/// Which instances a terminate or drain is about.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).multiple(true).args(["ids", "pool", "selector"])))]
pub struct Target {
    /// Instance ids.
    #[arg(conflicts_with_all = ["pool", "selector"])]
    pub ids: Vec<String>,
    /// Every instance of this pool (narrowed by --selector when given).
    #[arg(long)]
    pub pool: Option<String>,
    /// Instances carrying these labels (key=value, comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
}

impl Target {
    fn selector(&self) -> v1::InstanceSelector {
        v1::InstanceSelector {
            instance_ids: self.ids.clone(),
            pool: self.pool.clone().unwrap_or_default(),
            labels: self.selector.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    #[command(flatten)]
    pub target: Target,
    /// Skip the drain and use the provider's forced delete.
    #[arg(long)]
    pub force: bool,
    /// Recorded in the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Wait until every accepted instance is terminated.
    #[arg(long)]
    pub wait: bool,
    /// Seconds --wait waits.
    #[arg(long, default_value_t = 300)]
    pub wait_timeout: u64,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints what a terminate or drain did, and fails when ids were unknown.
fn report(
    verb: &str,
    accepted: &[String],
    unchanged: &[String],
    unknown: &[String],
    out: Output,
) -> Result<(), CliError> {
    match out {
        Output::Json => print_json(&json!({
            "accepted_ids": accepted,
            "unchanged_ids": unchanged,
            "unknown_ids": unknown,
        })),
        Output::Ids => accepted.iter().for_each(|id| println!("{id}")),
        Output::Table => {
            let rows: Vec<Vec<String>> = accepted
                .iter()
                .map(|id| vec![id.clone(), verb.to_owned()])
                .chain(
                    unchanged
                        .iter()
                        .map(|id| vec![id.clone(), "unchanged (already on its way)".into()]),
                )
                .chain(unknown.iter().map(|id| vec![id.clone(), "unknown".into()]))
                .collect();
            if rows.is_empty() {
                eprintln!("no instance matched");
            } else {
                print!("{}", output::table(&["ID", "RESULT"], &rows));
            }
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(CliError::NotFound(format!(
            "no such instance: {}; nothing was done for {}",
            unknown.join(", "),
            if unknown.len() == 1 { "it" } else { "them" }
        )))
    }
}

pub async fn terminate(api: &Api, a: TerminateArgs) -> Result<(), CliError> {
    let answer = api
        .client()
        .terminate(api.request(v1::TerminateRequest {
            selector: Some(a.target.selector()),
            force: a.force,
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    report(
        "terminating",
        &answer.accepted_ids,
        &answer.unchanged_ids,
        &answer.unknown_ids,
        a.output,
    )?;
    if a.wait {
        let ids: Vec<String> = answer
            .accepted_ids
            .iter()
            .chain(&answer.unchanged_ids)
            .cloned()
            .collect();
        wait_for(
            api,
            a.target.pool.as_deref().unwrap_or_default(),
            &ids,
            InstanceState::Terminated,
            Duration::from_secs(a.wait_timeout),
        )
        .await?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub target: Target,
    /// Recorded in the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn drain(api: &Api, a: DrainArgs) -> Result<(), CliError> {
    let answer = api
        .client()
        .drain(api.request(v1::DrainRequest {
            selector: Some(a.target.selector()),
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    report(
        "draining",
        &answer.accepted_ids,
        &answer.unchanged_ids,
        &answer.unknown_ids,
        a.output,
    )
}

#[derive(Debug, Args)]
pub struct AbandonArgs {
    /// Instance id.
    pub id: String,
    /// Why the instance is given up (required; kept in its history with
    /// who did it).
    #[arg(long, required = true)]
    pub reason: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// What `abandon` tells the user on stderr: what happened, and the api's
/// warning about what may be left at the provider.
pub fn abandon_notes(answer: &v1::AbandonInstanceResponse) -> Vec<String> {
    let id = answer.instance.as_ref().map_or("", |i| i.id.as_str());
    let mut notes = Vec::new();
    if answer.abandoned {
        notes.push(format!(
            "instance {id} abandoned (was {}): Flotilla will not act on it again",
            output::state_name(answer.from_state)
        ));
    } else {
        let state = answer
            .instance
            .as_ref()
            .map_or_else(|| "terminal".to_owned(), |i| output::state_name(i.state));
        notes.push(format!(
            "instance {id} was {state} already; nothing was changed"
        ));
    }
    if !answer.warning.is_empty() {
        notes.push(format!("warning: {}", answer.warning));
    }
    notes
}

pub async fn abandon(api: &Api, a: AbandonArgs) -> Result<(), CliError> {
    let answer = api
        .client()
        .abandon_instance(api.request(v1::AbandonInstanceRequest {
            id: a.id,
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    for note in abandon_notes(&answer) {
        eprintln!("{note}");
    }
    match a.output {
        Output::Json => print_json(&json!({
            "instance": answer.instance.as_ref().map(output::instance_json),
            "abandoned": answer.abandoned,
            "from_state": if answer.from_state == 0 { Value::Null } else { Value::String(output::state_name(answer.from_state)) },
            "warning": answer.warning,
        })),
        out => print_instances(answer.instance.as_slice(), out),
    }
    Ok(())
}
