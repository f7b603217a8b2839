-- Volumes up to 10 TB: Scaleway's Block Storage takes 1 GB to 10 TB. Each
-- provider refuses what is above its own limit (Fly: 500 GB) when a pool is
-- created (the adapter's CheckSpec) and again at create.
ALTER TABLE pools DROP CONSTRAINT pools_volume_size_gb_check;
ALTER TABLE pools ADD CONSTRAINT pools_volume_size_gb_check
    CHECK (volume_size_gb BETWEEN 0 AND 10000);
ALTER TABLE instance_volumes DROP CONSTRAINT instance_volumes_size_gb_check;
ALTER TABLE instance_volumes ADD CONSTRAINT instance_volumes_size_gb_check
    CHECK (size_gb BETWEEN 1 AND 10000);
