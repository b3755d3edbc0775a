-- Knowledge atoms with a pgvector embedding. {{EMBEDDING_DIM}} is replaced by
-- the configured dimension (default 1536) when the migration is applied.
CREATE TABLE IF NOT EXISTS knowledge_atoms (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    atom_id text NOT NULL UNIQUE,
    atom_type text NOT NULL CHECK (atom_type IN (
        'concept', 'procedure', 'specification', 'pattern', 'fault', 'reference')),
    title text NOT NULL,
    summary text NOT NULL DEFAULT '',
    content text NOT NULL,
    manufacturer text NOT NULL DEFAULT '',
    product_family text,
    product_version text,
    difficulty text CHECK (difficulty IN ('beginner', 'intermediate', 'advanced', 'expert')),
    prerequisites text[] NOT NULL DEFAULT '{}',
    related_atoms text[] NOT NULL DEFAULT '{}',
    keywords text[] NOT NULL DEFAULT '{}',
    source_document text NOT NULL DEFAULT '',
    source_pages integer[] NOT NULL DEFAULT '{}',
    source_url text,
    citations jsonb NOT NULL DEFAULT '[]'::jsonb,
    quality_score double precision NOT NULL DEFAULT 1.0
        CHECK (quality_score >= 0 AND quality_score <= 1),
    safety_level text NOT NULL DEFAULT 'info'
        CHECK (safety_level IN ('info', 'caution', 'warning', 'danger')),
    safety_notes text,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    embedding vector({{EMBEDDING_DIM}}),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_validated_at timestamptz
);

CREATE INDEX IF NOT EXISTS knowledge_atoms_type_idx ON knowledge_atoms (atom_type);
CREATE INDEX IF NOT EXISTS knowledge_atoms_manufacturer_idx ON knowledge_atoms (manufacturer);
CREATE INDEX IF NOT EXISTS knowledge_atoms_family_idx ON knowledge_atoms (product_family);
CREATE INDEX IF NOT EXISTS knowledge_atoms_difficulty_idx ON knowledge_atoms (difficulty);
CREATE INDEX IF NOT EXISTS knowledge_atoms_lookup_idx
    ON knowledge_atoms (manufacturer, product_family, atom_type);
CREATE INDEX IF NOT EXISTS knowledge_atoms_fts_idx ON knowledge_atoms
    USING gin (to_tsvector('english', title || ' ' || summary || ' ' || content));
CREATE INDEX IF NOT EXISTS knowledge_atoms_embedding_idx ON knowledge_atoms
    USING hnsw (embedding vector_cosine_ops);

DROP TRIGGER IF EXISTS knowledge_atoms_touch ON knowledge_atoms;
CREATE TRIGGER knowledge_atoms_touch BEFORE UPDATE ON knowledge_atoms
    FOR EACH ROW EXECUTE FUNCTION agent_factory_touch_updated_at();
