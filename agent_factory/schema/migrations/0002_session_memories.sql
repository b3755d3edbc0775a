-- Agent session memory: one metadata row per session and one row per message,
-- plus free-form memory atoms (context, decision, action, issue, log).
CREATE TABLE IF NOT EXISTS session_memories (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id text NOT NULL,
    user_id text NOT NULL DEFAULT '',
    memory_type text NOT NULL,
    -- Client-generated id of a message, so that saving twice or from two
    -- processes never duplicates or loses a message. NULL for other rows.
    message_id text,
    message_index integer,
    content jsonb NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT session_memories_memory_type_check CHECK (memory_type IN (
        'session_metadata', 'message_user', 'message_assistant', 'message_system',
        'message_tool', 'context', 'decision', 'action', 'issue', 'log'))
);

CREATE UNIQUE INDEX IF NOT EXISTS session_memories_metadata_key
    ON session_memories (session_id) WHERE memory_type = 'session_metadata';
CREATE UNIQUE INDEX IF NOT EXISTS session_memories_message_key
    ON session_memories (session_id, message_id);
CREATE INDEX IF NOT EXISTS session_memories_session_idx ON session_memories (session_id);
CREATE INDEX IF NOT EXISTS session_memories_user_idx ON session_memories (user_id);
CREATE INDEX IF NOT EXISTS session_memories_type_idx ON session_memories (memory_type);
CREATE INDEX IF NOT EXISTS session_memories_created_idx ON session_memories (created_at DESC);

CREATE OR REPLACE FUNCTION agent_factory_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- An UPDATE that sets updated_at itself (a copy between providers keeps the
    -- source's timestamp) is left alone; any other UPDATE is stamped now().
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS session_memories_touch ON session_memories;
CREATE TRIGGER session_memories_touch BEFORE UPDATE ON session_memories
    FOR EACH ROW EXECUTE FUNCTION agent_factory_touch_updated_at();
