//! How results look: aligned tables for people (`wide` adds columns), JSON
//! or YAML for programs, bare ids for shell pipelines. Everything printed on stdout goes through here;
//! progress and notes go to stderr so `-o json` output stays parseable.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use flotilla_core::InstanceState;
use flotilla_core::price::format_amount;
use flotilla_proto::convert::state_from_wire;
use flotilla_proto::v1;
use serde_json::{Value, json};

/// What a command prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for reading.
    Table,
    /// The table plus labels, cordoned, needs attention and attempts
    /// (for instances; elsewhere the same as `table`).
    Wide,
    /// JSON (one document; `watch` prints one object per line).
    Json,
    /// The same document as `json`, as YAML (`watch`: one document per
    /// event, each starting with `---`).
    Yaml,
    /// One id (or pool name) per line, for shell pipelines.
    Ids,
}

/// A JSON value as `-o json` (pretty) or `-o yaml` prints it; any other
/// output prints it as JSON.
pub fn document(v: &Value, out: Output) -> String {
    match out {
        Output::Yaml => {
            let mut text = serde_norway::to_string(v).unwrap_or_default();
            if !text.starts_with("---") {
                text.insert_str(0, "---\n");
            }
            text.trim_end().to_owned()
        }
        Output::Table | Output::Wide | Output::Json | Output::Ids => {
            serde_json::to_string_pretty(v).unwrap_or_default()
        }
    }
}

/// Left-aligned columns separated by two spaces; the last column is not
/// padded, so lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn time(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let t = t?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> Value {
    time(t).map_or(Value::Null, |t| {
        Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
    })
}

/// A duration the way `kubectl` shows ages: the two largest units.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn since(t: Option<&prost_types::Timestamp>, now: DateTime<Utc>) -> Option<i64> {
    time(t).map(|t| (now - t).num_seconds())
}

/// The database spelling of a wire state (`ready`, `worker_dead`).
pub fn state_name(v: i32) -> String {
    state_from_wire(v).map_or_else(|_| format!("unknown({v})"), |s| s.as_str().to_owned())
}

fn desired_name(v: i32) -> &'static str {
    match v1::DesiredState::try_from(v) {
        Ok(v1::DesiredState::Running) => "running",
        Ok(v1::DesiredState::Terminated) => "terminated",
        Ok(v1::DesiredState::Warm) => "warm",
        _ => "unspecified",
    }
}

pub fn state_of(i: &v1::Instance) -> Option<InstanceState> {
    state_from_wire(i.state).ok()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn sorted(labels: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    labels.iter().collect()
}

/// The instances table; `wide` adds every label (so `flotilla.dev/replaces`
/// shows), whether the instance is cordoned or needs attention, and the
/// failed attempts at its current step.
pub fn instances_table(instances: &[v1::Instance], now: DateTime<Utc>, wide: bool) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            let mut row = vec![
                i.id.clone(),
                i.pool.clone(),
                i.name.clone(),
                state_cell(i),
                since(i.created_at.as_ref(), now).map_or("-".into(), age),
                since(i.last_heartbeat.as_ref(), now)
                    .map_or("-".into(), |s| format!("{} ago", age(s))),
                or_dash(&i.provider_machine_id),
            ];
            if wide {
                row.extend([
                    i.cordoned.to_string(),
                    i.needs_attention.to_string(),
                    i.attempts.to_string(),
                    or_dash(&labels_text(&i.labels)),
                ]);
            }
            row
        })
        .collect();
    let mut headers = vec![
        "ID",
        "POOL",
        "NAME",
        "STATE",
        "AGE",
        "HEARTBEAT",
        "PROVIDER ID",
    ];
    if wide {
        // Labels last: the widest column, left unpadded.
        headers.extend(["CORDONED", "ATTENTION", "ATTEMPTS", "LABELS"]);
    }
    table(&headers, &rows)
}

