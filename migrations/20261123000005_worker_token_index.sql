-- A worker token that fails for its own instance is looked up across all
-- instances to tell PERMISSION_DENIED from UNAUTHENTICATED; index it so
-- that failure path is not a table scan.
CREATE INDEX instances_worker_token_hash ON instances (worker_token_hash)
    WHERE worker_token_hash IS NOT NULL;
