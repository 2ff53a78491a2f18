raise RuntimeError("synthetic kimivl-edge checkpoint: its remote code must never be imported or executed")
