//! Where a record becomes events: decoding a Kafka record's value into the
//! changes it makes to one feature view.
//!
//! Two formats: Debezium change events (the `{before, after, source, op}`
//! envelope, optionally wrapped in the JSON converter's `{schema, payload}`)
//! and plain JSON events. Fields a view does not read are ignored, so a
//! column added upstream changes nothing. Anything that cannot be decoded is
//! a [`Poison`] with a class and a message, bound for the dead-letter topic.

use std::collections::BTreeMap;

use chrono::DateTime;
use freshet_store::{
    state::{Direction, Event, Scalar},
    view::{DeletePolicy, FeatureView, Format, KeyType, UpdatePolicy, ValueType},
};
use serde_json::{Map, Value};

/// Why a record cannot be applied; its class goes into the DLQ headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Poison {
    pub class: &'static str,
    pub message: String,
}

impl Poison {
    fn new(class: &'static str, message: impl Into<String>) -> Self {
        Self { class, message: message.into() }
    }
}

pub const INVALID_JSON: &str = "freshet.decode.InvalidJson";
pub const INVALID_ENVELOPE: &str = "freshet.decode.InvalidEnvelope";
pub const MISSING_FIELD: &str = "freshet.decode.MissingField";
pub const WRONG_TYPE: &str = "freshet.decode.WrongType";

/// The changes one record makes to `view`, in the order to apply them.
/// Tombstones, truncates and ignored updates or deletes make none.
pub fn decode(view: &FeatureView, value: Option<&[u8]>) -> Result<Vec<(Direction, Event)>, Poison> {
    let Some(bytes) = value else {
        return Ok(Vec::new());
    };
    let json: Value = serde_json::from_slice(bytes).map_err(|e| Poison::new(INVALID_JSON, format!("value is not JSON: {e}")))?;
    match view.source.format {
        Format::Json => Ok(vec![(Direction::Add, event(view, object(&json, "value")?)?)]),
        Format::Debezium => debezium(view, &json),
    }
}

fn debezium(view: &FeatureView, json: &Value) -> Result<Vec<(Direction, Event)>, Poison> {
    // With `schemas.enable=true` the envelope sits under "payload".
    let envelope = match json.as_object() {
        Some(o) if o.contains_key("schema") && o.contains_key("payload") => &o["payload"],
        _ => json,
    };
    if envelope.is_null() {
        return Ok(Vec::new());
    }
    let envelope = object(envelope, "envelope")?;
    let op = envelope.get("op").and_then(Value::as_str).ok_or_else(|| Poison::new(INVALID_ENVELOPE, "Debezium envelope has no \"op\""))?;
    let image = |name: &str| -> Result<Event, Poison> {
        let row = envelope.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
            Poison::new(
                INVALID_ENVELOPE,
                format!("op {op:?} needs {name:?}, which is missing (for updates and deletes: REPLICA IDENTITY FULL?)"),
            )
        })?;
        event(view, object(row, name)?)
    };
    Ok(match op {
        "c" | "r" => vec![(Direction::Add, image("after")?)],
        "u" => match view.source.on_update {
            UpdatePolicy::Ignore => Vec::new(),
            UpdatePolicy::Apply => vec![(Direction::Add, image("after")?)],
            UpdatePolicy::Replace => vec![(Direction::Retract, image("before")?), (Direction::Add, image("after")?)],
        },
        "d" => match view.source.on_delete {
            DeletePolicy::Ignore => Vec::new(),
            DeletePolicy::Retract => vec![(Direction::Retract, image("before")?)],
        },
        "t" | "m" => Vec::new(),
        other => {
            return Err(Poison::new(INVALID_ENVELOPE, format!("unknown Debezium op {other:?}")));
        }
    })
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Poison> {
    value.as_object().ok_or_else(|| Poison::new(INVALID_ENVELOPE, format!("{what} is not a JSON object")))
}

