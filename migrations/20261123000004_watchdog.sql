-- When the watchdog first found a ready worker silent; a heartbeat clears it.
ALTER TABLE instances ADD COLUMN suspect_since TIMESTAMPTZ;
-- Set while too large a share of the pool is suspect at once: the watchdog
-- holds remediation (a network blip must not replace a whole fleet).
ALTER TABLE pools ADD COLUMN storm_hold_since TIMESTAMPTZ;
