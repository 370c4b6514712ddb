//! From a row change of a source table to the changes it makes to the views
//! reading the table: the same path as a Debezium event.
//!
//! Each column's text is turned into the JSON value Debezium would have
//! sent (numbers as numbers, booleans as booleans, times as epoch
//! milliseconds), the row change into a Debezium envelope (`op` `c`, `u`,
//! `d`, or `r` for a snapshot row), and `decode` applies the
//! view's `on_update` / `on_delete` policy and reads the fields. So a
//! column a view does not read is ignored whatever its type (ADD and DROP
//! COLUMN change nothing), and a read column whose values no longer fit the
//! feature's type (a type change) makes its rows poison, dead-lettered with
//! the raw tuple. An old image with only key columns (`REPLICA IDENTITY
//! DEFAULT`) counts as missing, so retractions fail with the message that
//! asks for `REPLICA IDENTITY FULL`.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use freshet_store::view::Catalog;
use serde_json::{Map, Number, Value, json};

use super::pgoutput::{Datum, OldRow, Relation};
use crate::transform::{
    apply::Change,
    decode::{Poison, decode},
};

/// A row change of one table, as its images.
pub enum RowChange<'a> {
    Insert(&'a [Datum]),
    /// A row read by the initial snapshot.
    Read(&'a [Datum]),
    Update(Option<&'a OldRow>, &'a [Datum]),
    Delete(&'a OldRow),
}

/// What a row change makes of `views` (catalog indexes), or why it is
/// poison, with the raw row change as JSON text for the dead-letter table.
pub fn changes(
    catalog: &Catalog,
    views: &[usize],
    relation: &Relation,
    row: &RowChange,
    commit_ms: i64,
) -> Result<Vec<Change>, (Poison, String)> {
    let (op, before, after) = match *row {
        RowChange::Insert(new) => ("c", None, Some(new)),
        RowChange::Read(new) => ("r", None, Some(new)),
        RowChange::Update(old, new) => ("u", full(old), Some(new)),
        RowChange::Delete(old) => ("d", full(Some(old)), None),
    };
    let image = |d: Option<&[Datum]>, typed: bool| d.map_or(Value::Null, |d| Value::Object(object(relation, d, typed)));
    let envelope = json!({"op": op, "before": image(before, true), "after": image(after, true)}).to_string();
    let mut out = Vec::new();
    for &index in views {
        match decode(&catalog.views[index], Some(envelope.as_bytes()), Some(commit_ms)) {
            Ok(c) => out.extend(c.into_iter().map(|(d, e)| (index, d, e))),
            Err(poison) => {
                let raw = json!({"table": format!("{}.{}", relation.schema, relation.name), "op": op, "before": image(before, false), "after": image(after, false)});
                return Err((poison, raw.to_string()));
            }
        }
    }
    Ok(out)
}

/// An old image only counts when it is the whole row.
fn full(old: Option<&OldRow>) -> Option<&[Datum]> {
    match old {
        Some(OldRow::Full(d)) => Some(d),
        _ => None,
    }
}

/// The row as a JSON object: typed values, or the raw text. Unchanged
/// TOASTed values are left out (a view reading one sees it missing).
fn object(relation: &Relation, data: &[Datum], typed: bool) -> Map<String, Value> {
    relation
        .columns
        .iter()
        .zip(data)
        .filter_map(|(column, datum)| {
            let value = match datum {
                Datum::Unchanged => return None,
                Datum::Null => Value::Null,
                Datum::Text(t) if typed => value(column.type_oid, t),
                Datum::Text(t) => Value::String(t.clone()),
            };
            Some((column.name.clone(), value))
        })
        .collect()
}

const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;

/// A column's text output as the JSON value decode expects; text that does
/// not parse stays text (decode then says which field has the wrong type).
fn value(type_oid: u32, text: &str) -> Value {
    let parsed = match type_oid {
        BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        INT2 | INT4 | INT8 | OID => text.parse::<i64>().ok().map(Value::from),
        // NaN and infinities stay text: decode refuses them as doubles.
        FLOAT4 | FLOAT8 => text.parse::<f64>().ok().and_then(Number::from_f64).map(Value::Number),
        // Integral numerics may feed int64 features; others stay decimal text.
        NUMERIC => text.parse::<i64>().ok().map(Value::from),
        TIMESTAMPTZ => DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z").ok().map(|t| Value::from(t.timestamp_millis())),
        TIMESTAMP => NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok().map(|t| Value::from(t.and_utc().timestamp_millis())),
        DATE => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .map(|d| Value::from(d.and_time(Default::default()).and_utc().timestamp_millis())),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use freshet_store::state::{Direction, Scalar};

    use super::{super::pgoutput::Column, *};
    use crate::transform::decode::WRONG_TYPE;

    fn catalog() -> Catalog {
        Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap()
    }

    fn relation(columns: &[(&str, u32)]) -> Relation {
        Relation {
            oid: 1,
            schema: "public".into(),
            name: "user_events".into(),
            replica_identity: b'f',
            columns: columns.iter().map(|(n, t)| Column { name: n.to_string(), type_oid: *t }).collect(),
        }
    }

    fn text(values: &[&str]) -> Vec<Datum> {
        values.iter().map(|v| Datum::Text(v.to_string())).collect()
    }

    #[test]
    fn column_text_becomes_the_values_debezium_sends() {
        assert_eq!(value(TIMESTAMPTZ, "2026-11-25 10:00:00.25+00"), json!(1_795_600_800_250i64));
        assert_eq!(value(TIMESTAMPTZ, "2026-11-25 11:00:00+01"), json!(1_795_600_800_000i64));
        assert_eq!(value(TIMESTAMP, "2026-11-25 10:00:00"), json!(1_795_600_800_000i64));
        assert_eq!(value(INT8, "-42"), json!(-42));
        assert_eq!(value(FLOAT8, "12.5"), json!(12.5));
        assert_eq!(value(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(value(NUMERIC, "99.95"), json!("99.95"));
        assert_eq!(value(BOOL, "t"), json!(true));
        assert_eq!(value(25, "click"), json!("click"));
    }

    #[test]
    fn row_changes_follow_the_view_policies() {
        let catalog = catalog();
        let v = catalog.views.iter().position(|v| v.name == "user_activity").unwrap();
        let rel = relation(&[("user_id", INT8), ("event_type", 25), ("occurred_at", TIMESTAMPTZ), ("added_later", 3802)]);
        let row = text(&["7", "click", "2026-11-25 10:00:00+00", "{\"x\": 1}"]);
        let commit_ms = 1_795_600_800_000;
        let inserted = changes(&catalog, &[v], &rel, &RowChange::Insert(&row), commit_ms).unwrap();
        assert_eq!(inserted.len(), 1);
        assert_eq!((inserted[0].1, inserted[0].2.entity.as_str()), (Direction::Add, "7"));
        assert_eq!(inserted[0].2.fields["event_type"], Scalar::Str("click".into()));
        // user_activity ignores updates and retracts deletes.
        let old = OldRow::Full(row.clone());
        assert!(changes(&catalog, &[v], &rel, &RowChange::Update(Some(&old), &row), commit_ms).unwrap().is_empty());
        assert_eq!(changes(&catalog, &[v], &rel, &RowChange::Delete(&old), commit_ms).unwrap()[0].1, Direction::Retract);
        // A key-only old image cannot be retracted, and says why.
        let key_only = OldRow::Key(vec![Datum::Text("7".into()), Datum::Null, Datum::Null, Datum::Null]);
        let (poison, raw) = changes(&catalog, &[v], &rel, &RowChange::Delete(&key_only), commit_ms).unwrap_err();
        assert!(poison.message.contains("REPLICA IDENTITY FULL"), "{poison}");
        assert!(raw.contains("\"op\":\"d\"") && raw.contains("public.user_events"), "{raw}");
    }

    #[test]
    fn a_read_column_of_another_type_is_poison_with_its_raw_row() {
        let catalog = catalog();
        let v = catalog.views.iter().position(|v| v.name == "orders").unwrap();
        let rel = relation(&[("user_id", INT8), ("amount", 25), ("ordered_at", TIMESTAMPTZ)]);
        let row = text(&["7", "lots", "2026-11-25 10:00:00+00"]);
        let (poison, raw) = changes(&catalog, &[v], &rel, &RowChange::Insert(&row), 1_795_600_800_000).unwrap_err();
        assert_eq!(poison.class, WRONG_TYPE);
        assert!(poison.message.contains("amount"), "{poison}");
        assert!(raw.contains("\"amount\":\"lots\"") && raw.contains("\"ordered_at\":\"2026-11-25 10:00:00+00\""), "{raw}");
    }
}
