-- Spend caps (issue #20): a pool may cap what its live instances cost per
-- hour. `Provision` refuses a batch that would take the pool over its cap,
-- and pool capacity stops at it. The check and the insert share one
-- transaction with the pool row locked, so racing writers cannot together
-- exceed the cap (see flotilla_store::spend). 0 means no cap, the state of
-- every existing pool.
ALTER TABLE pools
    ADD COLUMN spend_cap_per_hour_micros BIGINT NOT NULL DEFAULT 0
        CHECK (spend_cap_per_hour_micros >= 0),
    -- Set while pool capacity is held below the desired count by the cap,
    -- so every scheduler replica reports one episode once, however many
    -- ticks it lasts; cleared when capacity is no longer held back.
    ADD COLUMN spend_capped_since TIMESTAMPTZ;

-- The start and end of each such episode go to the pools' audit log.
ALTER TABLE pool_events
    DROP CONSTRAINT pool_events_action_check,
    ADD CONSTRAINT pool_events_action_check CHECK (action IN ('paused', 'resumed',
        'probe_started', 'probe_failed', 'probe_abandoned', 'spend_capped',
        'spend_cap_cleared'));
