-- An operator can undo a drain (`Uncordon`): the act is kept in the
-- instance's history like the drain it undoes, as `uncordoned`.
ALTER TABLE action_logs
    DROP CONSTRAINT action_logs_action_check,
    ADD CONSTRAINT action_logs_action_check CHECK (action IN ('terminate_requested',
        'drain_requested', 'lost_verdict_held', 'step_retried', 'uncordoned'));
