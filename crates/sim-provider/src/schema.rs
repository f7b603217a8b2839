//! The request bodies the sim accepts, field by field, as the published
//! schema names them: a field the schema does not list, or a value of the
//! wrong JSON type, is a 400 before any handler acts.
//!
//! Source: the Fly Machines OpenAPI document ("Fly Machines API" 1.0,
//! fly-openapi-sdk `go/api/openapi.yaml` at commit f0c59fb), schemas
//! `CreateMachineRequest`, `api.MachineConfig`, `api.MachineGuest`,
//! `api.MachineMount`, `api.MachineRestart`, `StopRequest` and
//! `CreateVolumeRequest`. Only field names and JSON types are encoded here
//! (the document itself is not copied); nested objects the sim does not
//! act on (`dns`, `services`, `init`, ...) are checked for their type only.

use serde_json::Value;

use crate::error::ApiError;

/// The JSON type a field must have.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Str,
    Int,
    Bool,
    /// An object whose own fields are not checked.
    AnyObject,
    /// An array whose items are not checked.
    AnyArray,
    /// An object of string values (`env`, `metadata`).
    StrMap,
    Object(&'static [(&'static str, Kind)]),
    ArrayOf(&'static Kind),
}

use Kind::*;

/// `api.MachineGuest`.
pub(crate) const GUEST: &[(&str, Kind)] = &[
    ("cpu_kind", Str),
    ("cpus", Int),
    ("gpu_kind", Str),
    ("host_dedication_id", Str),
    ("kernel_args", ArrayOf(&Str)),
    ("memory_mb", Int),
];

/// `api.MachineMount`.
pub(crate) const MOUNT: &[(&str, Kind)] = &[
    ("add_size_gb", Int),
    ("encrypted", Bool),
    ("extend_threshold_percent", Int),
    ("name", Str),
    ("path", Str),
    ("size_gb", Int),
    ("size_gb_limit", Int),
    ("volume", Str),
];

/// `api.MachineRestart`.
pub(crate) const RESTART: &[(&str, Kind)] = &[("max_retries", Int), ("policy", Str)];

/// `api.MachineConfig`.
pub(crate) const MACHINE_CONFIG: &[(&str, Kind)] = &[
    ("auto_destroy", Bool),
    ("checks", AnyObject),
    ("disable_machine_autostart", Bool),
    ("dns", AnyObject),
    ("env", StrMap),
    ("files", AnyArray),
    ("guest", Object(GUEST)),
    ("image", Str),
    ("init", AnyObject),
    ("metadata", StrMap),
    ("metrics", AnyObject),
    ("mounts", ArrayOf(&Object(MOUNT))),
    ("processes", AnyArray),
    ("restart", Object(RESTART)),
    ("schedule", Str),
    ("services", AnyArray),
    ("size", Str),
    ("standbys", ArrayOf(&Str)),
    ("statics", AnyArray),
    ("stop_config", AnyObject),
];

/// `CreateMachineRequest`.
pub(crate) const CREATE_MACHINE: &[(&str, Kind)] = &[
    ("config", Object(MACHINE_CONFIG)),
    ("lease_ttl", Int),
    ("lsvd", Bool),
    ("name", Str),
    ("region", Str),
    ("skip_launch", Bool),
    ("skip_service_registration", Bool),
];

/// `StopRequest`.
pub(crate) const STOP: &[(&str, Kind)] = &[("signal", Str), ("timeout", Str)];

/// `CreateVolumeRequest`.
pub(crate) const CREATE_VOLUME: &[(&str, Kind)] = &[
    ("compute", Object(GUEST)),
    ("encrypted", Bool),
    ("fstype", Str),
    ("machines_only", Bool),
    ("name", Str),
    ("region", Str),
    ("require_unique_zone", Bool),
    ("size_gb", Int),
    ("snapshot_id", Str),
    ("snapshot_retention", Int),
    ("source_volume_id", Str),
];

/// Checks `body` against `fields`; the error names the offending field by
/// its path (`config.guest.cpus`).
pub(crate) fn check(body: &Value, fields: &'static [(&'static str, Kind)]) -> Result<(), ApiError> {
    check_value(body, Object(fields), "")
}

fn check_value(value: &Value, kind: Kind, path: &str) -> Result<(), ApiError> {
    // A JSON null is an absent optional field, as Go's decoder takes it.
    if value.is_null() {
        return Ok(());
    }
    let here = if path.is_empty() { "body" } else { path };
    let mistyped = |want: &str| {
        ApiError::BadRequest(format!(
            "invalid request body: {here} must be {want}, got {}",
            type_name(value)
        ))
    };
    match kind {
        Str => value
            .is_string()
            .then_some(())
            .ok_or_else(|| mistyped("a string")),
        Int => (value.is_i64() || value.is_u64())
            .then_some(())
            .ok_or_else(|| mistyped("an integer")),
        Bool => value
            .is_boolean()
            .then_some(())
            .ok_or_else(|| mistyped("a boolean")),
        AnyObject => value
            .is_object()
            .then_some(())
            .ok_or_else(|| mistyped("an object")),
        AnyArray => value
            .is_array()
            .then_some(())
            .ok_or_else(|| mistyped("an array")),
        StrMap => {
            let map = value.as_object().ok_or_else(|| mistyped("an object"))?;
            for (key, v) in map {
                check_value(v, Str, &join(path, key))?;
            }
            Ok(())
        }
        ArrayOf(item) => {
            let items = value.as_array().ok_or_else(|| mistyped("an array"))?;
            for (i, v) in items.iter().enumerate() {
                check_value(v, *item, &format!("{here}[{i}]"))?;
            }
            Ok(())
        }
        Object(fields) => {
            let map = value.as_object().ok_or_else(|| mistyped("an object"))?;
            for (key, v) in map {
                let Some((_, field_kind)) = fields.iter().find(|(name, _)| name == key) else {
                    return Err(ApiError::BadRequest(format!(
                        "invalid request body: unknown field {}",
                        join(path, key)
                    )));
                };
                check_value(v, *field_kind, &join(path, key))?;
            }
            Ok(())
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_fields_and_mistyped_values_are_named_by_path() {
        let ok = json!({ "name": "w", "config": { "image": "i", "guest": { "cpus": 1 },
            "mounts": [{ "volume": "vol_1", "path": "/data" }], "env": { "A": "b" } } });
        assert!(check(&ok, CREATE_MACHINE).is_ok());
        let cases = [
            (json!({ "config": { "imgae": "i" } }), "config.imgae"),
            (
                json!({ "config": { "guest": { "cpus": "2" } } }),
                "config.guest.cpus",
            ),
            (json!({ "config": { "env": { "A": 1 } } }), "config.env.A"),
            (
                json!({ "config": { "mounts": [{ "volume": "v", "size": 1 }] } }),
                "config.mounts[0].size",
            ),
            (json!({ "skip_launch": "yes" }), "skip_launch"),
            (json!({ "regoin": "ams" }), "regoin"),
        ];
        for (body, field) in cases {
            let err = check(&body, CREATE_MACHINE).unwrap_err();
            assert!(err.to_string().contains(field), "{body}: {err}");
        }
    }
}
