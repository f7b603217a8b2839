-- The watchdog's silent-worker scan runs every tick; without an index it
-- reads every `ready` row (~0.9 s at 1M instances). An index on
-- `last_heartbeat` would make every heartbeat a non-HOT update that writes
-- every index of the table, so the index is on a coarse copy instead:
-- `heartbeat_mark` is set to the heartbeat's time only when the previous
-- mark is older than a few seconds (see flotilla_store::worker), so most
-- heartbeats leave every indexed column unchanged and stay HOT.
--
-- Invariant kept by every heartbeat write: heartbeat_mark <= last_heartbeat,
-- and both are NULL or both are set. So the indexed expression is never
-- later than the last sign of life, and the scan reads the index for
-- candidates and rechecks the exact condition.
ALTER TABLE instances ADD COLUMN heartbeat_mark TIMESTAMPTZ;
UPDATE instances SET heartbeat_mark = last_heartbeat WHERE last_heartbeat IS NOT NULL;
CREATE INDEX instances_silent
    ON instances ((COALESCE(heartbeat_mark, state_entered_at)))
    WHERE state = 'ready';
-- Suspicion is cleared every tick; it is set on few rows, and a heartbeat
-- never writes it, so this partial index costs heartbeats nothing.
CREATE INDEX instances_suspect ON instances (id) WHERE suspect_since IS NOT NULL;
