-- Active health checks during boot. A pool may name a URL where its workers
-- answer when they are up; the scheduler probes booting instances there
-- with exponential backoff until they answer or their phase deadline passes.
-- Probe bookkeeping lives in its own table so that the hot `instances` rows
-- (heartbeats, leases) are not widened for a state that lasts seconds.

ALTER TABLE pools
    ADD COLUMN health_check_url TEXT NOT NULL DEFAULT ''
        CHECK (length(health_check_url) <= 512);

CREATE TABLE instance_health (
    instance_id     UUID PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    -- Failed probes in a row; the next delay doubles with each.
    failures        INTEGER NOT NULL DEFAULT 0,
    -- Not probed before this time (backoff, or a claim by one replica).
    next_check_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_checked_at TIMESTAMPTZ,
    last_error      TEXT,
    -- The machine's private address, read from the provider once.
    address         TEXT
);
