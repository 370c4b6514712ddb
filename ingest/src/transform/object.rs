//! A JSON object read for a few of its fields: values stay unparsed text
//! (`RawValue`), keys borrow from the record unless they hold escapes, and
//! lookups scan a short list. A record's columns and Debezium's `source`
//! block are thus scanned once and never allocated; only the fields a view
//! reads are parsed. Parsing into `serde_json::Value` first cost about
//! twice as much per record (`tests/bench/README.md`).

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};
use serde_json::value::RawValue;

/// The members of one object, in document order.
pub struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Object<'a> {
    /// The member named `name`; the last one if it repeats (as JSON parsers
    /// into maps keep it).
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(key, _)| key == name).map(|&(_, value)| value)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Object<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor)
    }
}

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Object<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(Object(members))
    }
}

/// A member name, borrowed when the text holds no escape.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_found_by_name_escaped_or_not_and_the_last_repeat_wins() {
        let text = r#"{"a": 1, "b\u0022q": {"x": [1, "y"]}, "a": "two", "c": null}"#;
        let object: Object = serde_json::from_str(text).unwrap();
        assert_eq!(object.get("a").unwrap().get(), r#""two""#);
        assert_eq!(object.get("b\"q").unwrap().get(), r#"{"x": [1, "y"]}"#);
        assert_eq!(object.get("c").unwrap().get(), "null");
        assert!(object.get("d").is_none());
        assert!(matches!(object.0[0].0, Cow::Borrowed(_)), "plain names are not copied");
        assert!(serde_json::from_str::<Object>("[1]").is_err());
        assert!(serde_json::from_str::<Object>(r#"{"a": }"#).is_err());
    }
}
