-- Pools may name the docker provider (workers as containers of a Docker Engine).
ALTER TABLE pools DROP CONSTRAINT pools_provider_check;
ALTER TABLE pools ADD CONSTRAINT pools_provider_check
    CHECK (provider IN ('fly', 'scaleway', 'local', 'sim', 'docker'));