/// The STATE column: the state, and `,cordoned` for a drained instance
/// that is not terminal (the way kubectl shows `Ready,SchedulingDisabled`):
/// a drain changes no state, so without it a drained instance would read
/// as plain `ready`.
pub fn state_cell(i: &v1::Instance) -> String {
    let mut cell = state_name(i.state);
    let terminal = state_of(i).is_some_and(|s| s.is_terminal());
    if i.cordoned && !terminal {
        cell.push_str(",cordoned");
    }
    // Why capacity is taking it away (`ready,expiring`, `draining,idle`).
    if !i.disruption.is_empty() && !terminal {
        cell.push(',');
        cell.push_str(&i.disruption);
    }
    cell
}

/// Labels as `k=v,k=v`, sorted by key.
fn labels_text(labels: &HashMap<String, String>) -> String {
    sorted(labels)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn instance_json(i: &v1::Instance) -> Value {
    json!({
        "id": i.id,
        "pool": i.pool,
        "name": i.name,
        "provider": i.provider,
        "provider_machine_id": i.provider_machine_id,
        "state": state_name(i.state),
        "desired_state": desired_name(i.desired_state),
        "version": i.version,
        "attempts": i.attempts,
        "last_error": i.last_error,
        "state_entered_at": rfc3339(i.state_entered_at.as_ref()),
        "last_heartbeat": rfc3339(i.last_heartbeat.as_ref()),
        "labels": sorted(&i.labels),
        "created_at": rfc3339(i.created_at.as_ref()),
        "cordoned": i.cordoned,
        "needs_attention": i.needs_attention,
        "next_attempt_at": rfc3339(i.next_attempt_at.as_ref()),
        "disruption": i.disruption,
        "idle_since": rfc3339(i.idle_since.as_ref()),
    })
}

/// One instance as `key: value` lines.
pub fn instance_details(i: &v1::Instance, now: DateTime<Utc>) -> String {
    let when = |t: Option<&prost_types::Timestamp>| match (time(t), since(t, now)) {
        (Some(t), Some(s)) => format!(
            "{} ({} ago)",
            t.to_rfc3339_opts(SecondsFormat::Secs, true),
            age(s)
        ),
        _ => "-".into(),
    };
    let labels = sorted(&i.labels)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        ("id", i.id.clone()),
        ("pool", i.pool.clone()),
        ("name", i.name.clone()),
        ("state", state_cell(i)),
        ("desired", desired_name(i.desired_state).to_owned()),
        ("since", when(i.state_entered_at.as_ref())),
        ("provider", i.provider.clone()),
        ("provider id", or_dash(&i.provider_machine_id)),
        ("created", when(i.created_at.as_ref())),
        ("last heartbeat", when(i.last_heartbeat.as_ref())),
        ("labels", or_dash(&labels)),
        ("cordoned", i.cordoned.to_string()),
        ("attempts", i.attempts.to_string()),
        ("last error", or_dash(&i.last_error)),
        ("needs attention", i.needs_attention.to_string()),
    ];
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{:<16} {v}\n", format!("{k}:")))
        .collect();
    if let Some(note) = instance_note(i) {
        out.push_str(&format!("\n{note}\n"));
    }
    out
}

/// What to tell a person about an instance beyond its fields: that an
/// abandoned one may have left its machine, or that a step keeps failing
/// and what the ways out are.
pub fn instance_note(i: &v1::Instance) -> Option<String> {
    match state_of(i) {
        Some(InstanceState::Abandoned) => Some(format!(
            "note: abandoned by an operator without any provider call; machine {} may still \
             exist (the orphan scan deletes it if it carries Flotilla's tags)",
            or_dash(&i.provider_machine_id)
        )),
        Some(s) if i.needs_attention && !s.is_terminal() => {
            Some(attention_hint(std::slice::from_ref(i)))
        }
        _ => None,
    }
}

/// The ways out for instances whose current step keeps failing (flagged
/// `needs_attention`): Flotilla retries it, but it may never succeed — a
/// provider that is gone for good, a stop that never settles.
pub fn attention_hint(instances: &[v1::Instance]) -> String {
    let mut out = String::from(
        "needs attention: the current step keeps failing and may never succeed; Flotilla \
         keeps retrying it:",
    );
    for i in instances {
        let error = if i.last_error.is_empty() {
            "no error recorded"
        } else {
            i.last_error.as_str()
        };
        out.push_str(&format!(
            "\n  {}  {} after {} failed attempt{}: {error}",
            i.id,
            state_name(i.state),
            i.attempts,
            if i.attempts == 1 { "" } else { "s" }
        ));
    }
    let id = match instances {
        [one] => one.id.as_str(),
        _ => "ID",
    };
    out.push_str(&format!(
        "\nhint: if a stop or drain never settles, `flotilla terminate --force {id}` skips it; \
         if its provider is gone for good (nothing there can ever succeed), give it up with \
         `flotilla abandon {id} --reason \"...\"` (no provider call; its machine may be left, and \
         the orphan scan deletes it if it carries Flotilla's tags)"
    ));
    out
}

