-- Liveness by health check for workers without the agent: the scheduler
-- keeps probing a `ready` instance that never heartbeated, and the watchdog
-- suspects it once its probes have failed for long enough. `failing_since`
-- is the first failure of the current run of failures (NULL after a
-- success), so "N failures in a row over at least a window" is one
-- comparison.
ALTER TABLE instance_health ADD COLUMN failing_since TIMESTAMPTZ;
