-- Failback's durable record (see agent_factory/continuity/journal.py).
-- The triggers' WHEN clause skips the function call for ordinary sessions: the
-- primary's writes pay one setting lookup per row.
--
-- On a backup, every row changed by a write the library sends there while it
-- stands in for the primary is recorded here with its before and after image
-- and its transaction: the sessions (or transactions) of those writes carry
-- agent_factory.journal = on. Ordinary sessions, the primary's writes and
-- logical replication's apply workers record nothing. Any application
-- instance, after any restart, replays the record on the primary and prunes it.
CREATE TABLE IF NOT EXISTS agent_factory_journal (
    seq bigserial PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_name text NOT NULL,
    op text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    before jsonb,
    after jsonb,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION agent_factory_journal_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('agent_factory.journal', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO agent_factory_journal (table_name, op, before, after)
    VALUES (quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME), TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END;
$$;

-- On the primary: every conflict a drain met, with both versions (the losing
-- one can be restored from here), and the source transactions already applied
-- (so that a drain interrupted after its commit never applies one twice).
CREATE TABLE IF NOT EXISTS agent_factory_conflicts (
    id bigserial PRIMARY KEY,
    provider text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    row_key jsonb NOT NULL,
    before jsonb,
    backup_version jsonb,
    primary_version jsonb,
    resolved_version jsonb,
    resolution text NOT NULL,
    source_xid text,
    detected_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS agent_factory_drained (
    provider text NOT NULL,
    xid xid8 NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (provider, xid)
);

-- The split-brain witness: every instance that reaches the primary bumps this
-- row about once a second; replication carries it to the backups, where an
-- instance cut off from the primary sees it move (continuity/witness.py).
CREATE TABLE IF NOT EXISTS agent_factory_heartbeat (
    id int PRIMARY KEY CHECK (id = 1),
    beat bigint NOT NULL DEFAULT 0,
    beat_at timestamptz NOT NULL DEFAULT now()
);
-- (Its one row is created by the primary's first beat and replicated: a row
-- here on a backup would collide with replication's initial copy.)

DROP TRIGGER IF EXISTS agent_factory_journal ON session_memories;
CREATE TRIGGER agent_factory_journal AFTER INSERT OR UPDATE OR DELETE ON session_memories
    FOR EACH ROW WHEN (current_setting('agent_factory.journal', true) = 'on')
    EXECUTE FUNCTION agent_factory_journal_row();
DROP TRIGGER IF EXISTS agent_factory_journal ON knowledge_atoms;
CREATE TRIGGER agent_factory_journal AFTER INSERT OR UPDATE OR DELETE ON knowledge_atoms
    FOR EACH ROW WHEN (current_setting('agent_factory.journal', true) = 'on')
    EXECUTE FUNCTION agent_factory_journal_row();
