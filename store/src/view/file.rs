//! Loading and validating a feature-view file.
//!
//! Shape errors (unknown key, unknown aggregation, a window that is not a
//! duration, a missing `entity`) come from serde while the TOML is read, so
//! they carry the span of the offending value. Rules that involve several
//! fields (a `sum` needs a numeric `field`, `retract` cannot undo `min`) are
//! checked afterwards against spanned names, so they name a line too.
//!
//! Limits that keep one view from hurting the rest are checked here too:
//! durations are bounded (`duration::MAX`), a view has at most
//! [`MAX_FEATURES`], and no dead-letter topic is a topic some view reads.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    ops::Range,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{
    Aggregation, Catalog, DeletePolicy, Feature, FeatureView, Format, KeyType, PostgresSource, Source, UpdatePolicy, ValueType, duration,
};
use crate::state;

/// The most features one view may declare. Applying an event is linear in
/// them; the bound keeps one event's work and one entity's state modest.
pub const MAX_FEATURES: usize = 1000;

/// How far ahead of its record an event may be dated unless a view says.
const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(300);

/// A feature-view file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewError {
    pub origin: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.origin, line, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ViewError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    view: Vec<Spanned<RawView>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    entity: String,
    entity_type: RawKeyType,
    max_age: Dur,
    freshness_budget: Dur,
    #[serde(default)]
    allowed_lateness: Option<Dur>,
    #[serde(default)]
    max_future: Option<Spanned<Dur>>,
    source: RawSource,
    #[serde(default)]
    feature: Vec<Spanned<RawFeature>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawKeyType {
    Int64,
    String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    topics: Option<Spanned<Vec<String>>>,
    format: RawFormat,
    /// Postgres sources: `schema.table` (or `table`, in `public`).
    #[serde(default)]
    table: Option<Spanned<String>>,
    #[serde(default)]
    slot: Option<String>,
    #[serde(default)]
    publication: Option<String>,
    #[serde(default)]
    url_env: Option<String>,
    event_time: String,
    #[serde(default)]
    on_update: Option<RawUpdate>,
    #[serde(default)]
    on_delete: Option<Spanned<RawDelete>>,
    #[serde(default)]
    dlq_topic: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawFormat {
    Debezium,
    Json,
    Postgres,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawUpdate {
    Ignore,
    Apply,
    Replace,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawDelete {
    Ignore,
    Retract,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    aggregation: RawAggregation,
    #[serde(default)]
    field: Option<String>,
    #[serde(default, rename = "type")]
    field_type: Option<RawValueType>,
    #[serde(default)]
    window: Option<Dur>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawAggregation {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    Last,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawValueType {
    Int64,
    Double,
    String,
    Bool,
    Timestamp,
}

/// A duration read through `duration::parse`, so a bad one fails with its span.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        duration::parse(&text).map(Dur).map_err(serde::de::Error::custom)
    }
}

impl Catalog {
    /// Reads and validates a feature-view file.
    pub fn load(path: &Path) -> Result<Catalog, ViewError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ViewError {
            origin: origin.clone(),
            line: None,
            message: format!("cannot read the feature-view file: {e}"),
        })?;
        Catalog::parse(&text, &origin)
    }

    /// Validates feature-view TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Catalog, ViewError> {
        let error = |span: Option<Range<usize>>, message: String| ViewError {
            origin: origin.to_string(),
            line: span.map(|s| line_of(text, s.start)),
            message: shorten(message),
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| error(e.span(), e.message().to_string()))?;
        if raw.view.is_empty() {
            return Err(error(None, "no [[view]] is declared".into()));
        }
        // Every topic any view reads: none may receive dead letters.
        let sources: HashSet<String> =
            raw.view.iter().flat_map(|v| v.get_ref().source.topics.iter().flat_map(|t| t.get_ref().iter().cloned())).collect();
        let mut names = HashSet::new();
        let mut views = Vec::new();
        for raw_view in raw.view {
            let view_span = raw_view.span();
            let raw_view = raw_view.into_inner();
            let view =
                convert_view(raw_view, &sources).map_err(|(span, message)| error(Some(span.unwrap_or(view_span.clone())), message))?;
            if !names.insert(view.name.clone()) {
                return Err(error(Some(view_span), format!("view {:?} is declared twice", view.name)));
            }
            check_shared_slot(&views, &view).map_err(|m| error(Some(view_span.clone()), m))?;
            views.push(view);
        }
        Ok(Catalog { views })
    }
}