fn from_name(v: i32) -> String {
    if v == 0 { "-".into() } else { state_name(v) }
}

pub fn history_table(entries: &[v1::ActionLog]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let note = match (e.reason.as_str(), e.error.as_str()) {
                (reason, error) if reason == error && !reason.is_empty() => reason.to_owned(),
                ("", "") => "-".to_owned(),
                (reason, "") => reason.to_owned(),
                ("", error) => format!("error: {error}"),
                (reason, error) => format!("{reason} (error: {error})"),
            };
            vec![
                time(e.at.as_ref()).map_or("-".into(), |t| {
                    t.to_rfc3339_opts(SecondsFormat::Millis, true)
                }),
                from_name(e.from_state),
                history_to(e),
                e.actor.clone(),
                note,
            ]
        })
        .collect();
    table(&["AT", "FROM", "TO", "ACTOR", "REASON"], &rows)
}

/// The TO column: the new state, or for a request row what was asked.
fn history_to(e: &v1::ActionLog) -> String {
    match (e.action.as_str(), e.force) {
        ("", _) => state_name(e.to_state),
        (action, true) => format!("{action} (force)"),
        (action, false) => action.to_owned(),
    }
}

pub fn history_json(e: &v1::ActionLog) -> Value {
    json!({
        "id": e.id,
        "instance_id": e.instance_id,
        "from_state": if e.from_state == 0 { Value::Null } else { Value::String(state_name(e.from_state)) },
        "to_state": if e.to_state == 0 { Value::Null } else { Value::String(state_name(e.to_state)) },
        "action": if e.action.is_empty() { Value::Null } else { Value::String(e.action.clone()) },
        "force": e.force,
        "actor": e.actor,
        "correlation_id": e.correlation_id,
        "error": e.error,
        "reason": e.reason,
        "at": rfc3339(e.at.as_ref()),
    })
}

pub fn event_json(e: &v1::InstanceEvent) -> Value {
    json!({
        "event_id": e.event_id,
        "stream_sequence": e.stream_sequence,
        "instance_id": e.instance_id,
        "pool": e.pool,
        "from_state": if e.from_state == 0 { Value::Null } else { Value::String(state_name(e.from_state)) },
        "to_state": state_name(e.to_state),
        "version": e.version,
        "at": rfc3339(e.at.as_ref()),
        "actor": e.actor,
        "correlation_id": e.correlation_id,
        "error": e.error,
        "reason": e.reason,
        "provider_machine_id": e.provider_machine_id,
        "action": if e.action.is_empty() { Value::Null } else { Value::String(e.action.clone()) },
    })
}

/// The heading of `watch`'s lines (see [`event_line`]).
pub const EVENT_HEADER: &str =
    "    SEQ  AT                        INSTANCE  POOL  FROM -> TO  ACTOR";

/// One event as one line: its stream sequence (to resume from), when, which
/// instance, from → to, who, why. An act that changed no state (a drain,
/// an uncordon) shows as the state it happened in → the act
/// (`ready -> cordoned`).
pub fn event_line(e: &v1::InstanceEvent) -> String {
    let at = time(e.at.as_ref()).map_or("-".into(), |t| {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    });
    let to = if e.action.is_empty() {
        state_name(e.to_state)
    } else {
        e.action.clone()
    };
    let mut line = format!(
        "{:>7}  {at}  {}  {}  {:>19} -> {:<19} {}",
        e.stream_sequence,
        e.instance_id,
        e.pool,
        from_name(e.from_state),
        to,
        e.actor
    );
    if !e.reason.is_empty() {
        line.push_str(&format!("  reason: {}", e.reason));
    }
    if !e.error.is_empty() && e.error != e.reason {
        line.push_str(&format!("  error: {}", e.error));
    }
    line.trim_end().to_owned()
}

