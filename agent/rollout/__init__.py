"""Blue/green + canary rollouts: plan, journal, traffic adapters, KPI collection and the driver."""