type Invalid = (Option<Range<usize>>, String);

fn convert_view(raw: RawView, sources: &HashSet<String>) -> Result<FeatureView, Invalid> {
    let name_span = raw.name.span();
    let name = raw.name.into_inner();
    check_name(&name).map_err(|m| (Some(name_span.clone()), format!("view name {:?} {m}", prefix(&name))))?;
    let at_view = |m: String| (Some(name_span.clone()), format!("view {name:?}: {m}"));
    let postgres = postgres_source(&raw.source).map_err(|(span, m)| (span.or(Some(name_span.clone())), format!("view {name:?}: {m}")))?;
    let (topics, dlq_topic) = match (&postgres, raw.source.topics) {
        (Some(pg), None) => (vec![PostgresSource::topic(&pg.slot)], None),
        (Some(_), Some(t)) => return Err((Some(t.span()), format!("view {name:?}: a postgres source reads a table, not source.topics"))),
        (None, None) => return Err(at_view("source.topics must name at least one topic".into())),
        (None, Some(topics)) => {
            let topics_span = topics.span();
            let topics = topics.into_inner();
            if topics.is_empty() {
                return Err(at_view("source.topics must name at least one topic".into()));
            }
            for topic in &topics {
                check_topic(topic).map_err(|m| (Some(topics_span.clone()), format!("view {name:?}: source.topics: {m}")))?;
            }
            let dlq_topic = check_dlq_topic(raw.source.dlq_topic, &topics, topics_span, sources)
                .map_err(|(span, m)| (span, format!("view {name:?}: {m}")))?;
            (topics, dlq_topic)
        }
    };
    for (setting, field) in [("entity", &raw.entity), ("source.event_time", &raw.source.event_time)] {
        check_field(field).map_err(|m| at_view(format!("{setting} {m}")))?;
    }
    if raw.freshness_budget.0.is_zero() || raw.max_age.0.is_zero() {
        return Err(at_view("max_age and freshness_budget must be greater than zero".into()));
    }
    let max_future = match raw.max_future {
        Some(d) if d.get_ref().0.is_zero() => {
            return Err((Some(d.span()), format!("view {name:?}: max_future must be greater than zero (clocks differ a little)")));
        }
        Some(d) => d.into_inner().0,
        None => DEFAULT_MAX_FUTURE,
    };
    let on_delete = match raw.source.on_delete.as_ref().map(|s| *s.get_ref()) {
        Some(RawDelete::Retract) => DeletePolicy::Retract,
        _ => DeletePolicy::Ignore,
    };
    let on_update = match raw.source.on_update {
        Some(RawUpdate::Apply) => UpdatePolicy::Apply,
        Some(RawUpdate::Replace) => UpdatePolicy::Replace,
        _ => UpdatePolicy::Ignore,
    };
    if raw.feature.is_empty() {
        return Err(at_view("declares no [[view.feature]]".into()));
    }
    if raw.feature.len() > MAX_FEATURES {
        return Err(at_view(format!("declares {} features, more than the {MAX_FEATURES} a view may have; split it", raw.feature.len())));
    }
    let mut features = Vec::new();
    let mut feature_names = HashSet::new();
    let mut field_types: HashMap<String, ValueType> = HashMap::new();
    for raw_feature in raw.feature {
        let span = raw_feature.get_ref().name.span();
        let feature = convert_feature(raw_feature.into_inner()).map_err(|m| (Some(span.clone()), format!("view {name:?}: {m}")))?;
        let retracts = on_delete == DeletePolicy::Retract || on_update == UpdatePolicy::Replace;
        if retracts && matches!(feature.aggregation, Aggregation::Min | Aggregation::Max) {
            return Err((
                Some(span),
                format!(
                    "view {name:?}: feature {:?}: {} cannot be retracted; use on_delete = \"ignore\" and on_update other than \"replace\", or drop the feature",
                    feature.name,
                    feature.aggregation.as_str()
                ),
            ));
        }
        if !feature_names.insert(feature.name.clone()) {
            return Err((Some(span), format!("view {name:?}: feature {:?} is declared twice", feature.name)));
        }
        // A record's field is decoded once, as one type.
        if let Some(field) = &feature.field {
            let declared = *field_types.entry(field.clone()).or_insert(feature.field_type);
            if declared != feature.field_type {
                return Err((
                    Some(span),
                    format!(
                        "view {name:?}: feature {:?}: field {field:?} is declared with another `type` by an earlier feature",
                        feature.name
                    ),
                ));
            }
        }
        features.push(feature);
    }
    let series = state::series_of(&features);
    let mut lasts = 0;
    for feature in &mut features {
        feature.slot = match &feature.series {
            Some(key) => series.iter().position(|s| &s.key == key).expect("series_of covers every windowed feature"),
            None => {
                lasts += 1;
                lasts - 1
            }
        };
    }
    let by_name = features.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
    Ok(FeatureView {
        by_name,
        name,
        description: raw.description,
        entity: raw.entity,
        entity_type: match raw.entity_type {
            RawKeyType::Int64 => KeyType::Int64,
            RawKeyType::String => KeyType::String,
        },
        max_age: raw.max_age.0,
        freshness_budget: raw.freshness_budget.0,
        allowed_lateness: raw.allowed_lateness.map(|d| d.0).unwrap_or(Duration::ZERO),
        max_future,
        source: Source {
            topics,
            format: match raw.source.format {
                RawFormat::Debezium => Format::Debezium,
                RawFormat::Json => Format::Json,
                RawFormat::Postgres => Format::Postgres,
            },
            postgres,
            event_time: raw.source.event_time,
            on_update,
            on_delete,
            dlq_topic,
        },
        features,
        series,
    })
}

