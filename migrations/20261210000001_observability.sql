-- What on-call needs to reconstruct an incident and to see the fleet's
-- timings.
--
-- When an instance's termination was first asked for (its desired state
-- became `terminated`), so the terminator can measure request → terminated
-- exactly (`flotilla_instance_termination_seconds`). Rows asked to
-- terminate before this migration have none and are not measured.
ALTER TABLE instances ADD COLUMN terminate_requested_at TIMESTAMPTZ;

-- The heartbeat interval the api told the worker's agent when it
-- registered: the watchdog sums 1/interval over live registered workers
-- to export how many heartbeats per second the api should be receiving
-- (`flotilla_heartbeats_expected_per_second`). NULL for a worker whose
-- agent never registered (it is known by its health checks only).
ALTER TABLE instances ADD COLUMN heartbeat_interval_ms INTEGER
    CHECK (heartbeat_interval_ms > 0);

-- New acts in an instance's history, each written in the transaction of
-- the write it records (an orphan delete, which is a provider call only,
-- once the provider confirmed it):
--   machine_adopted / volume_adopted: a machine or volume an earlier
--     attempt created was found by its ownership tag and recorded for the
--     instance instead of creating another;
--   orphan_deleted: the orphan scan deleted a machine or volume tagged
--     with this instance that the instance does not (or no longer) own;
--   dead_verdict_held: the storm guard held the verdict that the worker is
--     dead (once per hold and suspicion, like lost_verdict_held).
ALTER TABLE action_logs
    DROP CONSTRAINT action_logs_action_check,
    ADD CONSTRAINT action_logs_action_check CHECK (action IN ('terminate_requested',
        'drain_requested', 'lost_verdict_held', 'step_retried', 'uncordoned',
        'machine_adopted', 'volume_adopted', 'orphan_deleted', 'dead_verdict_held'));
