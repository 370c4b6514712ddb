//! Properties of the record decoder on arbitrary and adversarial records:
//! it never panics, every refusal is poison of a known class with a short
//! message, whatever it accepts is safe to apply (keys the server can serve,
//! times a protobuf `Timestamp` holds, nothing beyond `max_future`), and
//! doubles decode to the exact `f64` of their text. `PROPTEST_CASES` sets the
//! number of cases (256 by default); the bench runner can ask for more.

use freshet_store::view::Catalog;
use proptest::{collection::vec, prelude::*};
use serde_json::{Map, Value, json};

use super::*;

/// The reference views, and `user_activity` keyed by strings.
fn catalog() -> Catalog {
    let text = include_str!("../../../../deploy/views/reference.toml");
    let mut catalog = Catalog::parse(text, "reference").unwrap();
    let mut by_string =
        Catalog::parse(&text.replacen("entity_type = \"int64\"", "entity_type = \"string\"", 1), "s").unwrap().views.remove(0);
    by_string.name = "by_string".into();
    catalog.views.push(by_string);
    catalog
}

/// Text of every width: ASCII, 2-, 3- and 4-byte characters, controls, NUL.
fn text(max: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![any::<char>(), prop::sample::select(vec!['é', '✓', '😀', '\0', '"', '\\'])];
    vec(ch, 0..max).prop_map(|c| c.into_iter().collect())
}

/// Multi-byte text placed so that any cut falls at every byte of a character.
fn multi_byte() -> impl Strategy<Value = String> {
    (0usize..4, prop::sample::select(vec!['é', '✓', '😀']), 0usize..60).prop_map(|(pad, c, n)| "a".repeat(pad) + &c.to_string().repeat(n))
}

/// Numbers at and past every edge a decoder might trip on.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![i64::MIN, i64::MAX, 0, -1, MIN_TIME_MS - 1, MIN_TIME_MS, MAX_TIME_MS, MAX_TIME_MS + 1])
            .prop_map(Value::from),
    ]
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text(24).prop_map(Value::from),
        multi_byte().prop_map(Value::from),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((text(8), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A row image: a valid one with some fields replaced, dropped or added.
fn row() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec!["user_id", "occurred_at", "event_type", "amount", "items", "express", "ordered_at", "other"]);
    vec((field, prop::option::of(json_value())), 0..4).prop_map(|edits| {
        let mut row = json!({"user_id": 7, "occurred_at": "2026-11-25T10:00:00Z", "event_type": "click",
            "amount": 12.5, "items": 2, "express": false, "ordered_at": 1_795_600_000_000i64});
        let row_map = row.as_object_mut().unwrap();
        for (name, value) in edits {
            match value {
                Some(v) => row_map.insert(name.to_string(), v),
                None => row_map.remove(name),
            };
        }
        row
    })
}

/// A record value: a Debezium envelope (sometimes wrapped, sometimes not an
/// object at all), a plain event, or a huge or deeply nested document.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![prop::sample::select(vec!["c", "r", "u", "d", "t", "m"]).prop_map(Value::from), json_value()];
    let envelope = (op, prop::option::of(row()), prop::option::of(row()), any::<bool>()).prop_map(|(op, before, after, wrapped)| {
        let mut e = Map::new();
        e.insert("op".into(), op);
        e.insert("before".into(), before.unwrap_or(Value::Null));
        e.insert("after".into(), after.unwrap_or(Value::Null));
        let e = Value::Object(e);
        if wrapped { json!({"schema": {}, "payload": e}) } else { e }
    });
    prop_oneof![
        4 => envelope.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        2 => row().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => vec(any::<u8>(), 0..256),
        1 => (1usize..5000).prop_map(|d| format!(r#"{{"op": "c", "after": {}1{}}}"#, "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => (1usize..300_000).prop_map(|n| json!({"op": "c", "after": {"user_id": "é".repeat(n), "occurred_at": "x".repeat(n)}}).to_string().into_bytes()),
    ]
}

const CLASSES: [&str; 6] = [INVALID_JSON, INVALID_ENVELOPE, MISSING_FIELD, WRONG_TYPE, INVALID_KEY, FUTURE_EVENT_TIME];

proptest! {
    #[test]
    fn any_record_decodes_to_safe_events_or_clear_poison(
        bytes in record(),
        view in 0usize..3,
        record_ms in prop::option::of(prop_oneof![Just(1_795_601_100_000i64), any::<i64>()]),
    ) {
        let catalog = catalog();
        let view = &catalog.views[view];
        match decode(view, Some(&bytes), record_ms) {
            Ok(changes) => {
                for (_, event) in changes {
                    match view.entity_type {
                        KeyType::Int64 => prop_assert!(event.entity.parse::<i64>().is_ok()),
                        KeyType::String => prop_assert!(key::check_string_key(&event.entity).is_ok()),
                    }
                    prop_assert!((MIN_TIME_MS..=MAX_TIME_MS).contains(&event.at_ms));
                    if let Some(record_ms) = record_ms {
                        prop_assert!(event.at_ms.saturating_sub(record_ms) <= view.max_future.as_millis() as i64);
                    }
                    for value in event.fields.values() {
                        if let Scalar::Time(ms) = value {
                            prop_assert!((MIN_TIME_MS..=MAX_TIME_MS).contains(ms));
                        }
                        if let Scalar::Double(d) = value {
                            prop_assert!(d.is_finite());
                        }
                    }
                }
            }
            Err(poison) => {
                prop_assert!(CLASSES.contains(&poison.class), "{}", poison.class);
                prop_assert!(!poison.message.is_empty() && poison.message.len() <= 400, "{} bytes: {}", poison.message.len(), prefix(&poison.message));
            }
        }
    }

    /// Every double decodes to the exact `f64` of its text (serde_json's
    /// `float_roundtrip`), as a JSON number or as Debezium's decimal string.
    /// 64 texts a case: shortest, exponent and 17-digit forms of random
    /// doubles, and random decimal texts of up to 25 digits.
    #[test]
    fn doubles_decode_to_the_exact_f64_of_their_text(
        bits in vec(any::<u64>(), 16),
        decimals in vec(("[1-9][0-9]{0,24}", 0usize..26, -330i32..310), 16),
    ) {
        let catalog = catalog();
        let orders = catalog.view("orders").unwrap();
        let mut texts = Vec::new();
        for d in bits.into_iter().map(f64::from_bits).filter(|d| d.is_finite()) {
            texts.extend([format!("{d}"), format!("{d:e}"), format!("{d:.16e}")]);
        }
        for (digits, point, exponent) in decimals {
            // JSON wants a digit before the point and one after it, if any.
            let (int, fraction) = digits.split_at(point.min(digits.len()));
            let int = if int.is_empty() { "0" } else { int };
            texts.push(if fraction.is_empty() { format!("{int}e{exponent}") } else { format!("{int}.{fraction}e{exponent}") });
        }
        for text in texts {
            let Ok(expected) = text.parse::<f64>() else { continue };
            if !expected.is_finite() {
                continue;
            }
            for amount in [text.clone(), format!("\"{text}\"")] {
                let record = format!(r#"{{"op": "c", "after": {{"user_id": 1, "ordered_at": 1, "amount": {amount}}}}}"#);
                let changes = decode(orders, Some(record.as_bytes()), Some(1)).unwrap();
                let Scalar::Double(got) = changes[0].1.fields["amount"] else { panic!("{amount} is not a double") };
                prop_assert_eq!(got.to_bits(), expected.to_bits(), "{}", amount);
            }
        }
    }
}