pub fn pools_table(pools: &[v1::Pool], now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.provider.clone(),
                p.instance_type.clone(),
                p.region.clone(),
                p.desired_capacity.to_string(),
                warm_column(p),
                format_amount(p.spend_per_hour_micros as i64),
                if p.spend_cap_per_hour_micros == 0 {
                    "-".to_owned()
                } else {
                    format_amount(p.spend_cap_per_hour_micros as i64)
                },
                format!("{}/{}", p.disrupted, budget_text(&p.disruption_budget)),
                seconds_or_dash(p.max_lifetime_seconds),
                idle_cell(p),
                pool_status(p, now),
                since(p.created_at.as_ref(), now).map_or("-".into(), age),
                or_dash(&p.image),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME", "PROVIDER", "TYPE", "REGION", "DESIRED", "WARM", "SPEND/H", "CAP/H", "DISRUPT",
            "LIFETIME", "IDLE", "STATUS", "AGE", "IMAGE",
        ],
        &rows,
    );
    // Whose capacity the spend cap holds back, and how to let it grow.
    for p in pools.iter().filter(|p| p.spend_capped_since.is_some()) {
        let ago = since(p.spend_capped_since.as_ref(), now)
            .map_or(String::new(), |s| format!(" for {}", age(s)));
        out.push_str(&format!(
            "\npool {} is at its spend cap{ago}: {}/h of {}/h, capacity stays below {} desired\n  \
             raise it: flotilla pools set {} --spend-cap AMOUNT\n",
            p.name,
            format_amount(p.spend_per_hour_micros as i64),
            format_amount(p.spend_cap_per_hour_micros as i64),
            p.desired_capacity,
            p.name
        ));
    }
    // Why each paused pool is paused, and how the pause ends.
    for p in pools.iter().filter(|p| p.paused_at.is_some()) {
        out.push_str(&format!(
            "\npool {} is paused: {}\n",
            p.name, p.paused_reason
        ));
        let next = if !p.pause_probe_instance_id.is_empty() {
            format!(
                "  probe instance {} is under way; a ready probe resumes the pool",
                p.pause_probe_instance_id
            )
        } else if let Some(at) = p.pause_probe_after.as_ref() {
            match since(Some(at), now) {
                Some(ago) if ago < 0 => {
                    format!("  one probe instance goes through in {}", age(-ago))
                }
                _ => "  one probe instance goes through now".to_owned(),
            }
        } else {
            "  no probe: it stays paused until resumed".to_owned()
        };
        out.push_str(&next);
        out.push_str(&format!(
            "\n  resume now: flotilla pools resume {}\n",
            p.name
        ));
    }
    out
}

/// Warm machines held now and wanted (`have/want`), `-` for a pool that
/// keeps none (and holds none).
fn warm_column(p: &v1::Pool) -> String {
    if p.warm_size == 0 && p.warm_count == 0 {
        "-".to_owned()
    } else {
        format!("{}/{}", p.warm_count, p.warm_size)
    }
}

/// A pool's recent acts (`pools get`), oldest first, under a heading.
pub fn pool_events_table(events: &[v1::PoolEvent]) -> String {
    if events.is_empty() {
        return "\nno pauses, resumes, probes, spend caps or warm refills recorded\n".to_owned();
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                time(e.at.as_ref()).map_or("-".into(), |t| {
                    t.to_rfc3339_opts(SecondsFormat::Millis, true)
                }),
                e.action.clone(),
                e.actor.clone(),
                or_dash(&e.instance_id),
                or_dash(&e.reason),
            ]
        })
        .collect();
    format!(
        "\nrecent events:\n{}",
        table(&["AT", "ACTION", "ACTOR", "INSTANCE", "REASON"], &rows)
    )
}

pub fn pool_event_json(e: &v1::PoolEvent) -> Value {
    json!({
        "id": e.id,
        "action": e.action,
        "actor": e.actor,
        "correlation_id": e.correlation_id,
        "instance_id": if e.instance_id.is_empty() { Value::Null } else { Value::String(e.instance_id.clone()) },
        "reason": e.reason,
        "at": rfc3339(e.at.as_ref()),
    })
}