/// The table, slot and publication of a `format = "postgres"` source, and
/// none of them for another format.
fn postgres_source(raw: &RawSource) -> Result<Option<PostgresSource>, Invalid> {
    let table_span = raw.table.as_ref().map(|t| t.span());
    if !matches!(raw.format, RawFormat::Postgres) {
        let stray = [
            ("table", raw.table.is_some()),
            ("slot", raw.slot.is_some()),
            ("publication", raw.publication.is_some()),
            ("url_env", raw.url_env.is_some()),
        ];
        return match stray.into_iter().find(|(_, set)| *set) {
            Some((setting, _)) => Err((table_span, format!("source.{setting} is for format = \"postgres\" only"))),
            None => Ok(None),
        };
    }
    let Some(table) = raw.table.as_ref().map(|t| t.get_ref()) else {
        return Err((None, "a postgres source needs source.table (\"schema.table\")".into()));
    };
    let (schema, table) = table.split_once('.').unwrap_or(("public", table));
    let (Some(slot), Some(publication)) = (&raw.slot, &raw.publication) else {
        return Err((table_span, "a postgres source needs source.slot and source.publication".into()));
    };
    for (setting, name) in [("table", schema), ("table", table), ("publication", publication.as_str())] {
        check_identifier(name).map_err(|m| (table_span.clone(), format!("source.{setting}: {m}")))?;
    }
    // Postgres's own rule for slot names.
    if slot.is_empty() || slot.len() > 63 || !slot.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err((table_span, format!("source.slot {:?} is not a slot name (1 to 63 of a-z, 0-9, '_')", prefix(slot))));
    }
    let url_env = raw.url_env.clone().unwrap_or_else(|| "FRESHET_SOURCE_DATABASE_URL".into());
    Ok(Some(PostgresSource { url_env, publication: publication.clone(), slot: slot.clone(), schema: schema.into(), table: table.into() }))
}

/// A Postgres name Freshet quotes: 1 to 63 bytes, no quote or NUL.
fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || name.contains(['"', '\0', '.']) {
        return Err(format!("{:?} is not a Postgres name (1 to 63 bytes, no '\"' or '.')", prefix(name)));
    }
    Ok(())
}

