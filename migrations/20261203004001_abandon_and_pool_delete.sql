-- A way out for every stuck instance, and pools that can be deleted.
--
-- `abandoned` is terminal like `terminated`, but claims nothing about the
-- provider: an operator gave the instance up without any provider call,
-- so its machine may still exist (the orphan scan treats a tagged machine
-- of an abandoned instance as an orphan). Names and the work-queue index
-- leave it out as they leave out `terminated`.
ALTER TABLE instances DROP CONSTRAINT instances_state_check;
ALTER TABLE instances ADD CONSTRAINT instances_state_check CHECK (state IN (
    'requested', 'provisioning', 'booting', 'installing',
    'starting', 'ready', 'draining', 'stopping', 'stopped',
    'deleting', 'terminated', 'provisioning_failed',
    'startup_failed', 'worker_dead', 'lost', 'abandoned'));

DROP INDEX instances_pool_name_live;
CREATE UNIQUE INDEX instances_pool_name_live
    ON instances (pool, name) WHERE state NOT IN ('terminated', 'abandoned');
DROP INDEX instances_due;
CREATE INDEX instances_due
    ON instances (state, next_attempt_at) WHERE state NOT IN ('terminated', 'abandoned');

-- A pool is deleted once none of its instances is live; its terminal
-- instances keep their history and the pool's name, which a new pool may
-- then take. So instances and the pools' audit log no longer reference the
-- pool row. Every writer of new instances locks the pool row instead
-- (`FOR KEY SHARE`, see flotilla_store::instance) and is refused while the
-- pool is being deleted, which is what the foreign key did for a pool that
-- is gone.
ALTER TABLE instances DROP CONSTRAINT instances_pool_fkey;
ALTER TABLE pool_events DROP CONSTRAINT pool_events_pool_fkey;

-- Set by a forced delete of a pool with live instances: the pool takes no
-- new instances and keeps no capacity; it is deleted when the last of its
-- instances is terminal. Teardown still needs the row (provider, region).
ALTER TABLE pools ADD COLUMN deleting_since TIMESTAMPTZ;

-- Every pool deletion: who asked, when, why, and when the row went. Also
-- the orphan scan's memory of where a deleted pool's machines lived: a
-- pool deleted with abandoned instances may have left machines there.
CREATE TABLE pool_deletions (
    id                  BIGSERIAL PRIMARY KEY,
    pool                TEXT NOT NULL,
    provider            TEXT NOT NULL,
    region              TEXT NOT NULL,
    actor               TEXT NOT NULL,
    correlation_id      TEXT NOT NULL,
    forced              BOOLEAN NOT NULL,
    reason              TEXT CHECK (length(reason) <= 4096),
    -- Instances that were not terminal when the deletion was asked for.
    live_instances      INTEGER NOT NULL CHECK (live_instances >= 0),
    requested_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the pool row was deleted; NULL while it is being deleted.
    deleted_at          TIMESTAMPTZ,
    -- Abandoned instances the pool held when its row was deleted.
    abandoned_instances INTEGER CHECK (abandoned_instances >= 0),
    CHECK ((deleted_at IS NULL) = (abandoned_instances IS NULL))
);
-- One deletion under way per pool.
CREATE UNIQUE INDEX pool_deletions_open ON pool_deletions (pool) WHERE deleted_at IS NULL;
