"""Signals around the models: audio and its mel features (`audio`), speech synthesis
(`tts`), facial motion coefficients (`motion`), lip-sync alignment and A/V delay
(`alignment`), and the AI-generated label burned into frames (`label`)."""
