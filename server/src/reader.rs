//! Reading feature state for a request: one round trip to Postgres for all
//! (view, entity) pairs it needs.

use std::collections::HashMap;

use freshet_store::{entities, entities::RowKey, state::EntityState, view::FeatureView};
use sqlx::PgPool;
use tonic::Status;

use crate::service::unavailable;

#[derive(Clone)]
pub struct Reader {
    pub pool: PgPool,
}

impl Reader {
    pub async fn read(
        &self,
        views: &[&FeatureView],
        entities: &[String],
    ) -> Result<HashMap<RowKey, EntityState>, Status> {
        let view_names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        let keys: Vec<&str> = entities.iter().map(String::as_str).collect();
        entities::read(&self.pool, &view_names, &keys)
            .await
            .map_err(unavailable)
    }
}
