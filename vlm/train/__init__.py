"""One training loop (``loop.Trainer``), several recipes (lrclr; clear and drasclr later)."""
