//! Validating a GetFeatures request and resolving it against the catalog.
//!
//! Everything a request can get wrong is caught here, before any store is
//! touched, and reported as `INVALID_ARGUMENT` naming the field.

use std::time::Duration;

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key};
use freshet_store::{
    key,
    view::{Catalog, Feature, FeatureView, KeyType},
};
use tonic::Status;

/// A request that is known to make sense.
pub struct Plan<'a> {
    /// Requested features in request order, with the index of their view in `views`.
    pub columns: Vec<(usize, &'a Feature)>,
    pub views: Vec<&'a FeatureView>,
    /// Canonical entity keys, in request order.
    pub entities: Vec<String>,
    pub max_age: Option<Duration>,
}

pub fn plan<'a>(catalog: &'a Catalog, request: &GetFeaturesRequest, max_entities: usize) -> Result<Plan<'a>, Status> {
    if request.features.is_empty() {
        return Err(invalid("features", "at least one feature reference (\"view:feature\") is required"));
    }
    if request.entities.is_empty() {
        return Err(invalid("entities", "at least one entity key is required"));
    }
    if request.entities.len() > max_entities {
        return Err(invalid("entities", &format!("{} entities exceed the limit of {max_entities} per request", request.entities.len())));
    }
    let mut views: Vec<&FeatureView> = Vec::new();
    let mut columns = Vec::with_capacity(request.features.len());
    for (i, reference) in request.features.iter().enumerate() {
        let field = format!("features[{i}]");
        let (view_name, feature_name) = reference
            .split_once(':')
            .filter(|(v, f)| !v.is_empty() && !f.is_empty())
            .ok_or_else(|| invalid(&field, &format!("{reference:?} is not a reference of the form \"view:feature\"")))?;
        let view = catalog.view(view_name).ok_or_else(|| invalid(&field, &format!("unknown feature view {view_name:?}")))?;
        let feature =
            view.feature(feature_name).ok_or_else(|| invalid(&field, &format!("view {view_name:?} has no feature {feature_name:?}")))?;
        let index = match views.iter().position(|v| v.name == view.name) {
            Some(index) => index,
            None => {
                if let Some(first) = views.first().filter(|first| first.entity_type != view.entity_type) {
                    return Err(invalid(
                        &field,
                        &format!(
                            "view {view_name:?} is keyed by {}, but view {:?} by {}",
                            key_name(view.entity_type),
                            first.name,
                            key_name(first.entity_type)
                        ),
                    ));
                }
                views.push(view);
                views.len() - 1
            }
        };
        columns.push((index, feature));
    }
    let key_type = views[0].entity_type;
    let entities = request
        .entities
        .iter()
        .enumerate()
        .map(|(i, key)| canonical_key(key, key_type).map_err(|m| invalid(&format!("entities[{i}]"), &m)))
        .collect::<Result<Vec<_>, _>>()?;
    let max_age = match &request.max_age {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            return Err(invalid("max_age", "must not be negative"));
        }
        Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
    };
    Ok(Plan { columns, views, entities, max_age })
}

/// The text form of a key, as ingest stores it.
fn canonical_key(key: &EntityKey, expected: KeyType) -> Result<String, String> {
    match (&key.key, expected) {
        (Some(Key::Int64Key(k)), KeyType::Int64) => Ok(k.to_string()),
        (Some(Key::StringKey(k)), KeyType::String) => key::check_string_key(k).map(|()| k.clone()),
        (None, _) => Err("key is not set".into()),
        (_, expected) => Err(format!("the requested views are keyed by {}", key_name(expected))),
    }
}

fn key_name(t: KeyType) -> &'static str {
    match t {
        KeyType::Int64 => "int64_key",
        KeyType::String => "string_key",
    }
}

fn invalid(field: &str, message: &str) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml"))).unwrap()
    }

    fn request(features: &[&str], keys: Vec<Key>) -> GetFeaturesRequest {
        GetFeaturesRequest {
            features: features.iter().map(|f| f.to_string()).collect(),
            entities: keys.into_iter().map(|k| EntityKey { key: Some(k) }).collect(),
            max_age: None,
        }
    }

    fn message(r: GetFeaturesRequest) -> String {
        let c = catalog();
        let status = plan(&c, &r, 10).err().expect("request should be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_string()
    }

    #[test]
    fn resolves_columns_in_request_order() {
        let c = catalog();
        let r = request(&["orders:spend_1h", "user_activity:events_10s", "orders:orders_1h"], vec![Key::Int64Key(7), Key::Int64Key(3)]);
        let p = plan(&c, &r, 10).unwrap();
        assert_eq!(p.views.len(), 2);
        let names: Vec<&str> = p.columns.iter().map(|(_, f)| f.name.as_str()).collect();
        assert_eq!(names, ["spend_1h", "events_10s", "orders_1h"]);
        assert_eq!(p.columns[2].0, p.columns[0].0);
        assert_eq!(p.entities, ["7", "3"]);
    }

    #[test]
    fn names_the_field_at_fault() {
        assert!(message(request(&[], vec![Key::Int64Key(1)])).starts_with("features:"));
        assert!(message(request(&["orders:spend_1h"], vec![])).starts_with("entities:"));
        assert!(message(request(&["orders:spend_1h"], vec![Key::Int64Key(1); 11])).contains("limit of 10"));
        assert!(message(request(&["orders:spend_1h", "nocolon"], vec![Key::Int64Key(1)])).starts_with("features[1]:"));
        assert!(message(request(&["nope:x"], vec![Key::Int64Key(1)])).contains("unknown feature view \"nope\""));
        assert!(message(request(&["orders:nope"], vec![Key::Int64Key(1)])).contains("has no feature \"nope\""));
        let wrong_type = message(request(&["orders:spend_1h"], vec![Key::Int64Key(1), Key::StringKey("a".into())]));
        assert!(wrong_type.starts_with("entities[1]:") && wrong_type.contains("int64_key"), "{wrong_type}");
        let mut unset = request(&["orders:spend_1h"], vec![Key::Int64Key(1)]);
        unset.entities.push(EntityKey { key: None });
        assert!(message(unset).starts_with("entities[1]: key is not set"));
        let mut negative = request(&["orders:spend_1h"], vec![Key::Int64Key(1)]);
        negative.max_age = Some(prost_types::Duration { seconds: -1, nanos: 0 });
        assert!(message(negative).starts_with("max_age:"));
    }

    /// The same rule ingest applies before storing a key (`freshet_store::key`).
    #[test]
    fn string_keys_follow_the_stores_rule() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml")).unwrap();
        let c = Catalog::parse(&text.replacen("entity_type = \"int64\"", "entity_type = \"string\"", 1), "v").unwrap();
        let keys = |keys: Vec<String>| request(&["user_activity:events_1m"], keys.into_iter().map(Key::StringKey).collect());
        let longest = "é".repeat(key::MAX_STRING_KEY_BYTES / 2);
        assert_eq!(plan(&c, &keys(vec!["a".into(), longest.clone()]), 10).unwrap().entities, ["a".to_string(), longest]);
        for (bad, len) in [(String::new(), 0), ("x".repeat(1025), 1025)] {
            let status = plan(&c, &keys(vec!["a".into(), bad]), 10).err().unwrap();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), format!("entities[1]: string keys must be 1 to 1024 bytes, this one has {len}"));
        }
    }
}
