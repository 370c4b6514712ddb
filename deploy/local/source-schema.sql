-- Source tables of the reference application, in schema public of database
-- "app" (next to Freshet's own database "freshet" on the same server).
-- `deploy/local/services.sh connector DIR` creates the database, applies this
-- file and captures both tables with Debezium into the Kafka topics
-- app.public.user_events and app.public.orders. Safe to apply again.

CREATE TABLE IF NOT EXISTS public.user_events (
    event_id    bigserial   PRIMARY KEY,
    user_id     bigint      NOT NULL,
    event_type  text        NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.orders (
    order_id   bigserial     PRIMARY KEY,
    user_id    bigint        NOT NULL,
    amount     numeric(12,2) NOT NULL,
    items      int           NOT NULL DEFAULT 1,
    express    boolean,
    ordered_at timestamptz   NOT NULL DEFAULT now()
);

-- Updates and deletes carry the whole old row ("before" in the change
-- event), not just the primary key, so a consumer can undo what the old
-- row had contributed.
ALTER TABLE public.user_events REPLICA IDENTITY FULL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;
