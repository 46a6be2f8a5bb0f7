"""The PostgreSQL engine: several daemons sharing one database (engine.py), its schema, reads and writes."""
