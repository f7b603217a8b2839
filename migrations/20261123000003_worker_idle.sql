-- What the worker last said about its load: drain waits for an idle report
-- made after the instance was cordoned. Not indexed, so heartbeat updates
-- stay HOT.
ALTER TABLE instances ADD COLUMN worker_idle BOOLEAN NOT NULL DEFAULT false;
