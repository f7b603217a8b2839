-- The highest heartbeat `sequence` written for the instance's current agent
-- process (0: none, or the agent registered again). A heartbeat whose
-- sequence is not above it arrived late and is not written: a delayed
-- `idle = true` must never end a drain the worker is still busy in.
-- Not indexed, so heartbeats stay HOT updates.
ALTER TABLE instances ADD COLUMN heartbeat_sequence bigint NOT NULL DEFAULT 0;
