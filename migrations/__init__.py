"""Alembic environment and revisions for the crossfind library schema."""
