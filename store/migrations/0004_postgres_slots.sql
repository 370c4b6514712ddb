-- Replication slots freshet-ingest created on a source database for
-- `format = "postgres"` views: `freshet-ingest drop-slot` drops only these,
-- never a slot someone else made. The slot's checkpoint (commit LSN) lives
-- in ingest_offsets under the pseudo-topic 'postgres:<slot>', partition 0.
CREATE TABLE postgres_slots (
    slot            text        PRIMARY KEY,
    source_database text        NOT NULL,
    consumer_group  text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
