-- Extensions every provider needs. pgvector must be available on the server:
-- Supabase and Neon ship it; elsewhere install the package for your server
-- version (e.g. postgresql-16-pgvector) before deploying.
CREATE EXTENSION IF NOT EXISTS vector;
