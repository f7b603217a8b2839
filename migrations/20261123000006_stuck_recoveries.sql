-- How often the watchdog had to nudge an instance stuck in one state; past
-- the limit it escalates (fail, force) or flags it for an operator.
ALTER TABLE instances ADD COLUMN stuck_recoveries INTEGER NOT NULL DEFAULT 0;
