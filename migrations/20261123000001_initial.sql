-- Flotilla's initial schema. Append-only: later changes are new files.

CREATE TABLE pools (
    name                    TEXT PRIMARY KEY
                            CHECK (name ~ '^[a-z][a-z0-9-]{0,62}$'),
    provider                TEXT NOT NULL
                            CHECK (provider IN ('fly', 'scaleway', 'local', 'sim')),
    instance_type           TEXT NOT NULL CHECK (instance_type <> ''),
    region                  TEXT NOT NULL CHECK (region <> ''),
    image                   TEXT NOT NULL DEFAULT '',
    desired_capacity        INTEGER NOT NULL DEFAULT 0
                            CHECK (desired_capacity BETWEEN 0 AND 10000),
    volume_size_gb          INTEGER NOT NULL DEFAULT 0 CHECK (volume_size_gb BETWEEN 0 AND 500),
    -- Phase deadlines in seconds; NULL means the service default.
    booting_timeout_seconds    INTEGER CHECK (booting_timeout_seconds > 0),
    installing_timeout_seconds INTEGER CHECK (installing_timeout_seconds > 0),
    starting_timeout_seconds   INTEGER CHECK (starting_timeout_seconds > 0),
    draining_timeout_seconds   INTEGER CHECK (draining_timeout_seconds > 0),
    price_per_hour_micros   BIGINT NOT NULL DEFAULT 0 CHECK (price_per_hour_micros >= 0),
    labels                  JSONB NOT NULL DEFAULT '{}'::jsonb,
    version                 BIGINT NOT NULL DEFAULT 1,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE instances (
    id                      UUID PRIMARY KEY,
    pool                    TEXT NOT NULL REFERENCES pools (name),
    name                    TEXT NOT NULL,
    provider                TEXT NOT NULL,
    provider_machine_id     TEXT,
    state                   TEXT NOT NULL CHECK (state IN (
                                'requested', 'provisioning', 'booting', 'installing',
                                'starting', 'ready', 'draining', 'stopping', 'stopped',
                                'deleting', 'terminated', 'provisioning_failed',
                                'startup_failed', 'worker_dead', 'lost')),
    desired_state           TEXT NOT NULL DEFAULT 'running'
                            CHECK (desired_state IN ('running', 'terminated')),
    version                 BIGINT NOT NULL DEFAULT 1,
    -- Failed attempts at the current step; reset when the state changes.
    attempts                INTEGER NOT NULL DEFAULT 0,
    next_attempt_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error              TEXT,
    state_entered_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat          TIMESTAMPTZ,
    cordoned                BOOLEAN NOT NULL DEFAULT false,
    force_terminate         BOOLEAN NOT NULL DEFAULT false,
    needs_attention         BOOLEAN NOT NULL DEFAULT false,
    labels                  JSONB NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key         TEXT,
    -- Hash of the per-instance worker token (the token itself is never stored).
    worker_token_hash       BYTEA,
    lease_owner             TEXT,
    lease_until             TIMESTAMPTZ,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
) WITH (fillfactor = 80);  -- room for HOT updates of heartbeat and lease columns

-- Names are unique among the instances of a pool that still exist.
CREATE UNIQUE INDEX instances_pool_name_live
    ON instances (pool, name) WHERE state <> 'terminated';
-- Work queues: loops select due rows of a few states, oldest first.
CREATE INDEX instances_due
    ON instances (state, next_attempt_at) WHERE state <> 'terminated';
CREATE INDEX instances_pool_state ON instances (pool, state);
-- An orphan at the provider is tied back by machine id as well as instance id.
CREATE UNIQUE INDEX instances_provider_machine
    ON instances (provider, provider_machine_id) WHERE provider_machine_id IS NOT NULL;

CREATE TABLE instance_volumes (
    id                      UUID PRIMARY KEY,
    instance_id             UUID NOT NULL REFERENCES instances (id),
    provider_volume_id      TEXT,
    size_gb                 INTEGER NOT NULL CHECK (size_gb BETWEEN 1 AND 500),
    delete_on_terminate     BOOLEAN NOT NULL DEFAULT true,
    state                   TEXT NOT NULL DEFAULT 'requested'
                            CHECK (state IN ('requested', 'created', 'deleting', 'deleted')),
    attempts                INTEGER NOT NULL DEFAULT 0,
    next_attempt_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error              TEXT,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX instance_volumes_instance ON instance_volumes (instance_id);
CREATE UNIQUE INDEX instance_volumes_provider
    ON instance_volumes (provider_volume_id) WHERE provider_volume_id IS NOT NULL;

-- Messages committed with the state change that caused them, relayed to
-- JetStream by the outbox relay. `msg_id` becomes `Nats-Msg-Id`, so a row
-- published twice (relay crash before `sent_at`) is stored once.
CREATE TABLE outbox (
    id                      BIGSERIAL PRIMARY KEY,
    msg_id                  UUID NOT NULL UNIQUE,
    -- Logical subject without the namespace, e.g. 'CMD.provision'.
    subject                 TEXT NOT NULL CHECK (subject ~ '^(CMD|EVT)\.[A-Za-z0-9_.-]+$'),
    payload                 BYTEA NOT NULL,
    -- traceparent, tracestate, correlation id: header name -> value.
    headers                 JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at                 TIMESTAMPTZ,
    attempts                INTEGER NOT NULL DEFAULT 0,
    last_error              TEXT
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

CREATE TABLE action_logs (
    id                      BIGSERIAL PRIMARY KEY,
    instance_id             UUID NOT NULL REFERENCES instances (id),
    from_state              TEXT,
    to_state                TEXT NOT NULL,
    actor                   TEXT NOT NULL,
    correlation_id          TEXT NOT NULL,
    error                   TEXT,
    reason                  TEXT,
    at                      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX action_logs_instance ON action_logs (instance_id, id);

-- First answers to idempotent requests, replayed for a repeated key.
CREATE TABLE idempotency_records (
    scope                   TEXT NOT NULL,
    key                     TEXT NOT NULL,
    -- Hash of the request, so a key reused for a different request is refused.
    request_hash            BYTEA NOT NULL,
    response                BYTEA NOT NULL,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at              TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);
