-- Every failed attempt of a step is part of an instance's history: the
-- attempt number, the error's class and the error (with the provider's
-- status when it answered), written with the failure itself, so an
-- operator can reconstruct an incident from `flotilla get` alone.
ALTER TABLE action_logs
    DROP CONSTRAINT action_logs_action_check,
    ADD CONSTRAINT action_logs_action_check CHECK (action IN ('terminate_requested',
        'drain_requested', 'lost_verdict_held', 'step_retried'));
