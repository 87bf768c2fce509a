"""Alembic's entry point for the state store's migrations.

`backorder.state.StateStore.migrate` runs them: it hands over an open connection, inside the
transaction (and, on PostgreSQL, the lock) it holds, and the version table's name, through
``config.attributes``. There is no alembic.ini and no logging set-up here: Alembic's progress
lines stay out of the command line's output.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("the state store migrates through backorder.state.StateStore.migrate")

context.configure(
    connection=connection,
    version_table=config.attributes["version_table"],
    # The schema lives in the revisions alone; `backorder.state` declares the same tables for
    # its queries, and tests/test_state.py checks that the two agree.
    target_metadata=config.attributes.get("target_metadata"),
)
with context.begin_transaction():
    context.run_migrations()
