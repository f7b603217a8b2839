-- Idle stop's action (issue #20): what becomes of an instance whose worker
-- reported idle for its pool's idle timeout. 'terminate' (the default, and
-- the behaviour of every existing pool) drains and terminates it; 'stop'
-- drains it, stops its machine and returns it to the pool's warm stock
-- (state `warm`, desired `warm`), from which `Provision` starts it again
-- instead of creating a machine. The warm stock is still kept at the
-- pool's `warm_size`: a returned machine beyond it is let go.
ALTER TABLE pools
    ADD COLUMN idle_action TEXT NOT NULL DEFAULT 'terminate'
        CHECK (idle_action IN ('terminate', 'stop'));
