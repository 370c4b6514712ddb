-- What each commit changed, per (view, entity): a delta of tiles and last
-- values (store/src/state.rs), appended without reading or locking anything,
-- so a commit costs what its batch changed and concurrent commits of one
-- entity never conflict. Readers merge an entity's `feature_state` row (its
-- base) with its deltas in id order; ingest folds deltas into the base in
-- the background and deletes them (store/src/entities.rs, `compact`).
-- Existing `feature_state` rows are bases as they are: nothing to convert.
CREATE TABLE feature_deltas (
    id      bigserial   PRIMARY KEY,
    view    text        NOT NULL,
    entity  text        NOT NULL,
    delta   bytea       NOT NULL
);
CREATE INDEX feature_deltas_by_entity ON feature_deltas (view, entity, id);
