//! Where a record becomes events: decoding a Kafka record's value into the
//! changes it makes to one feature view.
//!
//! Two formats: Debezium change events (the `{before, after, source, op}`
//! envelope, optionally wrapped in the JSON converter's `{schema, payload}`)
//! and plain JSON events. Fields a view does not read are ignored, so a
//! column added upstream changes nothing. Anything that cannot be decoded is
//! a [`Poison`] with a class and a message, bound for the dead-letter topic.
//!
//! Hostile input is poison too, never a panic: keys the server could not
//! serve back (`freshet_store::key`), times outside years 1 to 9999 (what a
//! protobuf `Timestamp` holds), and events dated further ahead of their
//! record than the view's `max_future`, which would otherwise move the
//! partition's lateness reference and push every later event out of windows.
//! Messages quote at most a short prefix of the input, cut between characters.

use std::{borrow::Cow, collections::BTreeMap};

use chrono::{DateTime, SecondsFormat, Utc};
use freshet_store::{
    key,
    state::{Direction, Event, Scalar},
    view::{Catalog, DeletePolicy, FeatureView, Format, KeyType, UpdatePolicy, ValueType, duration},
};
use serde_json::value::RawValue;

use super::{apply::Change, object::Object};

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
pub const INVALID_KEY: &str = "freshet.decode.InvalidKey";
pub const FUTURE_EVENT_TIME: &str = "freshet.decode.FutureEventTime";

/// Event times a protobuf `Timestamp` can carry: 0001-01-01 to 9999-12-31.
const MIN_TIME_MS: i64 = -62_135_596_800_000;
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// How much of a value a message quotes.
const QUOTED_BYTES: usize = 80;

/// What one record makes of every view of its topic: the changes, in view
/// order (the catalog index of each), or why it is poison and which
/// dead-letter topic it goes to.
pub type Decoded = Result<Vec<Change>, (Poison, String)>;

/// Decodes a record of `topic` for every view that reads it.
pub fn decode_record(catalog: &Catalog, topic: &str, value: Option<&[u8]>, record_ms: Option<i64>) -> Decoded {
    let mut changes = Vec::new();
    for (index, view) in catalog.views.iter().enumerate() {
        if !view.source.topics.iter().any(|t| t == topic) {
            continue;
        }
        match decode(view, value, record_ms) {
            Ok(c) => changes.extend(c.into_iter().map(|(d, e)| (index, d, e))),
            Err(p) => return Err((p, view.dlq_topic(topic))),
        }
    }
    Ok(changes)
}

/// The changes one record makes to `view`, in the order to apply them.
/// Tombstones, truncates and ignored updates or deletes make none.
/// `record_ms` is the record's Kafka timestamp, the reference for
/// `max_future` (so a replay decides the same); only a record without one is
/// judged against the wall clock.
pub fn decode(view: &FeatureView, value: Option<&[u8]>, record_ms: Option<i64>) -> Result<Vec<(Direction, Event)>, Poison> {
    let Some(bytes) = value else {
        return Ok(Vec::new());
    };
    let what = match view.source.format {
        Format::Json => "value",
        Format::Debezium | Format::Postgres => "envelope",
    };
    let top = serde_json::from_slice::<Option<Object>>(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => not_an_object(what),
        _ => Poison::new(INVALID_JSON, format!("value is not JSON: {e}")),
    })?;
    let record_ms = record_ms.unwrap_or_else(|| Utc::now().timestamp_millis());
    match (view.source.format, top) {
        (Format::Json, Some(row)) => Ok(vec![(Direction::Add, event(view, &row, record_ms)?)]),
        (Format::Json, None) => Err(not_an_object(what)),
        // A Postgres row change arrives as the envelope Debezium would have
        // sent for it (`source::postgres::rows`).
        (Format::Debezium | Format::Postgres, Some(envelope)) => debezium(view, envelope, record_ms),
        (Format::Debezium | Format::Postgres, None) => Ok(Vec::new()),
    }
}

