//! Feature views: what Freshet computes and serves, as declared in a TOML
//! file that users read like documentation (see `deploy/views/`).
//!
//! A view names a source (Kafka topics holding Debezium change events or
//! plain JSON, or a Postgres table read from a logical replication slot),
//! the field that identifies the entity, the field that carries
//! event time, and its features: windowed aggregations (`count`, `sum`,
//! `min`, `max`, `avg`) and `last` values. Everything is validated on load,
//! and each error names the file, line and field (see `file.rs`).

pub mod duration;
mod file;

use std::{collections::HashMap, time::Duration};

pub use file::{MAX_FEATURES, ViewError};

use crate::state::Series;

/// All views of one deployment, loaded from one file.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub views: Vec<FeatureView>,
}

#[derive(Debug, Clone)]
pub struct FeatureView {
    pub name: String,
    pub description: String,
    /// Source field holding the entity key.
    pub entity: String,
    pub entity_type: KeyType,
    /// Values whose event time is older than this are not served as PRESENT.
    pub max_age: Duration,
    /// How far behind the view may fall before freshness says "stale".
    pub freshness_budget: Duration,
    /// Events older than the partition's newest event time minus this are
    /// "too late": counted, and kept out of windows.
    pub allowed_lateness: Duration,
    /// Events dated further than this ahead of their record's timestamp are
    /// poison: one wrong clock must not move the lateness reference.
    pub max_future: Duration,
    pub source: Source,
    pub features: Vec<Feature>,
    /// The tile series the windowed features read, worked out on load.
    pub series: Vec<Series>,
    /// Index of each feature in `features` by name: a request names up to
    /// a thousand, so [`FeatureView::feature`] must not search. The names
    /// come from the view file, not from callers, so a fast hash is safe.
    pub(crate) by_name: HashMap<String, usize, foldhash::fast::RandomState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Int64,
    String,
}

#[derive(Debug, Clone)]
pub struct Source {
    /// Kafka topics; for a Postgres source, its slot's one pseudo-topic
    /// (see [`PostgresSource::topic`]), under which its checkpoint is kept.
    pub topics: Vec<String>,
    pub format: Format,
    /// Set exactly when `format` is [`Format::Postgres`].
    pub postgres: Option<PostgresSource>,
    /// Source field holding event time (RFC 3339 text or epoch milliseconds).
    pub event_time: String,
    pub on_update: UpdatePolicy,
    pub on_delete: DeletePolicy,
    /// Where poison records go; `None` means "<topic>.dlq".
    pub dlq_topic: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Debezium change-event envelope, with or without the JSON converter's
    /// `{schema, payload}` wrapper.
    Debezium,
    /// One JSON object per record: the event itself.
    Json,
    /// Rows of a Postgres table, streamed from a logical replication slot
    /// (`pgoutput`) by freshet-ingest itself, without Kafka.
    Postgres,
}

/// Where a Postgres-sourced view reads: one table, through a publication
/// and a slot that views of the same database may share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSource {
    /// Environment variable holding the source database URL (kept out of
    /// the file: it may carry a password).
    pub url_env: String,
    pub publication: String,
    pub slot: String,
    pub schema: String,
    pub table: String,
}

impl PostgresSource {
    /// The pseudo-topic a slot's checkpoint is stored under, as partition 0.
    pub fn topic(slot: &str) -> String {
        format!("postgres:{slot}")
    }
}

/// What a Debezium update (`op = "u"`) does to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePolicy {
    /// Updates are ignored: the table is append-only in spirit.
    Ignore,
    /// The row's new image counts as a new event.
    Apply,
    /// The old image is retracted from windows and the new one applied
    /// (needs the old image: `REPLICA IDENTITY FULL` on the source table).
    Replace,
}

/// What a Debezium delete (`op = "d"`) does to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletePolicy {
    Ignore,
    /// The deleted row is taken back out of count, sum and avg windows.
    Retract,
}

#[derive(Debug, Clone)]
pub struct Feature {
    pub name: String,
    pub description: String,
    pub aggregation: Aggregation,
    /// Source field aggregated; `None` only for `count`.
    pub field: Option<String>,
    /// Type of the source field (int64 for `count`).
    pub field_type: ValueType,
    /// `None` only for `last`.
    pub window: Option<Duration>,
    /// Key of the tile series it reads (see [`Series`]); `None` only for `last`.
    pub series: Option<String>,
    /// Its place among what a served state keeps (set on load): the index
    /// of its series in [`FeatureView::series`], or, for `last`, its index
    /// among the view's `last` features. The server indexes by it rather
    /// than looking names up on every call.
    pub slot: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Int64,
    Double,
    String,
    Bool,
    Timestamp,
}

impl Catalog {
    pub fn view(&self, name: &str) -> Option<&FeatureView> {
        self.views.iter().find(|v| v.name == name)
    }

    /// Every topic any view reads, once.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.views.iter().flat_map(|v| v.source.topics.clone()).collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// The Kafka topics views read (not the pseudo-topics of Postgres slots).
    pub fn kafka_topics(&self) -> Vec<String> {
        let mut topics = self.topics();
        topics.retain(|t| self.views_of_topic(t).all(|v| v.source.postgres.is_none()));
        topics
    }

    /// `view` and every view that shares a topic with it, directly or through
    /// another such view, with all their topics: what rewinding `view`'s
    /// topics affects. `None` if there is no such view.
    pub fn sharing_topics_with(&self, view: &str) -> Option<(Vec<String>, Vec<String>)> {
        let mut topics: Vec<String> = self.view(view)?.source.topics.clone();
        let mut names: Vec<String> = vec![view.to_string()];
        loop {
            let before = (names.len(), topics.len());
            for v in &self.views {
                if v.source.topics.iter().any(|t| topics.contains(t)) && !names.contains(&v.name) {
                    names.push(v.name.clone());
                }
                if names.contains(&v.name) {
                    topics.extend(v.source.topics.iter().filter(|t| !topics.contains(t)).cloned().collect::<Vec<_>>());
                }
            }
            if (names.len(), topics.len()) == before {
                return Some((names, topics));
            }
        }
    }

    /// The views computed from `topic`.
    pub fn views_of_topic<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a FeatureView> + 'a {
        self.views.iter().filter(move |v| v.source.topics.iter().any(|t| t == topic))
    }
}

impl FeatureView {
    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.by_name.get(name).map(|&i| &self.features[i])
    }

    pub fn dlq_topic(&self, topic: &str) -> String {
        self.source.dlq_topic.clone().unwrap_or_else(|| format!("{topic}.dlq"))
    }
}

impl Feature {
    /// The type of the served value.
    pub fn value_type(&self) -> ValueType {
        match self.aggregation {
            Aggregation::Count => ValueType::Int64,
            Aggregation::Avg => ValueType::Double,
            _ => self.field_type,
        }
    }
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Count => "count",
            Aggregation::Sum => "sum",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Avg => "avg",
            Aggregation::Last => "last",
        }
    }
}
