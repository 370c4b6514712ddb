-- Which consumer group computes each view's state. Offsets are kept per
-- group, so a second group reading the same topics into the same rows would
-- count every event twice: ingest refuses to run a view another group owns,
-- and `freshet-ingest take-over` moves views (with their offsets) between
-- groups, fencing the old one.
CREATE TABLE view_owners (
    view            text        PRIMARY KEY,
    consumer_group  text        NOT NULL,
    since           timestamptz NOT NULL DEFAULT now()
);
