-- A pool that keeps failing stops spending. Every provisioning or startup
-- failure of an instance is recorded for its pool; enough of them within a
-- window pause the pool (in the transaction of the failure that tripped
-- it): no new machines are created for it until a cool-off lets one probe
-- instance through and it reaches `ready`, or an operator resumes the pool.
-- In PostgreSQL, so every scheduler replica agrees (see
-- flotilla_store::pool_pause).

ALTER TABLE pools
    ADD COLUMN paused_at TIMESTAMPTZ,
    ADD COLUMN paused_reason TEXT CHECK (length(paused_reason) <= 4096),
    -- When the one probe instance of a paused pool may go through. NULL
    -- while paused: no probe (an operator's pause waits for an operator).
    ADD COLUMN pause_probe_after TIMESTAMPTZ,
    -- The instance let through as the probe, while its outcome is open.
    ADD COLUMN pause_probe_instance UUID,
    ADD CONSTRAINT pools_pause_fields CHECK (
        paused_at IS NOT NULL OR (paused_reason IS NULL
                                  AND pause_probe_after IS NULL
                                  AND pause_probe_instance IS NULL));

-- Failures within the window; older ones are pruned as new ones arrive,
-- and a resume clears them.
CREATE TABLE pool_failures (
    id              BIGSERIAL PRIMARY KEY,
    pool            TEXT NOT NULL REFERENCES pools (name),
    instance_id     UUID NOT NULL,
    kind            TEXT NOT NULL
                    CHECK (kind IN ('provisioning_failed', 'startup_failed', 'restart_failed')),
    error           TEXT,
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX pool_failures_pool_at ON pool_failures (pool, at);

-- The audit log of pool-level acts (action_logs is per instance).
CREATE TABLE pool_events (
    id              BIGSERIAL PRIMARY KEY,
    pool            TEXT NOT NULL REFERENCES pools (name),
    action          TEXT NOT NULL
                    CHECK (action IN ('paused', 'resumed', 'probe_started', 'probe_failed',
                                      'probe_abandoned')),
    actor           TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    instance_id     UUID,
    reason          TEXT,
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX pool_events_pool ON pool_events (pool, id);