/// Reads the fields `view` needs from one row image or plain event.
fn event(view: &FeatureView, row: &Map<String, Value>) -> Result<Event, Poison> {
    let entity = match (row.get(&view.entity), view.entity_type) {
        (None | Some(Value::Null), _) => {
            return Err(Poison::new(MISSING_FIELD, format!("entity key field {:?} is missing or null", view.entity)));
        }
        (Some(v), KeyType::Int64) => v.as_i64().map(|i| i.to_string()).ok_or_else(|| wrong(&view.entity, "an int64 entity key", v))?,
        (Some(Value::String(s)), KeyType::String) => s.clone(),
        (Some(v), KeyType::String) => return Err(wrong(&view.entity, "a string entity key", v)),
    };
    let at_ms = match row.get(&view.source.event_time) {
        None | Some(Value::Null) => {
            return Err(Poison::new(MISSING_FIELD, format!("event time field {:?} is missing or null", view.source.event_time)));
        }
        Some(v) => time(v).ok_or_else(|| wrong(&view.source.event_time, "an RFC 3339 time or epoch milliseconds", v))?,
    };
    let mut fields = BTreeMap::new();
    for feature in &view.features {
        let Some(name) = &feature.field else { continue };
        if let Some(v) = row.get(name) {
            fields.insert(name.clone(), scalar(name, feature.field_type, v)?);
        }
    }
    Ok(Event { entity, at_ms, fields })
}

fn scalar(name: &str, expected: ValueType, v: &Value) -> Result<Scalar, Poison> {
    let typed = match (expected, v) {
        (_, Value::Null) => Some(Scalar::Null),
        (ValueType::Int64, v) => v.as_i64().map(Scalar::Int),
        // Debezium sends NUMERIC as a string with decimal.handling.mode=string.
        (ValueType::Double, Value::String(s)) => s.parse::<f64>().ok().filter(|d| d.is_finite()).map(Scalar::Double),
        (ValueType::Double, v) => v.as_f64().map(Scalar::Double),
        (ValueType::String, Value::String(s)) => Some(Scalar::Str(s.clone())),
        (ValueType::Bool, Value::Bool(b)) => Some(Scalar::Bool(*b)),
        (ValueType::Timestamp, v) => time(v).map(Scalar::Time),
        _ => None,
    };
    let expected = match expected {
        ValueType::Int64 => "int64",
        ValueType::Double => "double",
        ValueType::String => "string",
        ValueType::Bool => "bool",
        ValueType::Timestamp => "timestamp",
    };
    typed.ok_or_else(|| wrong(name, expected, v))
}

