"""Ray Tune sweeps over (step size, batch size, mechanism) for the fastest time to accuracy."""
