-- Freshet's store: feature state, ingest progress, dead letters.

-- One row per (view, entity): its tiles and last values (store/src/state.rs),
-- encoded as in store/src/codec.rs.
-- Ingest rewrites a row inside the same transaction that advances offsets.
CREATE TABLE feature_state (
    view            text        NOT NULL,
    entity          text        NOT NULL,
    state           bytea       NOT NULL,
    newest_event_at timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (view, entity)
);
-- Rewritten on every commit that touches the entity: compressing it
-- (pglz) costs more CPU than the bytes it saves.
ALTER TABLE feature_state ALTER COLUMN state SET STORAGE EXTERNAL;

-- Where ingest stands, per (consumer group, topic, partition). This, not
-- Kafka's committed offsets, is the truth about progress. `owner_epoch` is
-- bumped by every instance that takes the partition; a commit only lands if
-- the epoch and `next_offset` are still the ones its batch started from.
CREATE TABLE ingest_offsets (
    consumer_group    text        NOT NULL,
    topic             text        NOT NULL,
    partition         integer     NOT NULL,
    -- Next offset to apply; -1 while nothing was ever committed.
    next_offset       bigint      NOT NULL DEFAULT -1,
    owner_epoch       bigint      NOT NULL DEFAULT 0,
    owner             text,
    -- Freshness status, written with each commit.
    high_watermark    bigint      NOT NULL DEFAULT -1,
    newest_event_at   timestamptz,
    last_commit_at    timestamptz,
    records_applied   bigint      NOT NULL DEFAULT 0,
    records_dead      bigint      NOT NULL DEFAULT 0,
    records_late      bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Records sent to a dead-letter topic, committed with the offsets that skip
-- them: the audit trail of what was not applied, and why.
CREATE TABLE dead_letters (
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    dlq_topic       text        NOT NULL,
    error_class     text        NOT NULL,
    error_message   text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition, "offset")
);