fn time(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis()),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn wrong(field: &str, expected: &str, got: &Value) -> Poison {
    let mut shown = got.to_string();
    shown.truncate(80);
    Poison::new(WRONG_TYPE, format!("field {field:?}: expected {expected}, got {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_store::view::Catalog;

    fn views() -> Catalog {
        Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap()
    }

    fn decode_str(view: &str, text: &str) -> Result<Vec<(Direction, Event)>, Poison> {
        let c = views();
        decode(c.view(view).unwrap(), Some(text.as_bytes()))
    }

    const ROW: &str =
        r#"{"event_id": 9, "user_id": 42, "event_type": "click", "occurred_at": "2026-11-25T10:00:00.250Z", "new_column": [1,2]}"#;

    #[test]
    fn debezium_create_with_and_without_schema_wrapper() {
        let bare = format!(r#"{{"before": null, "after": {ROW}, "op": "c", "ts_ms": 1}}"#);
        let wrapped = format!(r#"{{"schema": {{"type": "struct"}}, "payload": {bare}}}"#);
        for text in [bare, wrapped] {
            let changes = decode_str("user_activity", &text).unwrap();
            assert_eq!(changes.len(), 1);
            let (direction, event) = &changes[0];
            assert_eq!(*direction, Direction::Add);
            assert_eq!(event.entity, "42");
            assert_eq!(event.at_ms, 1_795_600_800_250);
            assert_eq!(event.fields["event_type"], Scalar::Str("click".into()));
            assert_eq!(event.fields["occurred_at"], Scalar::Time(1_795_600_800_250));
        }
    }

    #[test]
    fn policies_for_updates_deletes_and_tombstones() {
        let update = format!(r#"{{"before": {ROW}, "after": {ROW}, "op": "u"}}"#);
        assert!(decode_str("user_activity", &update).unwrap().is_empty(), "user_activity ignores updates");
        let delete = format!(r#"{{"before": {ROW}, "after": null, "op": "d"}}"#);
        let changes = decode_str("user_activity", &delete).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, Direction::Retract);
        assert!(
            decode_str("orders", r#"{"before": {"user_id": 1}, "after": null, "op": "d"}"#).unwrap().is_empty(),
            "orders ignores deletes"
        );
        let c = views();
        assert!(decode(c.view("user_activity").unwrap(), None).unwrap().is_empty(), "tombstone");
        assert!(decode_str("user_activity", r#"{"schema": null, "payload": null}"#).unwrap().is_empty());
        let no_before = r#"{"before": null, "after": null, "op": "d"}"#;
        assert_eq!(decode_str("user_activity", no_before).unwrap_err().class, INVALID_ENVELOPE);
    }

    #[test]
    fn numeric_fields_accept_numbers_and_decimal_strings() {
        let order = |amount: &str| {
            format!(
                r#"{{"after": {{"user_id": 1, "amount": {amount}, "items": 3, "express": true, "ordered_at": 1700000000000}}, "op": "c"}}"#
            )
        };
        let e = &decode_str("orders", &order("12.5")).unwrap()[0].1;
        assert_eq!(e.fields["amount"], Scalar::Double(12.5));
        assert_eq!(e.fields["items"], Scalar::Int(3));
        assert_eq!(e.fields["express"], Scalar::Bool(true));
        assert_eq!(e.at_ms, 1_700_000_000_000);
        assert_eq!(decode_str("orders", &order("\"99.95\"")).unwrap()[0].1.fields["amount"], Scalar::Double(99.95));
        assert_eq!(decode_str("orders", &order("null")).unwrap()[0].1.fields["amount"], Scalar::Null);
    }

    #[test]
    fn poison_says_what_is_wrong() {
        let e = decode_str("user_activity", "{not json").unwrap_err();
        assert_eq!(e.class, INVALID_JSON);
        let e = decode_str("user_activity", r#"{"after": {"occurred_at": "2026-11-25T10:00:00Z"}, "op": "c"}"#).unwrap_err();
        assert_eq!(e.class, MISSING_FIELD);
        assert!(e.message.contains("user_id"));
        let e = decode_str("user_activity", r#"{"after": {"user_id": 1}, "op": "c"}"#).unwrap_err();
        assert!(e.message.contains("occurred_at"));
        let e = decode_str("user_activity", r#"{"after": {"user_id": "x", "occurred_at": 1}, "op": "c"}"#).unwrap_err();
        assert_eq!(e.class, WRONG_TYPE);
        let e = decode_str("orders", r#"{"after": {"user_id": 1, "ordered_at": 1, "amount": "lots"}, "op": "c"}"#).unwrap_err();
        assert!(e.message.contains("amount") && e.message.contains("double"), "{e}");
        let e = decode_str("user_activity", r#"{"after": {"user_id": 1, "occurred_at": "yesterday"}, "op": "c"}"#).unwrap_err();
        assert_eq!(e.class, WRONG_TYPE);
        assert_eq!(decode_str("user_activity", r#"{"op": "x"}"#).unwrap_err().class, INVALID_ENVELOPE);
        assert_eq!(decode_str("user_activity", r#"[1]"#).unwrap_err().class, INVALID_ENVELOPE);
    }
}
