"""Camera rooms: a live driver's camera read into face motion."""
