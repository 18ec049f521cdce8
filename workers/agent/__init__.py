"""The worker's side of the scheduler protocol: the agent that takes assignments and
reports (`agent`), the bidi stream with reconnects (`link`), and numbered usage
reports held until acknowledged (`usage`)."""