fn debezium(view: &FeatureView, mut envelope: Object<'_>, record_ms: i64) -> Result<Vec<(Direction, Event)>, Poison> {
    // With `schemas.enable=true` the envelope sits under "payload".
    if let (Some(_), Some(payload)) = (envelope.get("schema"), envelope.get("payload")) {
        match object(payload, "envelope")? {
            Some(payload) => envelope = payload,
            None => return Ok(Vec::new()),
        }
    }
    let op = envelope.get("op").and_then(text).ok_or_else(|| Poison::new(INVALID_ENVELOPE, "Debezium envelope has no \"op\""))?;
    let image = |name: &str| -> Result<Event, Poison> {
        let missing = || {
            Poison::new(
                INVALID_ENVELOPE,
                format!("op {op:?} needs {name:?}, which is missing (for updates and deletes: REPLICA IDENTITY FULL?)"),
            )
        };
        let row = envelope.get(name).ok_or_else(missing)?;
        event(view, &object(row, name)?.ok_or_else(missing)?, record_ms)
    };
    Ok(match &*op {
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
            return Err(Poison::new(INVALID_ENVELOPE, format!("unknown Debezium op {}", quote(other))));
        }
    })
}

/// `value` as an object (`None` for `null`).
fn object<'a>(value: &'a RawValue, what: &str) -> Result<Option<Object<'a>>, Poison> {
    serde_json::from_str::<Option<Object<'a>>>(value.get()).map_err(|_| not_an_object(what))
}

fn not_an_object(what: &str) -> Poison {
    Poison::new(INVALID_ENVELOPE, format!("{what} is not a JSON object"))
}

/// The value as text, if it is a string: borrowed unless it holds escapes.
fn text(value: &RawValue) -> Option<Cow<'_, str>> {
    match serde_json::from_str::<&str>(value.get()) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(value.get()).ok().map(Cow::Owned),
    }
}

/// The value if it is a JSON integer that fits an i64 (not `1.0`, not `"1"`).
fn int(value: &RawValue) -> Option<i64> {
    serde_json::from_str::<i64>(value.get()).ok()
}

fn is_null(value: &RawValue) -> bool {
    value.get() == "null"
}

/// Reads the fields `view` needs from one row image or plain event.
fn event(view: &FeatureView, row: &Object<'_>, record_ms: i64) -> Result<Event, Poison> {
    let entity = match (row.get(&view.entity).filter(|v| !is_null(v)), view.entity_type) {
        (None, _) => {
            return Err(Poison::new(MISSING_FIELD, format!("entity key field {:?} is missing or null", view.entity)));
        }
        (Some(v), KeyType::Int64) => int(v).map(|i| i.to_string()).ok_or_else(|| wrong(&view.entity, "an int64 entity key", v))?,
        (Some(v), KeyType::String) => {
            let s = text(v).ok_or_else(|| wrong(&view.entity, "a string entity key", v))?;
            key::check_string_key(&s).map_err(|m| Poison::new(INVALID_KEY, format!("entity key field {:?}: {m}", view.entity)))?;
            s.into_owned()
        }
    };
    let at_ms = match row.get(&view.source.event_time).filter(|v| !is_null(v)) {
        None => {
            return Err(Poison::new(MISSING_FIELD, format!("event time field {:?} is missing or null", view.source.event_time)));
        }
        Some(v) => time(v).ok_or_else(|| wrong(&view.source.event_time, TIME, v))?,
    };
    let max_future = view.max_future.as_millis() as i64;
    if at_ms.saturating_sub(record_ms) > max_future {
        return Err(Poison::new(
            FUTURE_EVENT_TIME,
            format!(
                "event time field {:?} is {}, more than max_future ({}) ahead of the record's timestamp {}",
                view.source.event_time,
                rfc3339(at_ms),
                duration::format(view.max_future),
                rfc3339(record_ms),
            ),
        ));
    }
    let mut fields = BTreeMap::new();
    for feature in &view.features {
        let Some(name) = &feature.field else { continue };
        if let Some(v) = row.get(name) {
            fields.insert(name.clone(), scalar(name, feature.field_type, v)?);
        }
    }
    Ok(Event { entity, at_ms, fields })
}