/// "active", "deleting" or "paused", with how long ago.
/// The budget as stored ("" from an older api: its default).
fn budget_text(b: &str) -> String {
    if b.is_empty() {
        "10%".into()
    } else {
        b.to_owned()
    }
}

/// The idle timeout, and `,stop` when idle instances go back to warm
/// stock instead of being terminated.
fn idle_cell(p: &v1::Pool) -> String {
    match (p.idle_timeout_seconds, p.idle_action.as_str()) {
        (0, _) => "-".into(),
        (s, "stop") => format!("{},stop", age(i64::from(s))),
        (s, _) => age(i64::from(s)),
    }
}

/// A setting in seconds as an age (`1d0h`, `5m0s`), `-` when off.
fn seconds_or_dash(s: u32) -> String {
    if s == 0 {
        "-".into()
    } else {
        age(i64::from(s))
    }
}

fn pool_status(p: &v1::Pool, now: DateTime<Utc>) -> String {
    if let Some(at) = p.deleting_since.as_ref() {
        return match since(Some(at), now) {
            Some(s) => format!("deleting {}", age(s)),
            None => "deleting".to_owned(),
        };
    }
    match p.paused_at.as_ref() {
        None => "active".to_owned(),
        Some(at) => match since(Some(at), now) {
            Some(s) => format!("paused {}", age(s)),
            None => "paused".to_owned(),
        },
    }
}

