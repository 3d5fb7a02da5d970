"""The machine and the job: distributed start-up, device binding, memory estimates."""
