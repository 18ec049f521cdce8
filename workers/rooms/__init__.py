"""A room on this worker: its producer, emitter and pacing (`room`), what drives it
(a script, live voice or motion capture: `drivers`, fed by the LiveInputService in
`live_input`), and the rooms this worker runs, by session and assignment epoch
(`registry`)."""
