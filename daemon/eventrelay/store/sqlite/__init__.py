"""The SQLite engine: one daemon per database file, its writes in a writer process of their own.

schema.py: the tables, views and migrations, and the checks at start-up; wire.py: what crosses to the
writer; writer.py: the writer process; writes.py: its transactions; engine.py: `SqliteStore`, the daemon's
side; reads.py: the reads; files.py: the lock and permissions of the file; errors.py: what SQLite's errors
mean for an operator.
"""
