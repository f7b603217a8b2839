-- The orphan scan's suspicion of an instance whose machine one listing did
-- not show (cleared when a listing shows it again), and the storm hold of
-- the lost verdicts of a pool, kept apart from the silent-worker hold.
ALTER TABLE instances ADD COLUMN missing_since TIMESTAMPTZ;
ALTER TABLE pools ADD COLUMN lost_hold_since TIMESTAMPTZ;
