"""Reports: JSON (and .npy) artifacts -> markdown and plots. Never imports a stage."""
