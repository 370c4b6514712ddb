//! Loading and validating a feature-view file.
//!
//! Shape errors (unknown key, unknown aggregation, a window that is not a
//! duration, a missing `entity`) come from serde while the TOML is read, so
//! they carry the span of the offending value. Rules that involve several
//! fields (a `sum` needs a numeric `field`, `retract` cannot undo `min`) are
//! checked afterwards against spanned names, so they name a line too.

use std::{collections::HashSet, fmt, ops::Range, path::Path, time::Duration};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Aggregation, Catalog, DeletePolicy, Feature, FeatureView, Format, KeyType, Source, UpdatePolicy, ValueType, duration};

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
    topics: Vec<String>,
    format: RawFormat,
    event_time: String,
    #[serde(default)]
    on_update: Option<RawUpdate>,
    #[serde(default)]
    on_delete: Option<Spanned<RawDelete>>,
    #[serde(default)]
    dlq_topic: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawFormat {
    Debezium,
    Json,
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
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| error(e.span(), e.message().to_string()))?;
        if raw.view.is_empty() {
            return Err(error(None, "no [[view]] is declared".into()));
        }
        let mut names = HashSet::new();
        let mut views = Vec::new();
        for raw_view in raw.view {
            let view_span = raw_view.span();
            let raw_view = raw_view.into_inner();
            let view = convert_view(raw_view).map_err(|(span, message)| error(Some(span.unwrap_or(view_span.clone())), message))?;
            if !names.insert(view.name.clone()) {
                return Err(error(Some(view_span), format!("view {:?} is declared twice", view.name)));
            }
            views.push(view);
        }
        Ok(Catalog { views })
    }
}

type Invalid = (Option<Range<usize>>, String);

fn convert_view(raw: RawView) -> Result<FeatureView, Invalid> {
    let name_span = raw.name.span();
    let name = raw.name.into_inner();
    check_name(&name).map_err(|m| (Some(name_span.clone()), format!("view name {name:?} {m}")))?;
    let at_view = |m: String| (Some(name_span.clone()), format!("view {name:?}: {m}"));
    if raw.source.topics.is_empty() {
        return Err(at_view("source.topics must name at least one topic".into()));
    }
    if raw.entity.is_empty() || raw.source.event_time.is_empty() {
        return Err(at_view("entity and source.event_time must name source fields".into()));
    }
    if raw.freshness_budget.0.is_zero() || raw.max_age.0.is_zero() {
        return Err(at_view("max_age and freshness_budget must be greater than zero".into()));
    }
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
    let mut features = Vec::new();
    let mut feature_names = HashSet::new();
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
        features.push(feature);
    }
    Ok(FeatureView {
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
        source: Source {
            topics: raw.source.topics,
            format: match raw.source.format {
                RawFormat::Debezium => Format::Debezium,
                RawFormat::Json => Format::Json,
            },
            event_time: raw.source.event_time,
            on_update,
            on_delete,
            dlq_topic: raw.source.dlq_topic,
        },
        features,
    })
}

fn convert_feature(raw: RawFeature) -> Result<Feature, String> {
    let name = raw.name.into_inner();
    check_name(&name).map_err(|m| format!("feature name {name:?} {m}"))?;
    let at = |m: &str| format!("feature {name:?}: {m}");
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
    Ok(Feature { name, description: raw.description, aggregation, field: raw.field, field_type, window })
}

/// Names end up in references ("view:feature") and metric labels.
/// Names travel in feature references, metrics labels and change
/// notifications, so they are short identifiers.
const MAX_NAME_BYTES: usize = 128;

fn check_name(name: &str) -> Result<(), String> {
    let ok =
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err("must be letters, digits and '_', not starting with a digit".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("is longer than {MAX_NAME_BYTES} bytes"));
    }
    Ok(())
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
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

    #[test]
    fn duplicate_names_are_refused() {
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[view.feature]]").unwrap()..]);
        assert!(error_of(&twice).message.contains("declared twice"));
    }

    #[test]
    fn overlong_names_are_refused() {
        let long = "v".repeat(MAX_NAME_BYTES + 1);
        let e = error_of(&GOOD.replace("name = \"user_activity\"", &format!("name = \"{long}\"")));
        assert!(e.message.contains("longer than 128 bytes"), "{e}");
    }
}