/// Views reading one slot read one database through one publication.
fn check_shared_slot(views: &[FeatureView], view: &FeatureView) -> Result<(), String> {
    let Some(pg) = &view.source.postgres else { return Ok(()) };
    match views.iter().filter_map(|v| v.source.postgres.as_ref().map(|p| (v, p))).find(|(_, p)| p.slot == pg.slot) {
        Some((other, p)) if (&p.url_env, &p.publication) != (&pg.url_env, &pg.publication) => Err(format!(
            "view {:?}: slot {:?} is read by view {:?} with another publication or url_env; views sharing a slot share both",
            view.name, pg.slot, other.name
        )),
        _ => Ok(()),
    }
}

/// Kafka's rule for topic names, so a typo fails here and not on every produce.
fn check_topic(topic: &str) -> Result<(), String> {
    let legal = topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." || !legal {
        return Err(format!("{:?} is not a Kafka topic name (1 to 249 of a-z, A-Z, 0-9, '.', '_', '-')", prefix(topic)));
    }
    Ok(())
}

/// A dead-letter topic that is also a source topic would feed each poison
/// record back in, dead-lettering it again, forever.
fn check_dlq_topic(
    dlq_topic: Option<Spanned<String>>,
    topics: &[String],
    topics_span: Range<usize>,
    sources: &HashSet<String>,
) -> Result<Option<String>, Invalid> {
    let Some(dlq) = dlq_topic else {
        return match topics.iter().map(|t| format!("{t}.dlq")).find(|d| sources.contains(d)) {
            Some(d) => Err((Some(topics_span), format!("the default dead-letter topic {d:?} is a source topic; set source.dlq_topic"))),
            None => Ok(None),
        };
    };
    let span = dlq.span();
    let dlq = dlq.into_inner();
    check_topic(&dlq).map_err(|m| (Some(span.clone()), format!("source.dlq_topic: {m}")))?;
    if sources.contains(&dlq) {
        return Err((Some(span), format!("source.dlq_topic {dlq:?} is a source topic: dead letters would be read back as input")));
    }
    Ok(Some(dlq))
}

fn convert_feature(raw: RawFeature) -> Result<Feature, String> {
    let name = raw.name.into_inner();
    check_name(&name).map_err(|m| format!("feature name {:?} {m}", prefix(&name)))?;
    let at = |m: &str| format!("feature {name:?}: {m}");
    if let Some(field) = &raw.field {
        check_field(field).map_err(|m| at(&format!("`field` {m}")))?;
    }
    let aggregation = match raw.aggregation {
        RawAggregation::Count => Aggregation::Count,
        RawAggregation::Sum => Aggregation::Sum,
        RawAggregation::Min => Aggregation::Min,
        RawAggregation::Max => Aggregation::Max,
        RawAggregation::Avg => Aggregation::Avg,
        RawAggregation::Last => Aggregation::Last,
    };
    let field_type = raw.field_type.map(|t| match t {
        RawValueType::Int64 => ValueType::Int64,
        RawValueType::Double => ValueType::Double,
        RawValueType::String => ValueType::String,
        RawValueType::Bool => ValueType::Bool,
        RawValueType::Timestamp => ValueType::Timestamp,
    });
    let window = raw.window.map(|d| d.0);
    match (aggregation, &raw.field, window) {
        (Aggregation::Last, _, Some(_)) => return Err(at("a `last` feature takes no window")),
        (Aggregation::Last, None, _) => {
            return Err(at("a `last` feature needs the `field` it keeps"));
        }
        (Aggregation::Count, Some(_), _) => {
            return Err(at("`count` counts events and takes no `field`"));
        }
        (Aggregation::Count, None, None) | (Aggregation::Sum | Aggregation::Min | Aggregation::Max | Aggregation::Avg, _, None) => {
            return Err(at("a windowed aggregation needs a `window`, such as \"10s\" or \"1h\""));
        }
        (Aggregation::Sum | Aggregation::Min | Aggregation::Max | Aggregation::Avg, None, _) => {
            return Err(at("this aggregation needs the numeric `field` it aggregates"));
        }
        _ => {}
    }
    if window.is_some_and(|w| w < Duration::from_secs(1)) {
        return Err(at("windows shorter than 1s are not supported"));
    }
    let field_type = match aggregation {
        Aggregation::Count => ValueType::Int64,
        Aggregation::Last => field_type.ok_or_else(|| at("a `last` feature needs the `type` of its field"))?,
        _ => match field_type {
            Some(t @ (ValueType::Int64 | ValueType::Double)) => t,
            Some(_) => {
                return Err(at("sum, min, max and avg need a numeric `type` (int64 or double)"));
            }
            None => return Err(at("needs the `type` of its field (int64 or double)")),
        },
    };
    let series = window.map(|w| state::series_key(raw.field.as_deref(), w));
    // `slot` is known once every feature of the view is.
    Ok(Feature { name, description: raw.description, aggregation, field: raw.field, field_type, window, series, slot: 0 })
}