pub fn pool_json(p: &v1::Pool) -> Value {
    let t = p.timeouts.unwrap_or_default();
    json!({
        "name": p.name,
        "provider": p.provider,
        "instance_type": p.instance_type,
        "region": p.region,
        "desired_capacity": p.desired_capacity,
        "timeouts": {
            "booting_seconds": t.booting_seconds,
            "installing_seconds": t.installing_seconds,
            "starting_seconds": t.starting_seconds,
            "draining_seconds": t.draining_seconds,
        },
        "labels": sorted(&p.labels),
        "image": p.image,
        "volume_size_gb": p.volume_size_gb,
        "price_per_hour_micros": p.price_per_hour_micros,
        "health_check_url": p.health_check_url,
        "spend_per_hour_micros": p.spend_per_hour_micros,
        "spend_cap_per_hour_micros": p.spend_cap_per_hour_micros,
        "spend_capped_since": rfc3339(p.spend_capped_since.as_ref()),
        "warm_size": p.warm_size,
        "warm_count": p.warm_count,
        "version": p.version,
        "created_at": rfc3339(p.created_at.as_ref()),
        "paused": p.paused_at.is_some(),
        "paused_at": rfc3339(p.paused_at.as_ref()),
        "paused_reason": p.paused_reason,
        "pause_probe_after": rfc3339(p.pause_probe_after.as_ref()),
        "pause_probe_instance_id": p.pause_probe_instance_id,
        "deleting": p.deleting_since.is_some(),
        "deleting_since": rfc3339(p.deleting_since.as_ref()),
        "disruption_budget": budget_text(&p.disruption_budget),
        "disrupted": p.disrupted,
        "max_lifetime_seconds": p.max_lifetime_seconds,
        "idle_timeout_seconds": p.idle_timeout_seconds,
        "idle_action": if p.idle_action.is_empty() { "terminate" } else { p.idle_action.as_str() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up_whatever_the_cell_widths() {
        let out = table(
            &["ID", "STATE", "NOTE"],
            &[
                vec!["a".into(), "ready".into(), "x".into()],
                vec!["long-id".into(), "worker_dead".into(), "".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID       STATE        NOTE");
        assert_eq!(lines[1], "a        ready        x");
        assert_eq!(lines[2], "long-id  worker_dead");
        let state_col = lines[0].find("STATE").expect("header");
        assert!(
            lines[1..]
                .iter()
                .all(|l| l[state_col..].starts_with(|c: char| c != ' '))
        );
    }

    #[test]
    fn a_paused_pool_shows_its_status_reason_and_how_to_resume() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let ts = |t: DateTime<Utc>| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        };
        let paused = v1::Pool {
            name: "gpu".into(),
            paused_at: Some(ts(now - chrono::Duration::seconds(90))),
            paused_reason: "5 provisioning or startup failures within 600s".into(),
            pause_probe_after: Some(ts(now + chrono::Duration::seconds(120))),
            ..Default::default()
        };
        let running = v1::Pool {
            name: "cpu".into(),
            ..Default::default()
        };
        let out = pools_table(&[running, paused.clone()], now);
        assert!(out.contains("STATUS"), "{out}");
        assert!(out.contains("active"), "{out}");
        assert!(out.contains("paused 1m30s"), "{out}");
        assert!(out.contains("pool gpu is paused: 5 provisioning"), "{out}");
        assert!(out.contains("goes through in 2m0s"), "{out}");
        assert!(out.contains("flotilla pools resume gpu"), "{out}");
        assert!(!out.contains("pool cpu is paused"), "{out}");
        assert_eq!(pool_json(&paused)["paused"], true);
    }

    #[test]
    fn a_pools_recent_events_show_when_who_what_and_why() {
        let at = |secs: i64| {
            Some(prost_types::Timestamp {
                seconds: 1_800_000_000 + secs,
                nanos: 0,
            })
        };
        let events = [
            v1::PoolEvent {
                id: 1,
                action: "paused".into(),
                actor: "scheduler".into(),
                reason: "5 provisioning or startup failures within 600s".into(),
                at: at(0),
                ..Default::default()
            },
            v1::PoolEvent {
                id: 2,
                action: "probe_started".into(),
                actor: "scheduler".into(),
                instance_id: "0196-probe".into(),
                at: at(120),
                ..Default::default()
            },
        ];
        let out = pool_events_table(&events);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "recent events:", "{out}");
        assert!(lines[2].starts_with("AT "), "{out}");
        assert!(
            lines[3].contains("paused") && lines[3].contains("5 provisioning"),
            "{out}"
        );
        assert!(
            lines[4].contains("probe_started") && lines[4].contains("0196-probe"),
            "{out}"
        );
        assert!(lines[3].contains("2027-01-15T08:00:00.000Z"), "{out}");
        assert!(pool_events_table(&[]).contains("no pauses, resumes, probes, spend caps"));
        assert_eq!(pool_event_json(&events[0])["instance_id"], Value::Null);
        assert_eq!(pool_event_json(&events[1])["instance_id"], "0196-probe");
    }

    #[test]
    fn pools_show_their_warm_stock_as_have_over_want_and_a_dash_without_one() {
        let now = Utc::now();
        let warm = v1::Pool {
            name: "gpu".into(),
            warm_size: 3,
            warm_count: 2,
            ..Default::default()
        };
        let cold = v1::Pool {
            name: "cpu".into(),
            ..Default::default()
        };
        let out = pools_table(&[warm.clone(), cold], now);
        let mut lines = out.lines();
        let header = lines.next().unwrap();
        let col = header.find("WARM").expect("a WARM column");
        let gpu = lines.next().unwrap();
        assert_eq!(gpu[col..].split_whitespace().next(), Some("2/3"), "{out}");
        let cpu = lines.next().unwrap();
        assert_eq!(cpu[col..].split_whitespace().next(), Some("-"), "{out}");
        let json = pool_json(&warm);
        assert_eq!(json["warm_size"], 3);
        assert_eq!(json["warm_count"], 2);
        // A warm instance says so in `get` and `list -o json`.
        assert_eq!(desired_name(v1::DesiredState::Warm as i32), "warm");
        assert_eq!(state_name(v1::InstanceState::Warm as i32), "warm");
    }

    #[test]
    fn pools_show_their_spend_rate_and_cap_and_say_when_the_cap_holds_capacity() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let capped = v1::Pool {
            name: "gpu".into(),
            desired_capacity: 10,
            spend_per_hour_micros: 4_500_000,
            spend_cap_per_hour_micros: 5_000_000,
            spend_capped_since: Some(prost_types::Timestamp {
                seconds: now.timestamp() - 60,
                nanos: 0,
            }),
            ..Default::default()
        };
        let uncapped = v1::Pool {
            name: "cpu".into(),
            spend_per_hour_micros: 2_800,
            ..Default::default()
        };
        let out = pools_table(&[uncapped, capped.clone()], now);
        let header = out.lines().next().expect("header");
        assert!(
            header.contains("SPEND/H") && header.contains("CAP/H"),
            "{out}"
        );
        let cpu = out.lines().find(|l| l.starts_with("cpu")).expect("cpu row");
        assert!(cpu.contains("0.0028") && cpu.contains(" - "), "{cpu}");
        let gpu = out.lines().find(|l| l.starts_with("gpu")).expect("gpu row");
        assert!(gpu.contains("4.5") && gpu.contains(" 5 "), "{gpu}");
        assert!(
            out.contains("pool gpu is at its spend cap for 1m0s: 4.5/h of 5/h"),
            "{out}"
        );
        assert!(out.contains("flotilla pools set gpu --spend-cap"), "{out}");
        assert!(!out.contains("pool cpu is at its spend cap"), "{out}");
        let json = pool_json(&capped);
        assert_eq!(json["spend_per_hour_micros"], 4_500_000);
        assert_eq!(json["spend_cap_per_hour_micros"], 5_000_000);
    }

    #[test]
    fn pools_show_their_disruption_budget_lifetime_and_idle_timeout() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let pool = v1::Pool {
            name: "gpu".into(),
            disruption_budget: "25%".into(),
            disrupted: 2,
            max_lifetime_seconds: 86_400,
            idle_timeout_seconds: 300,
            idle_action: "stop".into(),
            ..Default::default()
        };
        let plain = v1::Pool {
            name: "cpu".into(),
            ..Default::default()
        };
        let out = pools_table(&[plain, pool.clone()], now);
        let header = out.lines().next().expect("header");
        for h in ["DISRUPT", "LIFETIME", "IDLE"] {
            assert!(header.contains(h), "{out}");
        }
        let gpu = out.lines().find(|l| l.starts_with("gpu")).expect("gpu row");
        assert!(
            gpu.contains(" 2/25% ") && gpu.contains(" 1d0h ") && gpu.contains(" 5m0s,stop "),
            "{gpu}"
        );
        let cpu = out.lines().find(|l| l.starts_with("cpu")).expect("cpu row");
        assert!(cpu.contains(" 0/10% "), "{cpu}");
        let json = pool_json(&pool);
        assert_eq!(json["disruption_budget"], "25%");
        assert_eq!(json["disrupted"], 2);
        assert_eq!(json["max_lifetime_seconds"], 86_400);
        assert_eq!(json["idle_timeout_seconds"], 300);
        assert_eq!(json["idle_action"], "stop");
        let expiring = v1::Instance {
            state: v1::InstanceState::Ready as i32,
            disruption: "expiring".into(),
            ..Default::default()
        };
        assert_eq!(state_cell(&expiring), "ready,expiring");
        assert_eq!(instance_json(&expiring)["disruption"], "expiring");
    }

    #[test]
    fn a_deleting_pool_says_so_and_since_when() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let deleting = v1::Pool {
            name: "gpu".into(),
            deleting_since: Some(prost_types::Timestamp {
                seconds: now.timestamp() - 30,
                nanos: 0,
            }),
            ..Default::default()
        };
        let out = pools_table(std::slice::from_ref(&deleting), now);
        assert!(out.contains("deleting 30s"), "{out}");
        assert_eq!(pool_json(&deleting)["deleting"], true);
    }

    #[test]
    fn an_instance_failing_forever_names_the_ways_out() {
        let stuck = v1::Instance {
            id: "0196-stuck".into(),
            state: v1::InstanceState::Deleting as i32,
            needs_attention: true,
            attempts: 12,
            last_error: "unavailable: app not found".into(),
            ..Default::default()
        };
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let out = instance_details(&stuck, now);
        assert!(out.contains("may never succeed"), "{out}");
        assert!(
            out.contains("deleting after 12 failed attempts: unavailable: app not found"),
            "{out}"
        );
        assert!(
            out.contains("flotilla terminate --force 0196-stuck"),
            "{out}"
        );
        assert!(
            out.contains("flotilla abandon 0196-stuck --reason"),
            "{out}"
        );
        let fine = v1::Instance {
            needs_attention: false,
            ..stuck.clone()
        };
        assert!(instance_note(&fine).is_none());
        let abandoned = v1::Instance {
            state: v1::InstanceState::Abandoned as i32,
            provider_machine_id: "m-1".into(),
            ..stuck
        };
        let note = instance_note(&abandoned).expect("a note");
        assert!(note.contains("machine m-1 may still exist"), "{note}");
        assert!(!note.contains("terminate --force"), "{note}");
    }

    fn replacement() -> v1::Instance {
        v1::Instance {
            id: "0196a1b2-0000-7000-8000-000000000001".into(),
            pool: "demo".into(),
            name: "web-1-r1".into(),
            state: v1::InstanceState::Ready as i32,
            attempts: 3,
            cordoned: true,
            needs_attention: true,
            labels: HashMap::from([
                ("flotilla.dev/replaces".into(), "0196-old".into()),
                ("app".into(), "web".into()),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn wide_adds_labels_cordoned_attention_and_attempts() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let narrow = instances_table(&[replacement()], now, false);
        assert!(!narrow.contains("LABELS"), "{narrow}");
        assert!(!narrow.contains("flotilla.dev/replaces"), "{narrow}");
        let wide = instances_table(&[replacement()], now, true);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[0].ends_with("CORDONED  ATTENTION  ATTEMPTS  LABELS"),
            "{wide}"
        );
        assert!(
            lines[1]
                .ends_with("true      true       3         app=web,flotilla.dev/replaces=0196-old"),
            "{wide}"
        );
    }

    #[test]
    fn a_drained_instance_reads_cordoned_in_its_state_and_its_events() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let table = instances_table(&[replacement()], now, false);
        assert!(
            table
                .lines()
                .nth(1)
                .expect("row")
                .contains("ready,cordoned"),
            "{table}"
        );
        let gone = v1::Instance {
            state: v1::InstanceState::Terminated as i32,
            ..replacement()
        };
        assert_eq!(state_cell(&gone), "terminated");
        let uncordoned = v1::Instance {
            cordoned: false,
            ..replacement()
        };
        assert_eq!(state_cell(&uncordoned), "ready");
        let event = v1::InstanceEvent {
            stream_sequence: 9,
            instance_id: "0196-x".into(),
            pool: "demo".into(),
            from_state: v1::InstanceState::Ready as i32,
            to_state: v1::InstanceState::Ready as i32,
            action: "cordoned".into(),
            actor: "api:ops".into(),
            reason: "kernel upgrade".into(),
            ..Default::default()
        };
        let line = event_line(&event);
        assert!(line.contains("ready -> cordoned"), "{line}");
        assert!(line.contains("reason: kernel upgrade"), "{line}");
        assert_eq!(event_json(&event)["action"], "cordoned");
        let transition = v1::InstanceEvent {
            action: String::new(),
            to_state: v1::InstanceState::Draining as i32,
            ..event
        };
        assert!(event_line(&transition).contains("ready -> draining"));
        assert_eq!(event_json(&transition)["action"], Value::Null);
    }

    #[test]
    fn yaml_is_the_json_document_as_yaml() {
        let v = instance_json(&replacement());
        let yaml = document(&v, Output::Yaml);
        assert!(yaml.starts_with("---\n"), "{yaml}");
        assert!(yaml.contains("flotilla.dev/replaces: 0196-old"), "{yaml}");
        let back: Value = serde_norway::from_str(&yaml).expect("parseable YAML");
        assert_eq!(back, v);
        let json: Value =
            serde_json::from_str(&document(&v, Output::Json)).expect("parseable JSON");
        assert_eq!(json, v);
    }

    #[test]
    fn ages_show_the_two_largest_units() {
        assert_eq!(age(-3), "0s");
        assert_eq!(age(59), "59s");
        assert_eq!(age(61), "1m1s");
        assert_eq!(age(3 * 3600 + 120), "3h2m");
        assert_eq!(age(2 * 86_400 + 3 * 3600), "2d3h");
    }

    #[test]
    fn states_print_in_their_database_spelling() {
        assert_eq!(
            state_name(v1::InstanceState::WorkerDead as i32),
            "worker_dead"
        );
        assert_eq!(state_name(99), "unknown(99)");
    }
}
