//! The instance commands: provision, list, get, watch, terminate, drain,
//! uncordon, abandon.

use std::collections::HashMap;
use std::io::IsTerminal;
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

fn print_json(v: &Value, out: Output) {
    println!("{}", output::document(v, out));
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
        Output::Table | Output::Wide => print!(
            "{}",
            output::instances_table(instances, chrono::Utc::now(), out == Output::Wide)
        ),
        Output::Json | Output::Yaml => print_json(
            &Value::Array(instances.iter().map(output::instance_json).collect()),
            out,
        ),
        Output::Ids => instances.iter().for_each(|i| println!("{}", i.id)),
    }
}

pub async fn provision(api: &Api, a: ProvisionArgs) -> Result<(), CliError> {
    // Listening before the request: a Ctrl-C from the moment the api may
    // have accepted it is answered with what goes on, never the default
    // silent death.
    let interrupt = interrupted()?;
    tokio::pin!(interrupt);
    let mut client = api.client();
    let call = client.provision(api.request(v1::ProvisionRequest {
        pool: a.pool.clone(),
        count: a.count.unwrap_or(0),
        names: a.name,
        labels: a.label.into_iter().collect(),
        idempotency_key: a.idempotency_key.clone(),
        dry_run: a.dry_run,
    }));
    let answer = tokio::select! {
        answer = call => answer.map_err(|s| api.error(s))?.into_inner(),
        () = &mut interrupt => {
            return Err(CliError::Interrupted(format!(
                "interrupted before the api answered: it may have accepted the request\n\
                 hint: see with `flotilla list --pool {}`{}",
                a.pool,
                if a.idempotency_key.is_empty() {
                    ""
                } else {
                    "; asking again with the same --idempotency-key creates nothing twice"
                }
            )));
        }
    };
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
    let waited = tokio::select! {
        waited = wait_for(
            api,
            &a.pool,
            &ids,
            InstanceState::Ready,
            Duration::from_secs(a.wait_timeout),
        ) => waited,
        () = &mut interrupt => {
            if std::io::stderr().is_terminal() {
                // End the progress line redrawn in place.
                eprintln!();
            }
            return Err(CliError::Interrupted(interrupted_note(&a.pool, n)));
        }
    };
    print_instances(&waited?, a.output);
    Ok(())
}

