"""Pure policy: plain values in, decisions out. Nothing here imports grpc, the store,
metrics or asyncio, and time comes in as an argument, so every rule is tested with
plain values: placement (where a room goes, what is reclaimed for a reservation),
tenants (budgets, reservations), the degradation ladder, the admission queue, the
usage ledger, licences, platform rules, cost and the autoscaler's targets."""