fn scalar(name: &str, expected: ValueType, v: &RawValue) -> Result<Scalar, Poison> {
    let typed = match expected {
        _ if is_null(v) => Some(Scalar::Null),
        ValueType::Int64 => int(v).map(Scalar::Int),
        // Debezium sends NUMERIC as a string with decimal.handling.mode=string.
        ValueType::Double => match text(v) {
            Some(s) => s.parse::<f64>().ok(),
            None => serde_json::from_str::<f64>(v.get()).ok(),
        }
        .filter(|d| d.is_finite())
        .map(Scalar::Double),
        ValueType::String => text(v).map(|s| Scalar::Str(s.into_owned())),
        ValueType::Bool => serde_json::from_str::<bool>(v.get()).ok().map(Scalar::Bool),
        ValueType::Timestamp => time(v).map(Scalar::Time),
    };
    let expected = match expected {
        ValueType::Int64 => "int64",
        ValueType::Double => "double",
        ValueType::String => "string",
        ValueType::Bool => "bool",
        ValueType::Timestamp => TIME,
    };
    typed.ok_or_else(|| wrong(name, expected, v))
}

const TIME: &str = "an RFC 3339 time or epoch milliseconds, in years 1 to 9999";

fn time(v: &RawValue) -> Option<i64> {
    let ms = match text(v) {
        Some(s) => DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_millis()),
        None => int(v),
    }?;
    (MIN_TIME_MS..=MAX_TIME_MS).contains(&ms).then_some(ms)
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn wrong(field: &str, expected: &str, got: &RawValue) -> Poison {
    Poison::new(WRONG_TYPE, format!("field {field:?}: expected {expected}, got {}", prefix(got.get())))
}

/// `text` quoted, cut to a short prefix if long.
fn quote(text: &str) -> String {
    format!("{:?}", prefix(text))
}

