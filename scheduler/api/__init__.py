"""The scheduler's edges: the gRPC servicers (sessions, workers, avatars), the gate
every call passes (credentials, authorisation, rate limits) and the read-only status
page. They validate and translate; the core decides."""
