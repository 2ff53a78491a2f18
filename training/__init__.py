"""Training of the tiny Kimi-VL fixture (kimivl_edge/assets/kimi-vl-tiny): task, trainer, evaluation."""
