//! Validating a GetFeatures request and resolving it against the catalog.
//!
//! Everything a request can get wrong is caught here, before any store is
//! touched, and reported as `INVALID_ARGUMENT` naming the field. That
//! includes asking for too much: the server's limits bound the features,
//! entities and values (entities × features) of one call, so that no request
//! can take the memory and time of many. Error messages quote at most a short
//! prefix of what the client sent, so a huge bad input is not echoed back.

use std::{collections::HashMap, time::Duration};

use freshet_proto::v1::{EntityKey, GetFeaturesRequest, entity_key::Key};
use freshet_store::{
    key,
    view::{Catalog, Feature, FeatureView, KeyType},
};
use tonic::Status;

/// How much one GetFeatures call may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_features: usize,
    pub max_entities: usize,
    /// Values in the answer: entities × features.
    pub max_values: usize,
}

/// A request that is known to make sense.
pub struct Plan<'a> {
    /// Requested features in request order, with the index of their view in `views`.
    pub columns: Vec<(usize, &'a Feature)>,
    /// The distinct windows the columns read, as (view index, series slot,
    /// window in ms): each is combined once per entity, however many
    /// features (count, sum, avg…) read it.
    pub windows: Vec<(usize, usize, i64)>,
    /// For each column, its window in `windows` (`None` for `last`).
    pub column_windows: Vec<Option<usize>>,
    pub views: Vec<&'a FeatureView>,
    /// Canonical keys of the distinct entities, in order of first request.
    pub entities: Vec<String>,
    /// For each requested entity, in request order, its index in `entities`:
    /// an entity asked for twice is read and evaluated once.
    pub rows: Vec<usize>,
    pub max_age: Option<Duration>,
}

pub fn plan<'a>(catalog: &'a Catalog, request: &GetFeaturesRequest, limits: Limits) -> Result<Plan<'a>, Status> {
    let (features, entities) = (request.features.len(), request.entities.len());
    if features == 0 {
        return Err(invalid("features", "at least one feature reference (\"view:feature\") is required"));
    }
    if features > limits.max_features {
        return Err(invalid("features", &format!("{features} feature references exceed the limit of {} per request", limits.max_features)));
    }
    if entities == 0 {
        return Err(invalid("entities", "at least one entity key is required"));
    }
    if entities > limits.max_entities {
        return Err(invalid("entities", &format!("{entities} entities exceed the limit of {} per request", limits.max_entities)));
    }
    let values = entities.saturating_mul(features);
    if values > limits.max_values {
        return Err(invalid(
            "entities",
            &format!(
                "{entities} entities × {features} features = {values} values exceed the limit of {} per request; split the request",
                limits.max_values
            ),
        ));
    }
    let (columns, views) = resolve_features(catalog, &request.features)?;
    let key_type = views[0].entity_type;
    let mut entities: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::with_capacity(request.entities.len());
    let mut rows = Vec::with_capacity(request.entities.len());
    for (i, key) in request.entities.iter().enumerate() {
        let key = canonical_key(key, key_type).map_err(|m| invalid(&format!("entities[{i}]"), &m))?;
        let row = *index.entry(key).or_insert_with_key(|key| {
            entities.push(key.clone());
            entities.len() - 1
        });
        rows.push(row);
    }
    let max_age = match &request.max_age {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => return Err(invalid("max_age", "must not be negative")),
        Some(d) if d.nanos >= 1_000_000_000 => return Err(invalid("max_age", "nanos must be below 1,000,000,000")),
        Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
    };
    let (windows, column_windows) = windows_of(&columns);
    Ok(Plan { columns, windows, column_windows, views, entities, rows, max_age })
}

/// The views a GetFreshness request names (all for none): each known, none
/// twice.
pub fn freshness_views<'a>(catalog: &'a Catalog, asked: &[String]) -> Result<Vec<&'a FeatureView>, Status> {
    if asked.is_empty() {
        return Ok(catalog.views.iter().collect());
    }
    let mut views: Vec<&FeatureView> = Vec::new();
    for (i, name) in asked.iter().enumerate() {
        let field = format!("views[{i}]");
        let view = catalog.view(name).ok_or_else(|| invalid(&field, &format!("unknown feature view {}", quoted(name))))?;
        if let Some(first) = views.iter().position(|v| v.name == view.name) {
            return Err(invalid(&field, &format!("repeats views[{first}]; ask for each view once")));
        }
        views.push(view);
    }
    Ok(views)
}

