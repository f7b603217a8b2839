-- Warm pools (issue #20): a pool may keep `warm_size` machines created at
-- the provider and not started, held in reserve, so `Provision` can start
-- one (about a second on Fly) instead of creating one (seconds). 0 means
-- none, the setting of every existing pool.
ALTER TABLE pools
    ADD COLUMN warm_size INTEGER NOT NULL DEFAULT 0
        CHECK (warm_size >= 0 AND warm_size <= 10000);

-- `warm`: the machine exists at the provider and was never started; the
-- instance is held in reserve for its pool. Its desired state is `warm`
-- (create it, do not start it) until `Provision` takes it (then
-- `running`) or the pool lets it go (then `terminated`).
ALTER TABLE instances DROP CONSTRAINT instances_state_check;
ALTER TABLE instances ADD CONSTRAINT instances_state_check CHECK (state IN (
    'requested', 'provisioning', 'booting', 'installing',
    'starting', 'ready', 'draining', 'stopping', 'stopped',
    'deleting', 'terminated', 'provisioning_failed',
    'startup_failed', 'worker_dead', 'lost', 'abandoned', 'warm'));
ALTER TABLE instances DROP CONSTRAINT instances_desired_state_check;
ALTER TABLE instances ADD CONSTRAINT instances_desired_state_check
    CHECK (desired_state IN ('running', 'terminated', 'warm'));
-- When `Provision` took the instance from its pool's warm stock: its
-- request time, from which its time to ready counts (`created_at` stays
-- when the row, and its machine, came to be).
ALTER TABLE instances ADD COLUMN warm_taken_at TIMESTAMPTZ;
-- The refill and the take look for a pool's warm stock.
CREATE INDEX instances_pool_warm ON instances (pool, created_at) WHERE state = 'warm';

-- One row per refill batch in the pools' audit log (a batch, not a
-- machine: a pool of 50 warm machines refilling after a burst says so
-- once, not 50 times).
ALTER TABLE pool_events
    DROP CONSTRAINT pool_events_action_check,
    ADD CONSTRAINT pool_events_action_check CHECK (action IN ('paused', 'resumed',
        'probe_started', 'probe_failed', 'probe_abandoned', 'spend_capped',
        'spend_cap_cleared', 'warm_refilled', 'warm_trimmed'));
