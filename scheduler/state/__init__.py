"""What the scheduler knows and keeps: sessions and their transition table, the
SQLite store (writer thread, group commit), the avatar registry and its audit log,
metering (usage reports into the ledger, spend), and each connected worker's link."""