/// Resolves at the first SIGINT (Ctrl-C), whose handler is installed now,
/// not at the first poll.
fn interrupted() -> Result<impl std::future::Future<Output = ()>, CliError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt())?;
        Ok(async move {
            sigint.recv().await;
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// What a Ctrl-C during `provision`'s wait tells the user: only the
/// waiting stopped; the api accepted the instances and they keep being
/// provisioned.
pub fn interrupted_note(pool: &str, n: usize) -> String {
    format!(
        "interrupted: stopped waiting, but the {n} accepted instance{s} keep{verb} being \
         provisioned\nhint: follow {them} with `flotilla list --pool {pool}` or `flotilla watch \
         --pool {pool}`; `flotilla terminate ID` if you no longer want {them}",
        s = if n == 1 { "" } else { "s" },
        verb = if n == 1 { "s" } else { "" },
        them = if n == 1 { "it" } else { "them" },
    )
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
    /// Only cordoned instances: the ones `flotilla drain` took out of work
    /// (they keep their state, shown as e.g. `ready,cordoned`; `flotilla
    /// uncordon` puts them back), and the ones on their way out.
    #[arg(long)]
    pub cordoned: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// What `list --state draining` adds on stderr: `draining` is a step of a
/// termination, not what `flotilla drain` leaves an instance in.
pub const DRAINING_NOTE: &str = "note: `draining` is the step of a termination that waits for \
     the worker to finish; an instance drained with `flotilla drain` keeps its state (e.g. \
     `ready,cordoned`): list those with `flotilla list --cordoned`";

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
    let all = list_all(
        api,
        a.pool.as_deref().unwrap_or_default(),
        &states,
        &labels,
        a.cordoned.then_some(true),
    )
    .await?;
    if !a.cordoned && states.contains(&(v1::InstanceState::Draining as i32)) {
        eprintln!("{DRAINING_NOTE}");
    }
    if all.is_empty() && matches!(a.output, Output::Table | Output::Wide) {
        eprintln!("no instances");
        return Ok(());
    }
    print_instances(&all, a.output);
    Ok(())
}

/// Every page of ListInstances.
async fn list_all(
    api: &Api,
    pool: &str,
    states: &[i32],
    labels: &HashMap<String, String>,
    cordoned: Option<bool>,
) -> Result<Vec<v1::Instance>, CliError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .client()
            .list_instances(api.request(v1::ListInstancesRequest {
                pool: pool.to_owned(),
                states: states.to_vec(),
                labels: labels.clone(),
                page_size: 1000,
                page_token,
                cordoned,
            }))
            .await
            .map_err(|s| api.error(s))?
            .into_inner();
        all.extend(page.instances);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// The shortest id prefix accepted for an instance reference.
pub const MIN_PREFIX: usize = 4;

/// Whether a reference is spelled as a full UUID (36 characters, hex and
/// dashes): then it is sent as it is, and the api says if it is unknown.
fn is_full_id(reference: &str) -> bool {
    reference.len() == 36 && reference.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Which instance a reference means, the way nomad reads one: the full id,
/// else an instance name (a live instance before terminated ones of the same
/// name), else a unique id prefix of at least [`MIN_PREFIX`] characters. An
/// ambiguous reference is refused with its candidates; none matching is
/// NOT_FOUND.
pub fn resolve_in<'a>(
    reference: &str,
    instances: &'a [v1::Instance],
) -> Result<&'a v1::Instance, CliError> {
    if let Some(i) = instances.iter().find(|i| i.id == reference) {
        return Ok(i);
    }
    let named: Vec<&v1::Instance> = instances.iter().filter(|i| i.name == reference).collect();
    let live: Vec<&v1::Instance> = named
        .iter()
        .copied()
        .filter(|i| !output::state_of(i).is_some_and(|s| s.is_terminal()))
        .collect();
    match (live.as_slice(), named.as_slice()) {
        ([one], _) | ([], [one]) => return Ok(one),
        ([], []) => {}
        (live, named) => {
            let candidates = if live.is_empty() { named } else { live };
            return Err(ambiguous(reference, "name", candidates));
        }
    }
    let lower = reference.to_ascii_lowercase();
    let prefixed: Vec<&v1::Instance> = if reference.len() >= MIN_PREFIX {
        instances
            .iter()
            .filter(|i| i.id.starts_with(&lower))
            .collect()
    } else {
        Vec::new()
    };
    match prefixed.as_slice() {
        [one] => Ok(one),
        [] if reference.len() < MIN_PREFIX => Err(CliError::NotFound(format!(
            "no instance named {reference:?} (an id prefix needs at least {MIN_PREFIX} characters)"
        ))),
        [] => Err(CliError::NotFound(format!(
            "no instance with id, id prefix or name {reference:?}"
        ))),
        many => Err(ambiguous(reference, "id prefix", many)),
    }
}

fn ambiguous(reference: &str, what: &str, candidates: &[&v1::Instance]) -> CliError {
    let list: Vec<String> = candidates
        .iter()
        .map(|i| {
            format!(
                "\n  {}  {}  {}  {}",
                i.id,
                i.pool,
                i.name,
                output::state_name(i.state)
            )
        })
        .collect();
    CliError::Invalid(format!(
        "{what} {reference:?} matches {} instances; give more of the id:{}",
        candidates.len(),
        list.concat()
    ))
}

/// Turns references (full ids, unique id prefixes, names) into full ids,
/// listing instances once (every state) only when one is not a full id.
pub async fn resolve(api: &Api, references: &[String]) -> Result<Vec<String>, CliError> {
    if references.iter().all(|r| is_full_id(r)) {
        return Ok(references.to_vec());
    }
    let all = list_all(api, "", &[], &HashMap::new(), None).await?;
    references
        .iter()
        .map(|r| {
            if is_full_id(r) {
                Ok(r.clone())
            } else {
                resolve_in(r, &all).map(|i| i.id.clone())
            }
        })
        .collect()
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Instance: its id, a unique id prefix (at least 4 characters), or its name.
    pub id: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn get(api: &Api, a: GetArgs) -> Result<(), CliError> {
    let id = resolve(api, std::slice::from_ref(&a.id)).await?.remove(0);
    let instance = api
        .client()
        .get_instance(api.request(v1::GetInstanceRequest { id: id.clone() }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    let history = api
        .client()
        .get_instance_history(api.request(v1::GetInstanceHistoryRequest { id }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner()
        .entries;
    match a.output {
        Output::Table | Output::Wide => {
            print!(
                "{}",
                output::instance_details(&instance, chrono::Utc::now())
            );
            println!("\nHISTORY");
            print!("{}", output::history_table(&history));
        }
        out @ (Output::Json | Output::Yaml) => print_json(
            &json!({
                "instance": output::instance_json(&instance),
                "history": history.iter().map(output::history_json).collect::<Vec<_>>(),
            }),
            out,
        ),
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
    if matches!(output, Output::Table | Output::Wide) {
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
            Output::Yaml => println!("{}", output::document(&output::event_json(event), output)),
            Output::Ids => println!("{}", event.instance_id),
            Output::Table | Output::Wide => println!("{}", output::event_line(event)),
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
    /// Instances: ids, unique id prefixes (at least 4 characters) or names.
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
    async fn selector(&self, api: &Api) -> Result<v1::InstanceSelector, CliError> {
        Ok(v1::InstanceSelector {
            instance_ids: resolve(api, &self.ids).await?,
            pool: self.pool.clone().unwrap_or_default(),
            labels: self.selector.iter().cloned().collect(),
        })
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
        Output::Json | Output::Yaml => print_json(
            &json!({
                "accepted_ids": accepted,
                "unchanged_ids": unchanged,
                "unknown_ids": unknown,
            }),
            out,
        ),
        Output::Ids => accepted.iter().for_each(|id| println!("{id}")),
        Output::Table | Output::Wide => {
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
            selector: Some(a.target.selector(api).await?),
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
            selector: Some(a.target.selector(api).await?),
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    report(
        "cordoned",
        &answer.accepted_ids,
        &answer.unchanged_ids,
        &answer.unknown_ids,
        a.output,
    )
}

#[derive(Debug, Args)]
pub struct UncordonArgs {
    /// Instance: its id, a unique id prefix (at least 4 characters), or its name.
    pub id: String,
    /// Recorded in the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Undoes a drain. The api refuses (exit 7) an instance that is not
/// cordoned or is being terminated.
pub async fn uncordon(api: &Api, a: UncordonArgs) -> Result<(), CliError> {
    let id = resolve(api, std::slice::from_ref(&a.id)).await?.remove(0);
    let answer = api
        .client()
        .uncordon(api.request(v1::UncordonRequest {
            id,
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    let instance = answer.instance.unwrap_or_default();
    match a.output {
        Output::Json | Output::Yaml => print_json(&output::instance_json(&instance), a.output),
        Output::Ids => println!("{}", instance.id),
        Output::Table | Output::Wide => print!(
            "{}",
            output::table(
                &["ID", "RESULT", "STATE"],
                &[vec![
                    instance.id.clone(),
                    "uncordoned".into(),
                    output::state_cell(&instance),
                ]]
            )
        ),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AbandonArgs {
    /// Instance: its id, a unique id prefix (at least 4 characters), or its name.
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
            id: resolve(api, std::slice::from_ref(&a.id)).await?.remove(0),
            reason: a.reason,
        }))
        .await
        .map_err(|s| api.error(s))?
        .into_inner();
    for note in abandon_notes(&answer) {
        eprintln!("{note}");
    }
    match a.output {
        out @ (Output::Json | Output::Yaml) => print_json(
            &json!({
                "instance": answer.instance.as_ref().map(output::instance_json),
                "abandoned": answer.abandoned,
                "from_state": if answer.from_state == 0 { Value::Null } else { Value::String(output::state_name(answer.from_state)) },
                "warning": answer.warning,
            }),
            out,
        ),
        out => print_instances(answer.instance.as_slice(), out),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;

    fn instance(id: &str, name: &str, state: v1::InstanceState) -> v1::Instance {
        v1::Instance {
            id: id.into(),
            pool: "demo".into(),
            name: name.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn fleet() -> Vec<v1::Instance> {
        use v1::InstanceState::{Ready, Terminated};
        vec![
            instance("0196aaaa-0000-7000-8000-000000000001", "web-1", Ready),
            instance("0196aabb-0000-7000-8000-000000000002", "web-2", Ready),
            instance("0196ccdd-0000-7000-8000-000000000003", "web-1", Terminated),
            instance("0196ccee-0000-7000-8000-000000000004", "old", Terminated),
        ]
    }

    #[test]
    fn a_ctrl_c_while_waiting_says_the_instances_go_on_and_how_to_follow_them() {
        let e = CliError::Interrupted(interrupted_note("demo", 2));
        assert_eq!(e.exit_code(), 130);
        let text = e.to_string();
        assert!(
            text.contains("the 2 accepted instances keep being provisioned"),
            "{text}"
        );
        assert!(text.contains("`flotilla list --pool demo`"), "{text}");
        assert!(text.contains("`flotilla watch --pool demo`"), "{text}");
        let one = interrupted_note("gpu", 1);
        assert!(
            one.contains("the 1 accepted instance keeps being provisioned"),
            "{one}"
        );
    }

    #[test]
    fn a_reference_is_a_full_id_a_unique_prefix_or_a_name() {
        let all = fleet();
        let id = |r: &str| resolve_in(r, &all).map(|i| i.id.clone());
        assert_eq!(
            id("0196aabb-0000-7000-8000-000000000002").ok(),
            Some(all[1].id.clone())
        );
        assert_eq!(id("0196aab").ok(), Some(all[1].id.clone()));
        assert_eq!(id("0196AAAA").ok(), Some(all[0].id.clone()));
        // A live instance wins over a terminated one of the same name.
        assert_eq!(id("web-1").ok(), Some(all[0].id.clone()));
        assert_eq!(id("old").ok(), Some(all[3].id.clone()));
        assert!(is_full_id(&all[0].id));
        assert!(!is_full_id("0196aab"));
    }

    #[test]
    fn an_ambiguous_prefix_lists_its_candidates_and_an_unknown_one_is_not_found() {
        let all = fleet();
        let err = resolve_in("0196aa", &all).expect_err("two match");
        assert_eq!(err.exit_code(), exit::INVALID);
        let text = err.to_string();
        assert!(text.contains("matches 2 instances"), "{text}");
        assert!(
            text.contains(&all[0].id) && text.contains(&all[1].id),
            "{text}"
        );
        assert!(!text.contains(&all[2].id), "{text}");
        let err = resolve_in("0196ff", &all).expect_err("none match");
        assert_eq!(err.exit_code(), exit::NOT_FOUND);
        let err = resolve_in("019", &all).expect_err("prefix too short");
        assert_eq!(err.exit_code(), exit::NOT_FOUND);
        assert!(err.to_string().contains("at least 4"), "{err}");
        let mut twins = fleet();
        twins[1].name = "web-1".into();
        let err = resolve_in("web-1", &twins).expect_err("two live web-1");
        assert!(
            err.to_string().contains("name \"web-1\" matches 2"),
            "{err}"
        );
    }
}
