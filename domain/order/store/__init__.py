"""Every statement of the order module, by what it reads or writes.

Data access. SQLAlchemy (ORM queries and Core inserts/updates over the tables
of domain/order/models.py) everywhere, except the statements that write
status entries with their events (`entries.append_entries`,
`entries.close_entry`, and the SubmitOrderIntent hot path
`entries.insert_intent`, `entries.set_reservation`): they run on the
session's asyncpg connection through domain.shared.db.driver_connection,
inside the same transaction.

- orders: order rows with their lines and payments, loading and listing.
- entries: status entries and the events that carry them, and the hot path.
- shipments, refunds: the fulfilment and refund records and their counters.

Service modules (intents, queries, history, lifecycle, refunds) decide; only
these modules hold SQL.
"""