type Columns<'a> = (Vec<(usize, &'a Feature)>, Vec<&'a FeatureView>);

/// Resolves `view:feature` references: each known, none twice, all views
/// keyed alike.
fn resolve_features<'a>(catalog: &'a Catalog, references: &[String]) -> Result<Columns<'a>, Status> {
    let mut views: Vec<&FeatureView> = Vec::new();
    let mut columns = Vec::with_capacity(references.len());
    // By the feature each resolves to (one reference text names one
    // feature): an address in the catalog, which callers cannot choose, so
    // a fast hash is safe.
    let mut seen: HashMap<*const Feature, usize, foldhash::fast::RandomState> = HashMap::default();
    seen.reserve(references.len());
    for (i, reference) in references.iter().enumerate() {
        // Built only for an error: most calls have none.
        let field = || format!("features[{i}]");
        let (view_name, feature_name) = reference
            .split_once(':')
            .filter(|(v, f)| !v.is_empty() && !f.is_empty())
            .ok_or_else(|| invalid(&field(), &format!("{} is not a reference of the form \"view:feature\"", quoted(reference))))?;
        let view = catalog.view(view_name).ok_or_else(|| invalid(&field(), &format!("unknown feature view {}", quoted(view_name))))?;
        let feature = view
            .feature(feature_name)
            .ok_or_else(|| invalid(&field(), &format!("view {:?} has no feature {}", view.name, quoted(feature_name))))?;
        if let Some(first) = seen.insert(feature, i) {
            return Err(invalid(&field(), &format!("repeats features[{first}]; ask for each feature once")));
        }
        let index = match views.iter().position(|v| std::ptr::eq(*v, view)) {
            Some(index) => index,
            None => {
                if let Some(first) = views.first().filter(|first| first.entity_type != view.entity_type) {
                    return Err(invalid(
                        &field(),
                        &format!(
                            "view {:?} is keyed by {}, but view {:?} by {}",
                            view.name,
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
    Ok((columns, views))
}

type Windows = (Vec<(usize, usize, i64)>, Vec<Option<usize>>);

/// The distinct windows `columns` read, and each column's.
fn windows_of(columns: &[(usize, &Feature)]) -> Windows {
    let mut windows = Vec::new();
    let mut index: HashMap<(usize, usize, i64), usize, foldhash::fast::RandomState> = HashMap::default();
    index.reserve(columns.len());
    let column_windows = columns
        .iter()
        .map(|&(view, feature)| {
            let window = (view, feature.slot, feature.window?.as_millis() as i64);
            Some(*index.entry(window).or_insert_with(|| {
                windows.push(window);
                windows.len() - 1
            }))
        })
        .collect();
    (windows, column_windows)
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

pub fn invalid(field: &str, message: &str) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// Client text as an error message may quote it: at most its first
/// [`QUOTED_BYTES`] bytes (cut on a character boundary), and its length.
pub fn quoted(text: &str) -> String {
    if text.len() <= QUOTED_BYTES {
        return format!("{text:?}");
    }
    format!("{:?}… ({} bytes)", &text[..text.floor_char_boundary(QUOTED_BYTES)], text.len())
}

const QUOTED_BYTES: usize = 64;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: Limits = Limits { max_features: 8, max_entities: 10, max_values: 40 };

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
        let status = plan(&c, &r, LIMITS).err().expect("request should be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_string()
    }

    #[test]
    fn resolves_columns_in_request_order() {
        let c = catalog();
        let r = request(&["orders:spend_1h", "user_activity:events_10s", "orders:orders_1h"], vec![Key::Int64Key(7), Key::Int64Key(3)]);
        let p = plan(&c, &r, LIMITS).unwrap();
        assert_eq!(p.views.len(), 2);
        let names: Vec<&str> = p.columns.iter().map(|(_, f)| f.name.as_str()).collect();
        assert_eq!(names, ["spend_1h", "events_10s", "orders_1h"]);
        assert_eq!(p.columns[2].0, p.columns[0].0);
        assert_eq!(p.entities, ["7", "3"]);
        assert_eq!(p.rows, [0, 1]);
    }

    #[test]
    fn an_entity_asked_for_twice_is_read_once() {
        let c = catalog();
        let r = request(&["orders:spend_1h"], vec![Key::Int64Key(7), Key::Int64Key(3), Key::Int64Key(7)]);
        let p = plan(&c, &r, LIMITS).unwrap();
        assert_eq!(p.entities, ["7", "3"]);
        assert_eq!(p.rows, [0, 1, 0]);
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
        let mut overflowing = request(&["orders:spend_1h"], vec![Key::Int64Key(1)]);
        overflowing.max_age = Some(prost_types::Duration { seconds: i64::MAX, nanos: i32::MAX });
        assert!(message(overflowing).starts_with("max_age: nanos"));
    }

    #[test]
    fn bounds_features_values_and_repeats() {
        let nine = ["orders:spend_1h"; 9];
        assert!(message(request(&nine, vec![Key::Int64Key(1)])).starts_with("features: 9 feature references exceed the limit of 8"));
        let five = ["orders:spend_1h", "orders:orders_1h", "orders:max_order_1h", "orders:avg_order_1h", "orders:items_1h"];
        let keys: Vec<Key> = (0..9).map(Key::Int64Key).collect();
        let too_many = message(request(&five, keys.clone()));
        assert!(too_many.starts_with("entities: 9 entities × 5 features = 45 values exceed the limit of 40"), "{too_many}");
        assert!(plan(&catalog(), &request(&five, keys[..8].to_vec()), LIMITS).is_ok(), "8 × 5 = 40 is allowed");
        let repeated = message(request(&["orders:spend_1h", "orders:orders_1h", "orders:spend_1h"], vec![Key::Int64Key(1)]));
        assert!(repeated.starts_with("features[2]: repeats features[0]"), "{repeated}");
    }

    #[test]
    fn quotes_only_a_prefix_of_long_input() {
        let huge = format!("orders:{}", "é".repeat(500_000));
        let m = message(request(&[&huge], vec![Key::Int64Key(1)]));
        assert!(m.len() < 200, "{} bytes", m.len());
        assert!(m.ends_with(&format!("… ({} bytes)", huge.len() - "orders:".len())), "{m}");
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn freshness_views_are_known_and_distinct() {
        let c = catalog();
        assert_eq!(freshness_views(&c, &[]).unwrap().len(), c.views.len());
        let names = |v: Vec<&FeatureView>| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(freshness_views(&c, &["orders".into()]).unwrap()), ["orders"]);
        let refused = |asked: &[&str]| {
            let asked: Vec<String> = asked.iter().map(|s| s.to_string()).collect();
            let status = freshness_views(&c, &asked).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            status.message().to_string()
        };
        assert!(refused(&["orders", "nope"]).starts_with("views[1]: unknown feature view \"nope\""));
        assert!(refused(&["orders", "user_activity", "orders"]).starts_with("views[2]: repeats views[0]"));
    }

    /// A reference: known or unknown views and features, malformed text,
    /// multi-byte text around the quoting cut, and long strings.
    fn reference() -> impl Strategy<Value = String> {
        let known = prop::sample::select(vec![
            "orders:spend_1h",
            "orders:orders_1h",
            "orders:last_express",
            "user_activity:events_10s",
            "user_activity:last_event_type",
        ])
        .prop_map(String::from);
        prop_oneof![
            3 => known,
            1 => "[a-z_]{0,12}:?[a-z_0-9]{0,12}",
            1 => "\\PC{0,80}",
            1 => ("[a-z]{0,3}", "[é😀a:]{60,70}").prop_map(|(a, b)| format!("{a}:{b}")),
            1 => (1usize..20_000).prop_map(|n| format!("orders:{}", "ü".repeat(n))),
            1 => "[\\x00-\\x1f:]{60,200}",
        ]
    }

    fn key() -> impl Strategy<Value = EntityKey> {
        let key = prop_oneof![
            any::<i64>().prop_map(Key::Int64Key),
            "\\PC{0,40}".prop_map(Key::StringKey),
            (1000usize..1100).prop_map(|n| Key::StringKey("k".repeat(n))),
        ];
        prop::option::weighted(0.95, key).prop_map(|key| EntityKey { key })
    }

    fn requests() -> impl Strategy<Value = GetFeaturesRequest> {
        let max_age = prop::option::of((any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }));
        (prop::collection::vec(reference(), 0..12), prop::collection::vec(key(), 0..14), max_age)
            .prop_map(|(features, entities, max_age)| GetFeaturesRequest { features, entities, max_age })
    }

    proptest! {
        /// Whatever arrives: no panic; a refusal is INVALID_ARGUMENT naming a
        /// field of the request, short whatever the input's size; an
        /// accepted request keeps every limit and its shape.
        #[test]
        fn any_request_is_planned_or_refused_clearly(r in requests()) {
            let c = catalog();
            match plan(&c, &r, LIMITS) {
                Ok(p) => {
                    prop_assert!(r.features.len() <= LIMITS.max_features && r.entities.len() <= LIMITS.max_entities);
                    prop_assert!(r.features.len() * r.entities.len() <= LIMITS.max_values);
                    prop_assert_eq!(p.columns.len(), r.features.len());
                    prop_assert_eq!(p.rows.len(), r.entities.len());
                    prop_assert!(p.rows.iter().all(|&i| i < p.entities.len()));
                    prop_assert!(p.views.iter().all(|v| v.entity_type == p.views[0].entity_type));
                }
                Err(status) => {
                    prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    let m = status.message();
                    let field = m.split(':').next().unwrap_or_default();
                    let known = ["features", "entities", "max_age"].iter().any(|f| field == *f || field.starts_with(&format!("{f}[")));
                    prop_assert!(known, "{m}");
                    // A quote is 64 bytes at most, escaped (6 for a control character).
                    prop_assert!(m.len() < 64 * 6 + 200, "{} bytes: {m}", m.len());
                }
            }
        }

        /// Well-formed requests for known features of one key type are
        /// accepted, with duplicate entities collapsed.
        #[test]
        fn valid_requests_are_accepted(
            features in prop::sample::subsequence(vec!["orders:spend_1h", "orders:orders_1h", "orders:items_1h", "orders:last_express"], 1..4),
            keys in prop::collection::vec(0i64..4, 1..10),
        ) {
            let c = catalog();
            let r = request(&features, keys.iter().map(|k| Key::Int64Key(*k)).collect());
            let p = plan(&c, &r, LIMITS).map_err(|s| TestCaseError::fail(s.message().to_string()))?;
            let mut distinct = keys.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(p.entities.len(), distinct.len());
            for (i, k) in keys.iter().enumerate() {
                prop_assert_eq!(&p.entities[p.rows[i]], &k.to_string());
            }
        }
    }

    /// The same rule ingest applies before storing a key (`freshet_store::key`).
    #[test]
    fn string_keys_follow_the_stores_rule() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/reference.toml")).unwrap();
        let c = Catalog::parse(&text.replacen("entity_type = \"int64\"", "entity_type = \"string\"", 1), "v").unwrap();
        let keys = |keys: Vec<String>| request(&["user_activity:events_1m"], keys.into_iter().map(Key::StringKey).collect());
        let longest = "é".repeat(key::MAX_STRING_KEY_BYTES / 2);
        assert_eq!(plan(&c, &keys(vec!["a".into(), longest.clone()]), LIMITS).unwrap().entities, ["a".to_string(), longest]);
        for (bad, len) in [(String::new(), 0), ("x".repeat(1025), 1025)] {
            let status = plan(&c, &keys(vec!["a".into(), bad]), LIMITS).err().unwrap();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), format!("entities[1]: string keys must be 1 to 1024 bytes, this one has {len}"));
        }
    }
}
