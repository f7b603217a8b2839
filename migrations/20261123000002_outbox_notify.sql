-- Wake the outbox relay as soon as a message is committed; the relay also
-- polls, so a missed notification only delays a message.
CREATE FUNCTION flotilla_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flotilla_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_outbox_notify();
