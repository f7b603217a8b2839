-- Where the work on an instance came from: the trace context and
-- correlation id of the last request about it (its provision, later its
-- terminate). Whichever replica steps the instance continues that trace,
-- after a restart too; the CMD message that wakes a loop carries nothing
-- the loop needs.
ALTER TABLE instances ADD COLUMN origin JSONB;
