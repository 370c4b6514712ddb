//! The FeatureService: where features are served.
//!
//! GetFeatures resolves and validates the request (`request.rs`), reads every
//! (view, entity) state it needs in one round trip (`reader.rs`), and
//! evaluates each feature as of the moment it answers, enforcing max age.

use std::{sync::Arc, time::Duration};

use freshet_proto::v1::{
    EntityFeatures, Feature as ProtoFeature, FeatureView as ProtoView, GetFeaturesRequest, GetFeaturesResponse, GetFreshnessRequest,
    GetFreshnessResponse, ListFeatureViewsRequest, ListFeatureViewsResponse, PartitionFreshness, ReplicationSlot, ValueType as ProtoType,
    ViewFreshness, feature_service_server::FeatureService,
};
use freshet_store::{
    offsets,
    view::{Catalog, KeyType, ValueType},
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::{
    evaluate, freshness,
    health::unavailable,
    layers::deadline::CallDeadline,
    reader::{CacheOutcome, Reader},
    request,
};

pub struct Features {
    pub catalog: Arc<Catalog>,
    pub reader: Reader,
    /// Ingest's consumer group, whose progress GetFreshness reports.
    pub group: String,
    pub limits: request::Limits,
    pub watermarks: crate::watermarks::Watermarks,
    /// The CDC source database, to report its replication slots.
    pub source: Option<PgPool>,
    pub metrics: std::sync::Arc<crate::metrics::ServerMetrics>,
}

#[tonic::async_trait]
impl FeatureService for Features {
    async fn get_features(&self, request: Request<GetFeaturesRequest>) -> Result<Response<GetFeaturesResponse>, Status> {
        let deadline = request.extensions().get::<CallDeadline>().map(|d| d.0);
        let request = request.into_inner();
        let plan = request::plan(&self.catalog, &request, self.limits)?;
        let now_ms = now_ms();
        let (states, cache) = self.reader.read(&plan.views, &plan.entities, deadline.map(|d| d.into_std())).await?;
        let stale_cache_age = match cache {
            CacheOutcome::Stale(age) => Some(duration(age)),
            _ => None,
        };
        self.metrics.cache_read(cache.as_str());
        tracing::Span::current().record("cache", tracing::field::debug(cache));
        let mut values = evaluate::evaluate(&plan, &states, now_ms, || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)).await?;
        // An entity asked for twice was evaluated once: its last row takes
        // the values, earlier ones a copy.
        let mut uses = vec![0usize; values.len()];
        for &row in &plan.rows {
            uses[row] += 1;
        }
        let results = request
            .entities
            .into_iter()
            .zip(&plan.rows)
            .map(|(key, &row)| {
                uses[row] -= 1;
                let values = if uses[row] == 0 { std::mem::take(&mut values[row]) } else { values[row].clone() };
                EntityFeatures { entity: Some(key), values }
            })
            .collect();
        Ok(Response::new(GetFeaturesResponse {
            feature_names: request.features,
            results,
            served_at: Some(timestamp(now_ms)),
            stale_cache_age,
        }))
    }

    async fn get_freshness(&self, request: Request<GetFreshnessRequest>) -> Result<Response<GetFreshnessResponse>, Status> {
        let asked = request.into_inner().views;
        let views = request::freshness_views(&self.catalog, &asked)?;
        let topics = self.catalog.topics();
        let postgres = &self.reader.postgres;
        let mut statuses = postgres.run(offsets::status(&postgres.pool, &self.group, &topics)).await?;
        for p in &mut statuses {
            if let Some(high) = self.watermarks.get(&p.topic, p.partition) {
                p.high_watermark = p.high_watermark.max(high);
            }
        }
        let replication_slots = match &self.source {
            Some(source) => replication_slots(source).await.map_err(unavailable)?,
            None => Vec::new(),
        };
        let now_ms = now_ms();
        let views = views
            .into_iter()
            .map(|view| {
                let partitions: Vec<PartitionFreshness> = statuses
                    .iter()
                    .filter(|p| view.source.topics.contains(&p.topic))
                    .map(|p| freshness::partition(p, view.freshness_budget, now_ms, &replication_slots))
                    .collect();
                let age_ms = statuses
                    .iter()
                    .filter(|p| view.source.topics.contains(&p.topic) && freshness::lag(p) > 0)
                    .map(|p| p.newest_event_ms.map_or(0, |t| (now_ms - t).max(0)))
                    .max()
                    .unwrap_or(0);
                ViewFreshness {
                    view: view.name.clone(),
                    budget: Some(duration(view.freshness_budget)),
                    age: Some(duration(Duration::from_millis(age_ms as u64))),
                    verdict: freshness::worst(partitions.iter().map(|p| p.verdict())) as i32,
                    partitions,
                }
            })
            .collect();
        Ok(Response::new(GetFreshnessResponse { views, served_at: Some(timestamp(now_ms)), replication_slots }))
    }

    async fn list_feature_views(&self, _: Request<ListFeatureViewsRequest>) -> Result<Response<ListFeatureViewsResponse>, Status> {
        Ok(Response::new(list_views(&self.catalog)))
    }
}

pub async fn replication_slots(source: &PgPool) -> Result<Vec<ReplicationSlot>, sqlx::Error> {
    let rows: Vec<(String, bool, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT slot_name::text, active,
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8,
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
         FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name",
    )
    .fetch_all(source)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, active, lag, retained)| ReplicationSlot {
            name,
            active,
            lag_bytes: lag.unwrap_or(0),
            retained_bytes: retained.unwrap_or(0),
        })
        .collect())
}

pub fn list_views(catalog: &Catalog) -> ListFeatureViewsResponse {
    let views = catalog
        .views
        .iter()
        .map(|v| ProtoView {
            name: v.name.clone(),
            description: v.description.clone(),
            entity: v.entity.clone(),
            entity_type: match v.entity_type {
                KeyType::Int64 => ProtoType::Int64,
                KeyType::String => ProtoType::String,
            } as i32,
            topics: v.source.topics.clone(),
            max_age: Some(duration(v.max_age)),
            freshness_budget: Some(duration(v.freshness_budget)),
            features: v
                .features
                .iter()
                .map(|f| ProtoFeature {
                    name: f.name.clone(),
                    aggregation: f.aggregation.as_str().into(),
                    field: f.field.clone().unwrap_or_default(),
                    r#type: proto_type(f.value_type()) as i32,
                    window: f.window.map(duration),
                    description: f.description.clone(),
                })
                .collect(),
        })
        .collect();
    ListFeatureViewsResponse { views }
}

fn proto_type(t: ValueType) -> ProtoType {
    match t {
        ValueType::Int64 => ProtoType::Int64,
        ValueType::Double => ProtoType::Double,
        ValueType::String => ProtoType::String,
        ValueType::Bool => ProtoType::Bool,
        ValueType::Timestamp => ProtoType::Timestamp,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}
