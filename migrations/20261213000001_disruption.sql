-- Voluntary disruption (issue #20): disruption budgets, max lifetime and
-- idle stop, all pool settings, and on each instance why capacity is
-- taking it away and since when its worker reports idle.
--
-- The budget is a count ('3') or a percentage of the pool's instances
-- rounded up ('10%', the default, as Karpenter's); it bounds how many of
-- the pool's instances are being voluntarily disrupted at once (see
-- flotilla_core::disruption). 0 in the two durations means off, the state
-- of every existing pool.
ALTER TABLE pools
    ADD COLUMN disruption_budget TEXT NOT NULL DEFAULT '10%'
        CHECK (disruption_budget ~ '^([0-9]{1,5}|([0-9]{1,2}|100)%)$'),
    ADD COLUMN max_lifetime_seconds INTEGER NOT NULL DEFAULT 0
        CHECK (max_lifetime_seconds >= 0),
    ADD COLUMN idle_timeout_seconds INTEGER NOT NULL DEFAULT 0
        CHECK (idle_timeout_seconds >= 0);

-- Why capacity is taking a healthy instance away (NULL: it is not):
--   scale_down: above the desired capacity while serving;
--   expiring: past the max lifetime, its replacement on the way (it still
--     serves; its replacement counts in its place);
--   expired: past the max lifetime and replaced, being drained;
--   idle: reported idle for the pool's idle timeout, being drained.
-- An instance so marked counts against its pool's budget until it is
-- terminal. Since when the worker has reported idle without a break (NULL
-- while busy): written with the heartbeat that says so.
ALTER TABLE instances
    ADD COLUMN disruption TEXT
        CHECK (disruption IN ('scale_down', 'expiring', 'expired', 'idle')),
    ADD COLUMN idle_since TIMESTAMPTZ;

-- Each activation of pool capacity counts a pool's disrupted instances.
CREATE INDEX instances_disrupted ON instances (pool)
    WHERE disruption IS NOT NULL AND state NOT IN ('terminated', 'abandoned');

-- The history of an instance past its max lifetime starts with the
-- request for its replacement (it keeps serving until that is ready).
ALTER TABLE action_logs
    DROP CONSTRAINT action_logs_action_check,
    ADD CONSTRAINT action_logs_action_check CHECK (action IN ('terminate_requested',
        'drain_requested', 'lost_verdict_held', 'step_retried', 'uncordoned',
        'machine_adopted', 'volume_adopted', 'orphan_deleted', 'dead_verdict_held',
        'replacement_requested'));