/// At most [`QUOTED_BYTES`] of `text`, cut between characters, marked if cut.
fn prefix(text: &str) -> String {
    if text.len() <= QUOTED_BYTES {
        return text.to_string();
    }
    format!("{}…", &text[..text.floor_char_boundary(QUOTED_BYTES)])
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_store::view::Catalog;

    fn views() -> Catalog {
        Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap()
    }

    fn decode_str(view: &str, text: &str) -> Result<Vec<(Direction, Event)>, Poison> {
        let c = views();
        decode(c.view(view).unwrap(), Some(text.as_bytes()), Some(RECORD_MS))
    }

    /// The Kafka timestamp of the test records: 2026-11-25T10:05:00Z.
    const RECORD_MS: i64 = 1_795_601_100_000;

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
        assert!(decode(c.view("user_activity").unwrap(), None, Some(RECORD_MS)).unwrap().is_empty(), "tombstone");
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

    fn create(row: &str) -> String {
        format!(r#"{{"before": null, "after": {row}, "op": "c"}}"#)
    }

    /// Wrong types quoting multi-byte text are cut between characters, with
    /// the cut falling at every byte of a 2-, 3- and 4-byte character.
    #[test]
    fn wrong_types_with_multi_byte_text_are_poison_not_panics() {
        for c in ['é', '✓', '😀'] {
            for pad in 0..4 {
                for n in 0..40 {
                    let text: String = "a".repeat(pad) + &c.to_string().repeat(n);
                    let rows =
                        [format!(r#"{{"user_id": "{text}", "occurred_at": 1}}"#), format!(r#"{{"user_id": 1, "occurred_at": "{text}"}}"#)];
                    for row in &rows {
                        let e = decode_str("user_activity", &create(row)).unwrap_err();
                        assert_eq!(e.class, WRONG_TYPE, "{row}");
                        assert!(e.message.len() < 200, "{}", e.message);
                        let quoted = e.message.split("got ").nth(1).unwrap();
                        // The quote is the JSON text of the value, whole or cut and marked.
                        let whole = format!("\"{text}\"");
                        assert!(quoted == whole || (quoted.ends_with('…') && whole.starts_with(quoted.trim_end_matches('…'))), "{quoted}");
                    }
                    let order = format!(r#"{{"user_id": 1, "ordered_at": 1, "amount": "{text}"}}"#);
                    assert_eq!(decode_str("orders", &create(&order)).unwrap_err().class, WRONG_TYPE);
                    let op = format!(r#"{{"op": "{text}"}}"#);
                    let e = decode_str("orders", &op).unwrap_err();
                    assert!(e.class == INVALID_ENVELOPE && e.message.len() < 200, "{e}");
                }
            }
        }
    }

    #[test]
    fn an_event_too_far_ahead_of_its_record_is_poison() {
        let at = |time: &str| create(&format!(r#"{{"user_id": 1, "occurred_at": {time}}}"#));
        // Up to max_future (5m, the default) ahead of the record is fine.
        let edge = RECORD_MS + 300_000;
        assert_eq!(decode_str("user_activity", &at(&edge.to_string())).unwrap()[0].1.at_ms, edge);
        let e = decode_str("user_activity", &at(&(edge + 1).to_string())).unwrap_err();
        assert_eq!(e.class, FUTURE_EVENT_TIME);
        let e = decode_str("user_activity", &at("\"2100-01-01T00:00:00Z\"")).unwrap_err();
        assert_eq!(e.class, FUTURE_EVENT_TIME);
        assert_eq!(
            e.message,
            "event time field \"occurred_at\" is 2100-01-01T00:00:00.000Z, more than max_future (5m) ahead of the record's timestamp 2026-11-25T10:05:00.000Z"
        );
        // Long past is no concern of max_future (lateness handles it).
        assert!(decode_str("user_activity", &at("0")).is_ok());
        // Without a record timestamp, the wall clock is the reference.
        let c = views();
        let view = c.view("user_activity").unwrap();
        assert_eq!(decode(view, Some(at("9000000000000000").as_bytes()), None).unwrap_err().class, WRONG_TYPE, "past year 9999");
        assert_eq!(decode(view, Some(at("\"2100-01-01T00:00:00Z\"").as_bytes()), None).unwrap_err().class, FUTURE_EVENT_TIME);
        assert!(decode(view, Some(at("\"2026-01-01T00:00:00Z\"").as_bytes()), None).is_ok());
    }

    #[test]
    fn times_outside_years_1_to_9999_are_wrong_types() {
        let at = |time: &str| create(&format!(r#"{{"user_id": 1, "occurred_at": {time}}}"#));
        for time in ["-62135596800001", "9223372036854775807", "-9223372036854775808", "\"0000-12-31T23:59:59Z\"", "1e3"] {
            let e = decode_str("user_activity", &at(time)).unwrap_err();
            assert_eq!(e.class, WRONG_TYPE, "{time}");
            assert!(e.message.contains("years 1 to 9999"), "{e}");
        }
        assert_eq!(decode_str("user_activity", &at("-62135596800000")).unwrap()[0].1.at_ms, MIN_TIME_MS);
        assert_eq!(decode_str("user_activity", &at("\"0001-01-01T00:00:00Z\"")).unwrap()[0].1.at_ms, MIN_TIME_MS);
        // Timestamp fields obey the same bound.
        let row =
            r#"{"user_id": 1, "occurred_at": 1, "event_type": "x"}"#.replace("\"occurred_at\": 1", "\"occurred_at\": 253402300800000");
        assert_eq!(decode_str("user_activity", &create(&row)).unwrap_err().class, WRONG_TYPE);
    }

    /// Ingest stores only keys the server serves (`freshet_store::key`).
    #[test]
    fn string_keys_the_server_would_refuse_are_poison() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml")).unwrap();
        let c = Catalog::parse(&text.replacen("entity_type = \"int64\"", "entity_type = \"string\"", 1), "v").unwrap();
        let decode_key = |key: &str| {
            let row = serde_json::json!({"after": {"user_id": key, "occurred_at": 1}, "op": "c"}).to_string();
            decode(c.view("user_activity").unwrap(), Some(row.as_bytes()), Some(RECORD_MS))
        };
        let longest = "✓".repeat(341) + "x";
        assert_eq!(decode_key(&longest).unwrap()[0].1.entity, longest);
        for (key, len) in [(String::new(), 0), ("k".repeat(1025), 1025), ("é".repeat(750), 1500)] {
            let e = decode_key(&key).unwrap_err();
            assert_eq!(e.class, INVALID_KEY);
            assert_eq!(e.message, format!("entity key field \"user_id\": string keys must be 1 to 1024 bytes, this one has {len}"));
        }
    }
}