/// Names travel in feature references, metrics labels and change
/// notifications, so they are short identifiers.
const MAX_NAME_BYTES: usize = 128;

fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAME_BYTES).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok { Ok(()) } else { Err(format!("must be 1 to {MAX_NAME_BYTES} letters, digits and '_', not starting with a digit")) }
}

/// Source field names end up in tile series keys, which the state codec
/// stores with a 16-bit length.
fn check_field(field: &str) -> Result<(), String> {
    if (1..=255).contains(&field.len()) { Ok(()) } else { Err("must name a source field (1 to 255 bytes)".into()) }
}

/// At most 64 bytes of `text`, cut on a character boundary, for messages.
fn prefix(text: &str) -> &str {
    &text[..text.floor_char_boundary(64)]
}

/// A message of at most 512 bytes: a key name a megabyte long is quoted in
/// part.
fn shorten(mut message: String) -> String {
    if message.len() > 512 {
        message.truncate(message.floor_char_boundary(509));
        message.push('…');
    }
    message
}

fn line_of(text: &str, byte: usize) -> usize {
    // Bytes, so a span that is not on a character boundary cannot panic.
    text.as_bytes()[..byte.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[view]]
name = "user_activity"
entity = "user_id"
entity_type = "int64"
max_age = "7d"
freshness_budget = "5s"
allowed_lateness = "1m"

[view.source]
topics = ["app.public.user_events"]
format = "debezium"
event_time = "occurred_at"
on_delete = "retract"

[[view.feature]]
name = "events_10s"
aggregation = "count"
window = "10s"

[[view.feature]]
name = "last_event_type"
aggregation = "last"
field = "event_type"
type = "string"
"#;

    #[test]
    fn postgres_sources_name_a_table_a_slot_and_a_publication() {
        let postgres = |extra: &str| {
            GOOD.replace("topics = [\"app.public.user_events\"]\nformat = \"debezium\"", &format!("format = \"postgres\"\n{extra}"))
        };
        let catalog =
            Catalog::parse(&postgres("table = \"app.user_events\"\nslot = \"freshet_app\"\npublication = \"freshet\""), "v").unwrap();
        let source = &catalog.views[0].source;
        assert_eq!(source.format, Format::Postgres);
        assert_eq!(source.topics, vec!["postgres:freshet_app".to_string()]);
        assert!(catalog.kafka_topics().is_empty(), "no Kafka topic to subscribe to");
        let pg = source.postgres.as_ref().unwrap();
        assert_eq!((pg.schema.as_str(), pg.table.as_str(), pg.url_env.as_str()), ("app", "user_events", "FRESHET_SOURCE_DATABASE_URL"));
        let in_public = Catalog::parse(&postgres("table = \"user_events\"\nslot = \"s\"\npublication = \"p\""), "v").unwrap();
        assert_eq!(in_public.views[0].source.postgres.as_ref().unwrap().schema, "public");

        for (extra, says) in [
            ("slot = \"s\"\npublication = \"p\"", "source.table"),
            ("table = \"t\"\npublication = \"p\"", "source.slot"),
            ("table = \"t\"\nslot = \"Bad-Slot\"\npublication = \"p\"", "not a slot name"),
            ("table = \"t\\\"x\"\nslot = \"s\"\npublication = \"p\"", "not a Postgres name"),
            ("topics = [\"x\"]\ntable = \"t\"\nslot = \"s\"\npublication = \"p\"", "not source.topics"),
        ] {
            let e = error_of(&postgres(extra));
            assert!(e.message.contains(says), "{extra}: {e}");
        }
        // The documented example loads: every view on one slot.
        let direct = Catalog::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/views/direct.toml"))).unwrap();
        assert!(direct.views.iter().all(|v| v.source.postgres.as_ref().is_some_and(|p| p.slot == "freshet_app")));
        // Views sharing a slot share its publication.
        let two = format!("{GOOD}\n{}", GOOD.replace("user_activity", "other"));
        let pg = |text: &str, publication: &str| {
            text.replacen(
                "topics = [\"app.public.user_events\"]\nformat = \"debezium\"",
                &format!("format = \"postgres\"\ntable = \"t\"\nslot = \"s\"\npublication = \"{publication}\""),
                1,
            )
        };
        let e = error_of(&pg(&pg(&two, "p1"), "p2"));
        assert!(e.message.contains("views sharing a slot share both"), "{e}");
        assert!(Catalog::parse(&pg(&pg(&two, "p1"), "p1"), "v").is_ok());
        let e = error_of(&GOOD.replace("format = \"debezium\"", "format = \"debezium\"\nslot = \"s\""));
        assert!(e.message.contains("source.slot is for format = \"postgres\" only"), "{e}");
    }

    fn error_of(text: &str) -> ViewError {
        Catalog::parse(text, "views.toml").unwrap_err()
    }

    #[test]
    fn reads_a_good_file() {
        let catalog = Catalog::parse(GOOD, "views.toml").unwrap();
        let view = catalog.view("user_activity").unwrap();
        assert_eq!(view.entity_type, KeyType::Int64);
        assert_eq!(view.allowed_lateness, Duration::from_secs(60));
        assert_eq!(view.source.on_delete, DeletePolicy::Retract);
        assert_eq!(view.source.on_update, UpdatePolicy::Ignore);
        assert_eq!(view.features[0].window, Some(Duration::from_secs(10)));
        assert_eq!(view.feature("last_event_type").unwrap().value_type(), ValueType::String);
        assert_eq!(catalog.topics(), vec!["app.public.user_events".to_string()]);
        assert_eq!(view.dlq_topic("app.public.user_events"), "app.public.user_events.dlq");
    }

    #[test]
    fn unknown_aggregation_names_its_line() {
        let e = error_of(&GOOD.replace("aggregation = \"count\"", "aggregation = \"median\""));
        assert_eq!(e.line, Some(18), "{e}");
        assert!(e.message.contains("median"), "{e}");
    }

    #[test]
    fn missing_entity_is_named() {
        let e = error_of(&GOOD.replace("entity = \"user_id\"\n", ""));
        assert!(e.message.contains("entity"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn bad_window_names_its_line() {
        let e = error_of(&GOOD.replace("window = \"10s\"", "window = \"10 parsecs\""));
        assert_eq!(e.line, Some(19), "{e}");
        assert!(e.message.contains("unknown unit"), "{e}");
        assert!(e.to_string().starts_with("views.toml:19: "), "{e}");
    }

    #[test]
    fn typo_in_a_key_is_refused() {
        let e = error_of(&GOOD.replace("max_age", "maxage"));
        assert!(e.message.contains("maxage"), "{e}");
    }

    #[test]
    fn cross_field_rules_name_the_feature() {
        let e = error_of(&GOOD.replace("aggregation = \"count\"", "aggregation = \"sum\""));
        assert!(e.message.contains("events_10s") && e.message.contains("field"), "{e}");
        assert_eq!(e.line, Some(17), "{e}");

        let e = error_of(&GOOD.replace("aggregation = \"count\"", "aggregation = \"min\"\nfield = \"x\"\ntype = \"double\""));
        assert!(e.message.contains("cannot be retracted"), "{e}");

        let e = error_of(&GOOD.replace("window = \"10s\"", ""));
        assert!(e.message.contains("needs a `window`"), "{e}");
    }

    /// A second view reading `topic`, to append to GOOD.
    fn view_reading(name: &str, topic: &str) -> String {
        GOOD[GOOD.find("[[view]]").unwrap()..].replace("user_activity", name).replace("app.public.user_events", topic)
    }

    #[test]
    fn a_dead_letter_topic_that_is_a_source_is_refused() {
        // The view's own topic, with the line of the setting.
        let own = GOOD.replace("on_delete = \"retract\"", "on_delete = \"retract\"\ndlq_topic = \"app.public.user_events\"");
        let e = error_of(&own);
        assert_eq!(e.line, Some(15), "{e}");
        assert!(e.message.contains("dlq_topic") && e.message.contains("source topic"), "{e}");
        // Another view's topic.
        let other = format!(
            "{}\n{}",
            GOOD.replace("on_delete = \"retract\"", "on_delete = \"retract\"\ndlq_topic = \"orders\""),
            view_reading("orders_view", "orders")
        );
        let e = error_of(&other);
        assert_eq!(e.line, Some(15), "{e}");
        assert!(e.message.contains("\"orders\""), "{e}");
        // The default, `<topic>.dlq`, read by another view.
        let default = format!("{GOOD}\n{}", view_reading("rereads", "app.public.user_events.dlq"));
        let e = error_of(&default);
        assert_eq!(e.line, Some(11), "the line of source.topics: {e}");
        assert!(e.message.contains("default dead-letter topic") && e.message.contains("set source.dlq_topic"), "{e}");
        // A dead-letter topic nobody reads is fine.
        let fine = GOOD.replace("on_delete = \"retract\"", "on_delete = \"retract\"\ndlq_topic = \"poison\"");
        assert_eq!(Catalog::parse(&fine, "v").unwrap().views[0].dlq_topic("app.public.user_events"), "poison");
    }

    #[test]
    fn topic_names_follow_kafkas_rule() {
        let e = error_of(&GOOD.replace("app.public.user_events", "user events"));
        assert_eq!(e.line, Some(11), "{e}");
        assert!(e.message.contains("not a Kafka topic name"), "{e}");
        let e = error_of(&GOOD.replace("on_delete = \"retract\"", "on_delete = \"retract\"\ndlq_topic = \"\""));
        assert_eq!(e.line, Some(15), "{e}");
    }

    #[test]
    fn durations_that_would_overflow_name_their_line() {
        for (setting, line) in
            [("max_age = \"7d\"", 6), ("freshness_budget = \"5s\"", 7), ("allowed_lateness = \"1m\"", 8), ("window = \"10s\"", 19)]
        {
            let key = setting.split(" = ").next().unwrap();
            let e = error_of(&GOOD.replace(setting, &format!("{key} = \"106751991168d\"")));
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains("longest supported, 3650d"), "{e}");
        }
        let e = error_of(&GOOD.replace("allowed_lateness = \"1m\"", "allowed_lateness = \"1m\"\nmax_future = \"3651d\""));
        assert_eq!(e.line, Some(9), "{e}");
        assert!(GOOD.contains("max_age = \"7d\"") && Catalog::parse(&GOOD.replace("\"7d\"", "\"3650d\""), "v").is_ok());
    }

    #[test]
    fn max_future_has_a_default_and_must_be_positive() {
        assert_eq!(Catalog::parse(GOOD, "v").unwrap().views[0].max_future, Duration::from_secs(300));
        let set = GOOD.replace("allowed_lateness = \"1m\"", "allowed_lateness = \"1m\"\nmax_future = \"30s\"");
        assert_eq!(Catalog::parse(&set, "v").unwrap().views[0].max_future, Duration::from_secs(30));
        let e = error_of(&GOOD.replace("allowed_lateness = \"1m\"", "allowed_lateness = \"1m\"\nmax_future = \"0s\""));
        assert_eq!(e.line, Some(9), "{e}");
        assert!(e.message.contains("max_future must be greater than zero"), "{e}");
    }

    #[test]
    fn features_per_view_are_bounded() {
        let feature = |i: usize| format!("[[view.feature]]\nname = \"n{i}\"\naggregation = \"count\"\nwindow = \"{}s\"\n", i + 1);
        let head = &GOOD[..GOOD.find("[[view.feature]]").unwrap()];
        let with = |n: usize| format!("{head}{}", (0..n).map(feature).collect::<String>());
        assert_eq!(Catalog::parse(&with(MAX_FEATURES), "v").unwrap().views[0].features.len(), MAX_FEATURES);
        let e = error_of(&with(MAX_FEATURES + 1));
        assert!(e.message.contains("1001 features, more than the 1000"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn a_field_has_one_type() {
        let e = error_of(&format!(
            "{GOOD}\n[[view.feature]]\nname = \"type_len\"\naggregation = \"sum\"\nfield = \"event_type\"\ntype = \"int64\"\nwindow = \"1m\"\n"
        ));
        assert!(e.message.contains("\"type_len\"") && e.message.contains("another `type`"), "{e}");
        assert_eq!(e.line, Some(28), "{e}");
    }

    #[test]
    fn source_field_names_are_1_to_255_bytes() {
        let long = "f".repeat(256);
        for (from, to, line) in [
            ("field = \"event_type\"", "field = \"\"".to_string(), 22),
            ("field = \"event_type\"", format!("field = \"{long}\""), 22),
            ("entity = \"user_id\"", format!("entity = \"{long}\""), 3),
            ("event_time = \"occurred_at\"", "event_time = \"\"".to_string(), 3),
        ] {
            let e = error_of(&GOOD.replace(from, &to));
            assert!(e.message.contains("must name a source field (1 to 255 bytes)"), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
        }
        let longest = format!("field = \"{}x\"", "é".repeat(127));
        assert!(Catalog::parse(&GOOD.replace("field = \"event_type\"", &longest), "v").is_ok());
    }

    #[test]
    fn a_long_unknown_key_is_quoted_in_part() {
        let e = error_of(&GOOD.replace("max_age", &"k".repeat(1_000_000)));
        assert!(e.message.len() <= 512 && e.message.ends_with('…'), "{} bytes", e.message.len());
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn windowed_features_sharing_a_field_and_width_share_a_series() {
        let text = format!(
            "{GOOD}\n[[view.feature]]\nname = \"events_11s\"\naggregation = \"count\"\nwindow = \"11s\"\n\n[[view.feature]]\nname = \"events_1h\"\naggregation = \"count\"\nwindow = \"1h\"\n"
        );
        let view = Catalog::parse(&text, "v").unwrap().views.remove(0);
        // 10 s and 11 s windows both have 200 ms tiles (the 100 ms floor does
        // not apply); the series is kept as long as the longer one needs.
        let keys: Vec<(&str, i64, i64)> = view.series.iter().map(|s| (s.key.as_str(), s.width_ms, s.horizon_ms)).collect();
        assert_eq!(keys, [("*@200", 200, 10_000), ("*@220", 220, 11_000), ("*@72000", 72_000, 3_600_000)]);
        assert_eq!(view.feature("events_1h").unwrap().series.as_deref(), Some("*@72000"));
        assert_eq!(view.feature("last_event_type").unwrap().series, None);
        // Slots: each windowed feature's series, each `last` feature's rank.
        let slots: Vec<(&str, usize)> = view.features.iter().map(|f| (f.name.as_str(), f.slot)).collect();
        assert_eq!(slots, [("events_10s", 0), ("last_event_type", 0), ("events_11s", 1), ("events_1h", 2)]);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[view.feature]]").unwrap()..]);
        assert!(error_of(&twice).message.contains("declared twice"));
    }

    #[test]
    fn overlong_names_are_refused() {
        let long = "v".repeat(MAX_NAME_BYTES + 1);
        let e = error_of(&GOOD.replace("name = \"user_activity\"", &format!("name = \"{long}\"")));
        assert!(e.message.contains("1 to 128"), "{e}");
    }
}
