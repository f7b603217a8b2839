-- A history row is either a transition (from_state -> to_state) or an act
-- that changed no state (action: a request, who asked and for a terminate
-- whether it was forced, or the watchdog holding a lost verdict). Such acts
-- used to be written as a transition from the instance's state to itself,
-- which read as a state change that never happened and had no matching
-- event. Rows written before this migration keep their shape.
ALTER TABLE action_logs
    ALTER COLUMN to_state DROP NOT NULL,
    ADD COLUMN action TEXT CHECK (action IN ('terminate_requested', 'drain_requested',
                                            'lost_verdict_held')),
    ADD COLUMN force BOOLEAN,
    ADD CONSTRAINT action_logs_transition_or_request CHECK (
        (action IS NULL AND to_state IS NOT NULL AND force IS NULL)
        OR (action IS NOT NULL AND from_state IS NULL AND to_state IS NULL)
    ),
    ADD CONSTRAINT action_logs_force_of_terminate CHECK (
        (action = 'terminate_requested') = (force IS NOT NULL)
    );
